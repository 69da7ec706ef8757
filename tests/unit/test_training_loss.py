# SPDX-License-Identifier: Apache-2.0
"""Loss alignment of the distillation trainer (redrafter-algorithm.md §5).

From ``h_t`` and the embeddings of ``x_{t+1} .. x_{t+i+1}``, step ``i`` predicts ``x_{t+i+2}``.
The decisive check goes through the *inference* path: a drafter trained with our labels and then
run by ``beam_search`` (init token = the target's own next token) reproduces a memorised corpus;
one trained on labels shifted by one position does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_redrafter.beam_search import beam_search
from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.training.loss import (IGNORE, multistep_loss, row_windows,
                                          sequence_labels, topk_correct)
from vllm_redrafter.training.trainer import draft_labels, step_logits
from vllm_redrafter.training.vocab import target_to_draft

H, V, N_STEPS = 16, 48, 3


def _drafter(generator, rnn=True, exit_dim=64):
    cfg = DrafterConfig(hidden_size=H, vocab_size=V, exit_dim=exit_dim, num_draft_layers=1,
                        rnn=rnn)
    return RecurrentDrafter(cfg, generator=generator)


def test_sequence_labels_alignment():
    tokens = torch.arange(10, 16).unsqueeze(0)  # [1, 6]: 10 11 12 13 14 15
    labels = sequence_labels(tokens, 2)  # [1, 2, 6]
    assert labels[0, 0].tolist() == [12, 13, 14, 15, IGNORE, IGNORE]
    assert labels[0, 1].tolist() == [13, 14, 15, IGNORE, IGNORE, IGNORE]
    valid = torch.tensor([[False, False, False, True, True, True]])
    masked = sequence_labels(tokens, 2, valid)
    assert masked[0, 0].tolist() == [IGNORE, 13, 14, 15, IGNORE, IGNORE]


def test_row_windows_stop_at_sequence_end():
    tokens = torch.tensor([1, 2, 3, 7, 8])  # two sequences: [1 2 3] [7 8]
    offsets = torch.tensor([0, 3, 5])
    win = row_windows(tokens, offsets, 2)  # [5, 3]
    assert win.tolist() == [[1, 2, 3], [2, 3, -1], [3, -1, -1], [7, 8, -1], [8, -1, -1]]


def test_row_layout_matches_forward_train(generator):
    """The trainer's row layout computes exactly RecurrentDrafter.forward_train."""
    drafter = _drafter(generator)
    table = torch.randn(V, H, generator=generator)  # [V, H]
    tokens = torch.randint(0, V, (2, 9), generator=generator)  # [B, S]
    hidden = torch.randn(2, 9, H, generator=generator)  # [B, S, H]
    with torch.no_grad():
        seq_logits = drafter.forward_train(hidden, table[tokens], N_STEPS)  # [B, n, S, Vd]
        labels = sequence_labels(tokens, N_STEPS)  # [B, n, S]
        # rows: h_t with window x_{t+1} ..
        win = row_windows(tokens[:, 1:].reshape(-1), torch.tensor([0, 8, 16]), N_STEPS)
        rows_h = hidden[:, :-1].reshape(-1, H)  # [B*(S-1), H]
        row_logits = torch.stack(list(step_logits(drafter, table, rows_h, win, N_STEPS)),
                                 1)  # [R, n, Vd]
        loss_lab, _ = draft_labels(win, target_to_draft(None, V), N_STEPS)  # [R, n]
    seq_view = seq_logits[:, :, :-1].permute(0, 2, 1, 3).reshape(-1, N_STEPS, V)  # [R, n, V]
    valid = loss_lab != IGNORE
    assert torch.allclose(row_logits[valid], seq_view[valid], atol=1e-5)
    seq_lab = labels[:, :, :-1].permute(0, 2, 1).reshape(-1, N_STEPS)
    assert torch.equal(seq_lab, loss_lab)
    # and the two loss layouts agree
    l_seq, _ = multistep_loss(seq_logits, labels)
    l_row, _ = multistep_loss(row_logits, loss_lab)
    assert torch.allclose(l_seq, l_row, atol=1e-5)


def _memorise(shift: int, generator) -> float:
    """Train on a tiny corpus with labels offset by ``shift``; return inference accuracy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a busy machine
    try:
        return _memorise_impl(shift, generator)
    finally:
        torch.set_num_threads(threads)


def _memorise_impl(shift: int, generator) -> float:
    torch.manual_seed(0)
    drafter = _drafter(generator)
    table = torch.randn(V, H, generator=generator)  # [V, H] frozen target embeddings
    # 3 sequences of distinct tokens (no repeats: copying an input is never right)
    perm = torch.randperm(V, generator=generator)
    tokens = perm[:36]  # [T]
    offsets = torch.tensor([0, 12, 24, 36])
    hidden = torch.randn(36, H, generator=generator)  # [T, H] h before each token
    win = row_windows(tokens, offsets, N_STEPS + 1)  # [T, n+2]
    rows = torch.nonzero(win[:, 1] >= 0).squeeze(1)
    t2d = target_to_draft(None, V)
    # correct labels: column i+1 for step i; shifted: column i+1+shift
    lab_cols = torch.full((36, N_STEPS + 1), -1, dtype=torch.int64)
    lab_cols[:, 0] = win[:, 0]
    for i in range(N_STEPS):
        col = i + 1 + shift
        lab_cols[:, i + 1] = win[:, col] if col < win.shape[1] else -1
    opt = torch.optim.Adam(drafter.parameters(), lr=1e-2)
    for _ in range(150):
        loss_lab, _ = draft_labels(lab_cols[rows], t2d, N_STEPS)
        total = 0.0
        for i, logits in enumerate(step_logits(drafter, table, hidden[rows], win[rows],
                                               N_STEPS, training=True)):
            if (loss_lab[:, i] != IGNORE).any():
                total = total + F.cross_entropy(logits, loss_lab[:, i], ignore_index=IGNORE)
        opt.zero_grad()
        total.backward()
        opt.step()
    # inference path: beam search from h_t with the target's own token x_{t+1}
    with torch.no_grad():
        beams = beam_search(drafter, lambda ids: table[ids], hidden[rows], win[rows, 0], 1,
                            N_STEPS + 1)
    cand = beams.tokens[:, 0, 1:]  # [R, n]
    truth = win[rows, 1:N_STEPS + 1]  # [R, n]
    valid = truth >= 0
    return float((cand == truth)[valid].float().mean())


def test_memorised_corpus_is_reproduced_by_inference(generator):
    assert _memorise(0, generator) > 0.97


def test_labels_shifted_by_one_are_not(generator):
    assert _memorise(1, generator) < 0.2


def test_topk_correct_counts_oov_as_miss():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]]])  # [N=1, n=2, Vd=3]
    labels = torch.tensor([[1, -1]])
    hits = topk_correct(logits, labels, ks=(1, 3))
    assert hits[1].tolist() == [1, 0] and hits[3].tolist() == [1, 0]

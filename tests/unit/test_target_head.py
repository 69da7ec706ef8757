# SPDX-License-Identifier: Apache-2.0
"""``head="target"`` drafters: a learned ``head_proj`` in front of the target's frozen head;
the soft-label (target distribution) loss and its alignment with the cached hidden rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_redrafter.checkpoint import load_drafter, save_drafter
from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.training.loss import IGNORE, distill_loss, multistep_loss, row_windows
from vllm_redrafter.training.trainer import teacher_logits

H, V, E = 8, 30, 12
VOCAB = [0, 2, 5, 11, 29]


def _drafter(generator, **kwargs) -> RecurrentDrafter:
    cfg = DrafterConfig(hidden_size=H, vocab_size=V, exit_dim=E, num_draft_layers=1,
                        **kwargs)
    return RecurrentDrafter(cfg, generator=generator)


def test_target_head_logits_are_the_target_rows_times_the_projection(generator):
    drafter = _drafter(generator, head="target", draft_vocab=VOCAB)
    table = torch.randn(V, H, generator=generator)  # [V, H]
    drafter.bind_target_head(table)
    feats = torch.randn(3, 2 * H, generator=generator)  # [N, 2H]
    z = drafter.input_proj(feats)
    z = z + F.silu(drafter.layers[0].linear(z))  # [N, E]
    want = drafter.head_proj(z) @ table[VOCAB].T  # [N, Vd]
    torch.testing.assert_close(drafter.head(feats), want)


def test_target_head_learns_far_fewer_parameters(generator):
    own = _drafter(generator)
    tgt = _drafter(generator, head="target")
    assert "lm_head.weight" not in dict(tgt.named_parameters())
    assert own.num_parameters() - tgt.num_parameters() == V * E - H * E


def test_unbound_target_head_names_the_fix(generator):
    drafter = _drafter(generator, head="target")
    with pytest.raises(RuntimeError, match="bind_target_head"):
        drafter.head(torch.zeros(1, 2 * H))
    with pytest.raises(ValueError, match="owns its output head"):
        _drafter(generator).bind_target_head(torch.zeros(V, H))
    with pytest.raises(ValueError, match=r"\[V>=30, H\]"):
        drafter.bind_target_head(torch.zeros(V - 1, H))


def test_target_head_checkpoint_round_trip_stores_no_head(tmp_path, generator):
    drafter = _drafter(generator, head="target", draft_vocab=VOCAB)
    save_drafter(drafter, tmp_path)
    loaded = load_drafter(tmp_path)
    assert loaded.config.head == "target" and loaded.config.draft_vocab == VOCAB
    table = torch.randn(V, H, generator=generator)
    drafter.bind_target_head(table)
    loaded.bind_target_head(table)
    x = torch.randn(2, 2 * H, generator=generator)
    torch.testing.assert_close(loaded.head(x), drafter.head(x))


def test_soft_weight_zero_is_apples_loss(generator):
    logits = torch.randn(6, 3, 5, generator=generator)
    labels = torch.randint(0, 5, (6, 3), generator=generator)
    labels[0, 2] = IGNORE
    loss, per_step = distill_loss(logits, labels)
    ref, ref_steps = multistep_loss(logits, labels)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(per_step, ref_steps)


def test_soft_loss_with_a_one_hot_teacher_is_the_hard_loss(generator):
    logits = torch.randn(6, 3, 5, generator=generator)
    labels = torch.randint(0, 5, (6, 3), generator=generator)
    teacher = F.one_hot(labels, 5).float() * 1e4  # softmax = one-hot of the label
    ok = torch.ones(6, 3, dtype=torch.bool)
    soft, _ = distill_loss(logits, labels, teacher, ok, soft_weight=1.0)
    hard, _ = distill_loss(logits, labels)
    torch.testing.assert_close(soft, hard)


def test_soft_loss_is_minimised_by_the_teacher_distribution(generator):
    teacher = torch.randn(4, 2, 6, generator=generator)
    ok = torch.ones(4, 2, dtype=torch.bool)
    labels = torch.full((4, 2), IGNORE)
    at_teacher, _ = distill_loss(teacher.clone(), labels, teacher, ok, soft_weight=1.0)
    elsewhere, _ = distill_loss(teacher + torch.randn(4, 2, 6, generator=generator),
                                labels, teacher, ok, soft_weight=1.0)
    assert at_teacher < elsewhere
    with pytest.raises(ValueError, match="soft_weight"):
        distill_loss(teacher, labels, soft_weight=1.5)


def test_teacher_rows_are_the_label_positions():
    """Row ``r``'s step ``i`` label is the token the target emitted after hidden row
    ``r + i + 1``; the teacher's argmax there must be that token. Negative control: the
    rows one position earlier (the off-by-one a wrong alignment would use) are not."""
    # Two sequences of lengths 5 and 4; hidden row k is one-hot of the token emitted
    # after it, so the identity head's argmax at row k is tokens[k].
    tokens = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5])
    offsets = torch.tensor([0, 5, 9])
    hidden = F.one_hot(tokens, 10).float()  # [T, H=10]
    head = torch.eye(10)  # [V, H]
    n = 2
    win = row_windows(tokens, offsets, n)  # [T, n+1]
    rows = torch.arange(tokens.numel())
    logits, valid = teacher_logits(hidden, rows, win, head, n)  # [T, n, V]
    labels = win[:, 1:]  # [T, n]
    assert torch.equal(valid, labels >= 0)
    assert torch.equal(logits.argmax(-1)[valid], labels[valid])
    early = hidden[(rows[:, None] + torch.arange(n)[None]).clamp(max=8)] @ head.T
    assert not torch.equal(early.argmax(-1)[valid], labels[valid])

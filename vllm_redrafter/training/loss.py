# SPDX-License-Identifier: Apache-2.0
"""Teacher-forced multi-step loss and accuracy (redrafter-algorithm.md §5).

From ``h_t`` and the embeddings of tokens ``t+1 .. t+i+1``, drafter step ``i`` predicts token
``t+i+2``. Two equivalent layouts are supported:

- *sequence* layout (``RecurrentDrafter.forward_train``): logits ``[B, n, S, Vd]`` and labels
  from :func:`sequence_labels` ``[B, n, S]``;
- *row* layout (the trainer's): one example per position ``t``, logits ``[N, n, Vd]`` and labels
  ``[N, n]`` built by :func:`row_windows`.

Labels are draft-vocabulary ids; ``IGNORE`` (-100) marks positions without a target (past the
end, inside the prompt, or a target token outside the draft vocabulary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sequence_labels(tokens: torch.Tensor, num_steps: int,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, n, S]`` target-id labels: ``labels[b, i, t] = tokens[b, t+i+2]``.

    Args:
        tokens: ``[B, S]`` int64 target ids.
        num_steps: ``n``.
        valid: optional ``[B, S]`` bool, which *label* positions may be trained on (e.g. the
            response tokens); others become ``IGNORE``.
    """
    bsz, seq = tokens.shape
    labels = torch.full((bsz, num_steps, seq), IGNORE, dtype=torch.int64,
                        device=tokens.device)  # [B, n, S]
    for i in range(num_steps):
        shift = i + 2
        if shift < seq:
            lab = tokens[:, shift:].clone()  # [B, S-shift]
            if valid is not None:
                lab[~valid[:, shift:]] = IGNORE
            labels[:, i, : seq - shift] = lab
    return labels


def row_windows(tokens: torch.Tensor, seq_offsets: torch.Tensor,
                num_steps: int) -> torch.Tensor:
    """``[T, n+1]`` per-row token windows for the row layout (``-1`` past a sequence's end).

    Row ``k`` of a sequence (``tokens[k]`` = the target's token right after ``h_k``) gets
    ``[tokens[k], tokens[k+1], ..., tokens[k+n]]``: column ``j < n`` is the RNN input of step
    ``j``; column ``j + 1`` is the label of step ``j``.
    """
    total = tokens.shape[0]
    win = torch.full((total, num_steps + 1), -1, dtype=torch.int64)  # [T, n+1]
    # sequence end (exclusive) for every row
    lengths = seq_offsets[1:] - seq_offsets[:-1]  # [n_seq]
    ends = torch.repeat_interleave(seq_offsets[1:], lengths)  # [T]
    idx = torch.arange(total)  # [T]
    for j in range(num_steps + 1):
        src = idx + j  # [T]
        ok = src < ends
        win[ok, j] = tokens[src[ok]].to(torch.int64)
    return win


def multistep_loss(logits: torch.Tensor, labels: torch.Tensor,
                   step_weights: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over steps of the mean cross-entropy of each step (Apple's trainer).

    Args:
        logits: ``[..., n, Vd]`` (row layout ``[N, n, Vd]``) or sequence layout ``[B, n, S, Vd]``.
        labels: matching ``[..., n]`` / ``[B, n, S]`` draft ids or ``IGNORE``.

    Returns:
        ``(loss [], per_step_loss [n])``.
    """
    if logits.dim() == 4:  # [B, n, S, Vd] -> [B*S, n, Vd]
        logits = logits.transpose(1, 2).reshape(-1, logits.shape[1], logits.shape[-1])
        labels = labels.transpose(1, 2).reshape(-1, labels.shape[1])
    n = logits.shape[-2]
    per_step = []
    for i in range(n):
        lab = labels[..., i]  # [N]
        if (lab != IGNORE).any():
            per_step.append(F.cross_entropy(logits[..., i, :].float(), lab,
                                            ignore_index=IGNORE))
        else:
            per_step.append(logits.new_zeros((), dtype=torch.float32))
    steps = torch.stack(per_step)  # [n]
    if step_weights is not None:
        return (steps * step_weights).sum(), steps.detach()
    return steps.sum(), steps.detach()


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
                 ) -> dict[int, torch.Tensor]:
    """Per-step counts of labels inside the top-k: ``{k: [n] int64}``.

    ``labels`` are draft ids, ``IGNORE`` for rows that do not count and ``-1`` for a real
    target token outside the draft vocabulary (counts as a miss).
    """
    if logits.dim() == 4:
        logits = logits.transpose(1, 2).reshape(-1, logits.shape[1], logits.shape[-1])
        labels = labels.transpose(1, 2).reshape(-1, labels.shape[1])
    top = logits.topk(max(ks), dim=-1).indices  # [N, n, kmax]
    hit = top == labels.unsqueeze(-1)  # [N, n, kmax]
    return {k: hit[..., :k].any(-1).sum(0) for k in ks}

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


def distill_loss(logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: torch.Tensor | None = None,
                 teacher_valid: torch.Tensor | None = None,
                 soft_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's loss: per step, ``(1 - a) * hard CE + a * soft CE``, summed over steps.

    The hard term is the cross-entropy against the target's greedy token (``labels``,
    ``IGNORE`` outside the draft vocabulary or past the end); the soft term is the
    cross-entropy against the target's own next-token distribution over the draft
    vocabulary, ``softmax(teacher_logits)``, which equals ``KL(target || drafter)`` up to
    the target's entropy (a constant). Each term is a mean over its valid rows.

    Args:
        logits: ``[N, n, Vd]`` drafter logits.
        labels: ``[N, n]`` draft ids or ``IGNORE``.
        teacher_logits: ``[N, n, Vd]`` the target's logits at each step's label position
            (only read when ``soft_weight > 0``).
        teacher_valid: ``[N, n]`` bool, rows with a label position inside the sequence.
        soft_weight: ``a`` in ``[0, 1]``.

    Returns:
        ``(loss [], per_step [n])`` (``per_step`` detached).

    Example: ``soft_weight = 0`` is Apple's loss (:func:`multistep_loss`); with
    ``soft_weight = 1`` and a one-hot teacher the two coincide.
    """
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight must be in [0, 1], got {soft_weight}")
    n, vocab = logits.shape[1], logits.shape[-1]
    logits = logits.float()
    per_step = logits.new_zeros(n)
    if soft_weight < 1.0:
        ce = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1),
                             ignore_index=IGNORE, reduction="none").view(labels.shape)  # [N, n]
        valid = (labels != IGNORE).float()  # [N, n]
        per_step = per_step + (1.0 - soft_weight) * (ce * valid).sum(0) / valid.sum(0).clamp(min=1)
    if soft_weight > 0.0:
        if teacher_logits is None or teacher_valid is None:
            raise ValueError("soft_weight > 0 needs teacher_logits and teacher_valid")
        tv = teacher_valid.float()  # [N, n]
        soft = []
        for i in range(n):  # one step at a time: bounds the [N, Vd] temporaries
            probs = torch.softmax(teacher_logits[:, i].float(), dim=-1)  # [N, Vd]
            ce_i = -(probs * torch.log_softmax(logits[:, i], dim=-1)).sum(-1)  # [N]
            soft.append((ce_i * tv[:, i]).sum() / tv[:, i].sum().clamp(min=1))
        per_step = per_step + soft_weight * torch.stack(soft)
    return per_step.sum(), per_step.detach()

# SPDX-License-Identifier: Apache-2.0
"""Draft vocabulary: the most frequent target tokens of the distillation data."""

from __future__ import annotations

import torch


def token_counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[V]`` int64 occurrence counts of ``tokens`` (any shape of target ids)."""
    return torch.bincount(tokens.reshape(-1).to(torch.int64), minlength=vocab_size)


def choose_draft_vocab(counts: torch.Tensor, size: int | None,
                       always: tuple[int, ...] = ()) -> list[int] | None:
    """Sorted ids of the ``size`` most frequent tokens, always including ``always`` (e.g. EOS).

    Ties are broken by the smaller id, so the choice is deterministic. Returns ``None`` (full
    vocabulary) when ``size`` is ``None`` or not smaller than the vocabulary.
    """
    vocab_size = counts.shape[0]
    if size is None or size >= vocab_size:
        return None
    chosen = {int(a) for a in always}
    order = torch.sort(-counts.to(torch.int64), stable=True).indices  # [V], by -count then id
    for i in order.tolist():
        if len(chosen) >= size:
            break
        chosen.add(i)
    return sorted(chosen)


def coverage(counts: torch.Tensor, draft_vocab: list[int] | None) -> float:
    """Fraction of token occurrences whose id is in ``draft_vocab`` (1.0 without one)."""
    total = int(counts.sum())
    if draft_vocab is None or total == 0:
        return 1.0
    return float(counts[torch.tensor(draft_vocab)].sum()) / total


def target_to_draft(draft_vocab: list[int] | None, vocab_size: int) -> torch.Tensor:
    """``[V]`` int64: target id -> draft id, ``-1`` outside the draft vocabulary."""
    if draft_vocab is None:
        return torch.arange(vocab_size, dtype=torch.int64)
    mapping = torch.full((vocab_size,), -1, dtype=torch.int64)
    mapping[torch.tensor(draft_vocab)] = torch.arange(len(draft_vocab), dtype=torch.int64)
    return mapping

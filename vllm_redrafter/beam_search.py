# SPDX-License-Identifier: Apache-2.0
"""Drafter beam search: ``W`` candidate continuations of ``L - 1`` tokens per request.

Follows Apple's ``recurrent_drafting/modeling_drafter.py`` (``beam_search_candidates``):
every beam starts with the target's own init token; each of the ``L - 1`` drafter steps
feeds the embedding of the beams' last token into the RNN state, scores every (beam,
draft token) pair by the joint log-probability of the whole sequence, and keeps the best
``W``. Scores are float32 sums of per-step drafter log-probs (no length penalty).

Differences from the reference:

- Instead of starting with ``W`` copies of the init token where beams ``1..W-1`` carry a
  score of ``-5e4``, the search starts from the single live beam and grows to ``W``
  candidates, so no step ever expands duplicated beams.
- Masked drafter logits (``draft_top_k``) are ``-inf`` (Apple: ``-5e4``), so a masked
  token can never be chosen. Apple also subtracts the row max first; that changes
  nothing after ``log_softmax`` and is skipped.
- **Fewer than W possible sequences.** When a step has fewer than ``W`` candidates with
  a finite score (tiny vocabulary, ``W > Vd`` at the first step, or ``draft_top_k``
  smaller than ``W``), the missing beams are **copies of the best beam (beam 0) with
  score ``-inf``**. They are valid token sequences, sorted last, and
  :func:`vllm_redrafter.tree.build_tree` deduplicates them into beam 0 at no cost;
  greedy acceptance breaks ties towards the smallest beam, so they never win. Apple's
  reference instead emits junk beams with scores around ``-5e4``.
- Ties between exactly equal finite joint scores are broken by ``torch.topk``:
  deterministic for a given input and device, but not specified to prefer any index.

Glossary: ``B`` batch, ``W`` beam width, ``L`` beam length (includes the init token),
``H`` target hidden size, ``Vd`` draft vocabulary (``= V`` without a draft vocab).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

DEAD_SCORE = float("-inf")
"""Score of a filler beam: a copy of beam 0 when fewer than ``W`` sequences exist."""


class Drafter(Protocol):
    """What the beam search needs from a drafter (``RecurrentDrafter`` satisfies it)."""

    def initial_state(
        self,
        shape_prefix: tuple[int, ...],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor: ...

    def update_state(
        self, state: torch.Tensor, token_embeds: torch.Tensor
    ) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor: ...

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class Beams:
    """Result of :func:`beam_search`.

    Attributes:
        tokens: ``[B, W, L]`` int64 **target** token ids; column 0 is the init token.
        scores: ``[B, W]`` float32 joint drafter log-prob of ``tokens[b, i, 1:]`` given
            the init token, sorted descending (beam 0 is the best). ``-inf`` marks
            filler copies of beam 0 (see the module docstring).
        log_probs: ``[B, W, L-1, Vd]`` float32 or None. ``log_probs[b, i, k]`` is the
            (top-k masked) drafter log-distribution over draft ids that produced
            ``tokens[b, i, k + 1]``; masked entries are ``-inf``. None unless requested.
    """

    tokens: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor | None = None

    @property
    def beam_width(self) -> int:
        """``W``."""
        return self.tokens.shape[1]

    @property
    def beam_length(self) -> int:
        """``L``."""
        return self.tokens.shape[2]


@torch.no_grad()
def beam_search(
    drafter: Drafter,
    embed: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    init_tokens: torch.Tensor,
    beam_width: int,
    beam_length: int,
    *,
    draft_top_k: int | None = None,
    return_log_probs: bool = False,
) -> Beams:
    """Run the drafter's beam search for a batch of requests.

    Args:
        drafter: object with ``initial_state``, ``update_state``, ``logits`` and
            ``to_target_ids`` (see :class:`Drafter`).
        embed: maps ``[*]`` target token ids to ``[*, H]`` embeddings (the target's own
            input embedding).
        hidden: ``[B, H]`` target hidden state at the last committed token.
        init_tokens: ``[B]`` int target token chosen by the target after ``hidden``.
        beam_width: ``W >= 1``.
        beam_length: ``L >= 2`` tokens per beam including the init token (``L - 1``
            drafter steps).
        draft_top_k: if set (``>= 1``), only the top-k drafter logits of each step can
            be chosen; ties at the k-th value are all kept.
        return_log_probs: also return the per-step drafter log-distributions.

    Returns:
        :class:`Beams`.

    Example: ``W = 2``, ``L = 3``, init token ``a``, draft vocabulary ``{x, y}`` and a
    drafter giving these log-probs::

        log q(x | a) = -0.1     log q(y | a) = -2.3
        log q(. | a x) = (-0.4, -1.1)     log q(. | a y) = (-0.01, -4.6)

    Step 1 keeps ``a x (-0.1)`` and ``a y (-2.3)``; step 2 ranks ``a x x (-0.5)``,
    ``a x y (-1.2)``, ``a y x (-2.31)``, ``a y y (-6.9)`` and returns
    ``tokens = [[a x x], [a x y]]``, ``scores = [-0.5, -1.2]``. With ``W = 5`` and
    ``L = 2`` it would return ``[[a x], [a y], [a x], [a x], [a x]]`` with scores
    ``[-0.1, -2.3, -inf, -inf, -inf]``.
    """
    batch = _check_inputs(hidden, init_tokens, beam_width, beam_length, draft_top_k)
    device = hidden.device

    tokens = init_tokens.to(device=device, dtype=torch.int64).view(batch, 1, 1)
    scores = torch.zeros(batch, 1, dtype=torch.float32, device=device)  # [B, 1]
    state = drafter.initial_state((batch, 1), hidden.dtype, device)  # [B, 1, H]
    history: torch.Tensor | None = None  # [B, Wc, t, Vd]

    for _ in range(beam_length - 1):
        state = drafter.update_state(state, embed(tokens[:, :, -1]))  # [B, Wc, H]
        context = hidden[:, None, :].expand(state.shape)  # [B, Wc, H]
        log_q = _draft_log_probs(drafter.logits(context, state), draft_top_k)
        # log_q: [B, Wc, Vd]
        scores, parent, draft_ids = _select_top(scores, log_q, beam_width)  # [B, W] x3
        new_tokens = drafter.to_target_ids(draft_ids)  # [B, W]
        tokens = torch.cat([_gather_beams(tokens, parent), new_tokens[:, :, None]], 2)
        state = _gather_beams(state, parent)  # [B, W, H]
        if return_log_probs:
            step = _gather_beams(log_q, parent)[:, :, None]  # [B, W, 1, Vd]
            history = (
                step
                if history is None
                else torch.cat([_gather_beams(history, parent), step], dim=2)
            )

    return Beams(tokens=tokens, scores=scores, log_probs=history)


def _check_inputs(
    hidden: torch.Tensor,
    init_tokens: torch.Tensor,
    beam_width: int,
    beam_length: int,
    draft_top_k: int | None,
) -> int:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [B, H], got {tuple(hidden.shape)}")
    batch = hidden.shape[0]
    if init_tokens.shape != (batch,):
        raise ValueError(
            f"init_tokens must be [B={batch}], got {tuple(init_tokens.shape)}"
        )
    if init_tokens.dtype.is_floating_point:
        raise ValueError(f"init_tokens must be integer ids, got {init_tokens.dtype}")
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if beam_length < 2:
        raise ValueError(
            f"beam_length must be >= 2 (it includes the init token), got {beam_length}"
        )
    if draft_top_k is not None and draft_top_k < 1:
        raise ValueError(f"draft_top_k must be None or >= 1, got {draft_top_k}")
    return batch


def _draft_log_probs(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Float32 log-softmax of drafter logits, optionally top-k masked.

    Args:
        logits: ``[..., Vd]`` raw drafter logits (any float dtype).
        top_k: keep the entries ``>=`` the k-th largest of each row; None keeps all.

    Returns:
        ``[..., Vd]`` float32 log-probs, ``-inf`` on masked entries.
        Example: logits ``[1, 3, 2]``, ``top_k = 2`` -> ``log_softmax([-inf, 3, 2])``.
    """
    logits = logits.float()  # [..., Vd]
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.log_softmax(dim=-1)


def _select_top(
    scores: torch.Tensor, log_q: torch.Tensor, beam_width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``W`` best (beam, token) extensions; fill impossible ones with beam 0.

    Args:
        scores: ``[B, Wc]`` float32 joint log-prob of the current beams.
        log_q: ``[B, Wc, Vd]`` float32 next-token log-probs of each current beam.
        beam_width: ``W``.

    Returns:
        ``(scores, parent, draft_ids)``, each ``[B, W]``: float32 scores sorted
        descending, int64 parent beam and int64 draft id. Entries without a finite
        score (``-inf``) are copies of entry 0.

    Example: ``Wc = 1``, ``Vd = 2``, ``W = 3``, ``log_q = [[[-0.2, -1.7]]]`` ->
    ``scores [[-0.2, -1.7, -inf]]``, ``parent [[0, 0, 0]]``, ``draft_ids [[0, 1, 0]]``.
    """
    batch, _, vocab = log_q.shape
    candidates = (log_q + scores[:, :, None]).flatten(1)  # [B, Wc*Vd]
    k = min(beam_width, candidates.shape[1])
    top_scores, flat = candidates.topk(k, dim=1)  # [B, k] each, sorted descending
    if k < beam_width:
        missing = beam_width - k
        top_scores = torch.cat(
            [top_scores, top_scores.new_full((batch, missing), DEAD_SCORE)], dim=1
        )
        flat = torch.cat([flat, flat[:, :1].expand(batch, missing)], dim=1)
    dead = torch.isneginf(top_scores)  # [B, W]
    flat = torch.where(dead, flat[:, :1], flat)  # [B, W]
    return top_scores, flat // vocab, flat % vocab


def _gather_beams(values: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``out[b, i] = values[b, parent[b, i]]``.

    Args:
        values: ``[B, Wc, ...]``.
        parent: ``[B, W]`` int64 indices into ``Wc``.

    Returns:
        ``[B, W, ...]``.
    """
    rows = torch.arange(values.shape[0], device=values.device)[:, None]  # [B, 1]
    return values[rows, parent]

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
  The one-beam chain without scores takes an ``argmax`` (the first of equal maxima).

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
            filler copies of beam 0 (see the module docstring). None when the search
            was asked not to keep them (``with_scores=False``).
        log_probs: ``[B, W, L-1, Vd]`` float32 or None. ``log_probs[b, i, k]`` is the
            (top-k masked) drafter log-distribution over draft ids that produced
            ``tokens[b, i, k + 1]``; masked entries are ``-inf``. None unless requested.
    """

    tokens: torch.Tensor
    scores: torch.Tensor | None
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
    with_scores: bool = True,
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
        with_scores: False returns ``Beams.scores = None``; with one beam that skips
            each step's log-sum-exp (:func:`_chain_search`).

    Returns:
        :class:`Beams`. With ``W = 1`` (and no ``return_log_probs``) the search is the
        greedy chain of :func:`_chain_search`: the same tokens without the beam
        bookkeeping.

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
    _check_inputs(hidden, init_tokens, beam_width, beam_length, draft_top_k)
    if beam_width == 1 and not return_log_probs:
        return _chain_search(drafter, embed, hidden, init_tokens, beam_length,
                             draft_top_k, with_scores)
    beams = _wide_search(drafter, embed, hidden, init_tokens, beam_width, beam_length,
                         draft_top_k, return_log_probs)
    return beams if with_scores else Beams(tokens=beams.tokens, scores=None,
                                           log_probs=beams.log_probs)


def _wide_search(
    drafter: Drafter,
    embed: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    init_tokens: torch.Tensor,
    beam_width: int,
    beam_length: int,
    draft_top_k: int | None,
    return_log_probs: bool,
) -> Beams:
    """The general beam search (any ``W``): ranks every (beam, candidate) extension each
    step and gathers the survivors' tokens and states (arguments as :func:`beam_search`,
    already checked)."""
    batch, device = hidden.shape[0], hidden.device
    tokens = init_tokens.to(device=device, dtype=torch.int64).view(batch, 1, 1)
    scores = torch.zeros(batch, 1, dtype=torch.float32, device=device)  # [B, 1]
    state = drafter.initial_state((batch, 1), hidden.dtype, device)  # [B, 1, H]
    history: torch.Tensor | None = None  # [B, Wc, t, Vd]

    for _ in range(beam_length - 1):
        state = drafter.update_state(state, embed(tokens[:, :, -1]))  # [B, Wc, H]
        context = hidden[:, None, :].expand(state.shape)  # [B, Wc, H]
        if return_log_probs:
            log_q = _draft_log_probs(drafter.logits(context, state), draft_top_k)
            # log_q: [B, Wc, Vd]
            cand_lp, cand_ids = log_q, None
        else:
            cand_lp, cand_ids = _step_candidates(
                drafter, context, state, beam_width, draft_top_k)  # [B, Wc, K] x2
        scores, parent, draft_ids = _select_top(scores, cand_lp, beam_width, cand_ids)
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


def _chain_search(
    drafter: Drafter,
    embed: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    init_tokens: torch.Tensor,
    beam_length: int,
    draft_top_k: int | None,
    with_scores: bool,
) -> Beams:
    """Beam search with one beam: the drafter's most likely token at every step.

    One beam keeps each step's best extension of the only sequence, so no candidates
    are ranked and no beams are gathered; the tokens are written into one preallocated
    ``[B, 1, L]`` tensor. A ``draft_top_k`` mask cannot remove a row's best token, so it
    only changes the scores. Without scores, a drafter with ``best_draft(hidden,
    state)`` (``RecurrentDrafter``: an argmax of its logits) answers directly and no
    log-sum-exp is computed; otherwise each step takes its row's top candidate
    (:func:`_step_candidates` with ``K = 1``).

    Example: init token ``a``, drafter log-probs ``log q(. | a) = (x: -0.1, y: -2.3)``
    and ``log q(. | a x) = (x: -0.4, y: -1.1)`` -> tokens ``[[a, x, x]]``, score
    ``[-0.5]`` (what :func:`beam_search`'s docstring example keeps as its best beam).

    Returns:
        :class:`Beams` with ``tokens [B, 1, L]`` and ``scores [B, 1]`` float32 (None
        unless ``with_scores``).
    """
    batch, device = hidden.shape[0], hidden.device
    tokens = torch.empty(batch, 1, beam_length, dtype=torch.int64, device=device)
    tokens[:, 0, 0] = init_tokens  # [B, 1, L]
    scores = (torch.zeros(batch, 1, dtype=torch.float32, device=device)
              if with_scores else None)  # [B, 1]
    state = drafter.initial_state((batch, 1), hidden.dtype, device)  # [B, 1, H]
    context = hidden[:, None, :]  # [B, 1, H]
    best = None if with_scores else getattr(drafter, "best_draft", None)
    for step in range(1, beam_length):
        state = drafter.update_state(state, embed(tokens[:, :, step - 1]))  # [B, 1, H]
        if best is not None:
            draft_ids = best(context, state)  # [B, 1]
        else:
            log_q, ids = _step_candidates(drafter, context, state, 1, draft_top_k)
            draft_ids = ids[:, :, 0]  # [B, 1]
            if scores is not None:
                scores = scores + log_q[:, :, 0]
        tokens[:, :, step] = drafter.to_target_ids(draft_ids)
    return Beams(tokens=tokens, scores=scores)


def _check_inputs(
    hidden: torch.Tensor,
    init_tokens: torch.Tensor,
    beam_width: int,
    beam_length: int,
    draft_top_k: int | None,
) -> None:
    """Raise ``ValueError`` naming the first bad argument of :func:`beam_search`."""
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
    scores: torch.Tensor,
    log_q: torch.Tensor,
    beam_width: int,
    ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``W`` best (beam, token) extensions; fill impossible ones with beam 0.

    Args:
        scores: ``[B, Wc]`` float32 joint log-prob of the current beams.
        log_q: ``[B, Wc, K]`` float32 log-probs of each current beam's candidate
            tokens: the whole draft vocabulary (``K = Vd``, ``ids`` None) or each row's
            best ``K`` (:func:`top_candidates`).
        beam_width: ``W``.
        ids: ``[B, Wc, K]`` int64 draft id of each candidate, or None when candidate
            ``j`` is draft id ``j``.

    Returns:
        ``(scores, parent, draft_ids)``, each ``[B, W]``: float32 scores sorted
        descending, int64 parent beam and int64 draft id. Entries without a finite
        score (``-inf``) are copies of entry 0.

    Example: ``Wc = 1``, ``Vd = 2``, ``W = 3``, ``log_q = [[[-0.2, -1.7]]]`` ->
    ``scores [[-0.2, -1.7, -inf]]``, ``parent [[0, 0, 0]]``, ``draft_ids [[0, 1, 0]]``.
    """
    batch, _, width = log_q.shape
    candidates = (log_q + scores[:, :, None]).flatten(1)  # [B, Wc*K]
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
    parent = flat // width  # [B, W]
    if ids is None:
        return top_scores, parent, flat % width
    return top_scores, parent, ids.flatten(1).gather(1, flat)


def _step_candidates(
    drafter: Drafter,
    context: torch.Tensor,
    state: torch.Tensor,
    beam_width: int,
    top_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each beam's best ``K = min(W, Vd)`` next draft ids and their log-probs.

    Uses the drafter's own ``top_candidates`` when it has one (a vocab-sharded head
    merges per-shard candidates there); otherwise :func:`top_candidates` on its logits.
    Returns ``([B, Wc, K] float32, [B, Wc, K] int64)``.
    """
    own = getattr(drafter, "top_candidates", None)
    if own is not None:
        return own(context, state, beam_width, top_k)
    return top_candidates(drafter.logits(context, state), beam_width, top_k)


def top_candidates(
    logits: torch.Tensor, k: int, top_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best entries of each row as float32 log-probs, without a float32 copy.

    A beam's ``W`` best extensions are among its own row's ``W`` best tokens, so beam
    search only needs each row's top ``k = W`` log-probs: ``logit - logsumexp(row)``.
    The log-sum-exp is computed on one temporary in the logits' own dtype (summed in
    float32), so the peak is about twice the logits, never three float32 copies.

    Args:
        logits: ``[..., Vd]`` raw drafter logits (any float dtype).
        k: candidates per row (clipped to ``Vd``).
        top_k: ``draft_top_k`` mask: only entries ``>=`` the row's ``top_k``-th largest
            count (in the log-sum-exp too); the others are ``-inf``.

    Returns:
        ``(log_probs [..., K] float32 sorted descending, ids [..., K] int64)``,
        ``K = min(k, Vd)``. Example: logits ``[1., 3., 2.]``, ``k = 2``, no mask ->
        ids ``[1, 2]``, log-probs ``[3 - lse, 2 - lse]`` with ``lse = log(e + e^3 + e^2)``;
        with ``top_k = 1`` -> log-probs ``[0, -inf]``.
    """
    vocab = logits.shape[-1]
    values, ids = logits.topk(min(k, vocab), dim=-1)  # [..., K] each
    kth = None
    if top_k is not None and top_k < vocab:
        kth = values[..., top_k - 1 : top_k] if top_k <= k else (
            logits.topk(top_k, dim=-1).values[..., -1:])  # [..., 1]
    log_z = _row_log_sum_exp(logits, values[..., :1], kth)  # [..., 1] float32
    log_probs = values.float() - log_z  # [..., K]
    if kth is not None:
        log_probs = log_probs.masked_fill(values < kth, DEAD_SCORE)
    return log_probs, ids


def _row_log_sum_exp(
    logits: torch.Tensor, row_max: torch.Tensor, kth: torch.Tensor | None
) -> torch.Tensor:
    """``log(sum(exp(logits)))`` per row over the entries ``>= kth`` (all if None).

    ``logits [..., Vd]``, ``row_max [..., 1]`` (each row's largest entry) ->
    ``[..., 1]`` float32. One ``[..., Vd]`` temporary in the logits' dtype.
    """
    shifted = logits - row_max  # [..., Vd], logits dtype
    if kth is not None:
        shifted.masked_fill_(logits < kth, float("-inf"))
    total = shifted.exp_().sum(dim=-1, keepdim=True, dtype=torch.float32)  # [..., 1]
    return row_max.float() + total.log()


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


def shard_candidates(
    local_logits: torch.Tensor, offset: int, vocab: int, k: int, top_k: int | None = None
) -> torch.Tensor:
    """One vocabulary shard's share of :func:`top_candidates`, packed for an all-gather.

    Args:
        local_logits: ``[N, S]`` this shard's logits (columns ``offset .. offset+S-1`` of
            the padded vocabulary; columns ``>= vocab`` are padding and never chosen).
        offset: first global column of the shard.
        vocab: ``Vd`` (real columns).
        k: candidates per row (``W``).
        top_k: ``draft_top_k`` or None.

    Returns:
        ``[N, 2m + 1]`` float32, ``m = min(max(k, top_k or 0), S)``: the shard's ``m``
        best values, their global ids (exact as float32 below 2**24), and the shard's
        log-sum-exp (used when ``top_k`` is None). Merge with
        :func:`merge_shard_candidates`. Example: ``S = 3``, ``offset = 3``, ``vocab = 5``,
        logits ``[[1., 4., 9.]]``, ``k = 1``: column 5 is padding, so the row packs
        ``[4., 4., log(e + e^4)]``.
    """
    width = local_logits.shape[1]
    valid = vocab - offset
    logits = local_logits
    if valid < width:
        logits = local_logits.clone()
        logits[:, max(valid, 0):] = float("-inf")
    m = min(max(k, top_k or 0), width)
    values, ids = logits.topk(m, dim=-1)  # [N, m]
    if top_k is None:
        log_z = _row_log_sum_exp(logits, values[:, :1], None)  # [N, 1]
    else:
        log_z = torch.zeros_like(values[:, :1], dtype=torch.float32)
    return torch.cat([values.float(), (ids + offset).float(), log_z], dim=1)


def merge_shard_candidates(
    gathered: torch.Tensor, k: int, top_k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_candidates` of the whole row from every shard's :func:`shard_candidates`.

    Args:
        gathered: ``[N, tp, 2m + 1]`` float32 (the all-gather of the packed shards).
        k: candidates per row.
        top_k: ``draft_top_k`` or None (the row's ``top_k`` best are among the shards'
            ``m >= top_k`` best; ties at the k-th value beyond a shard's ``m`` are not
            counted, unlike the unsharded mask).

    Returns:
        ``(log_probs [N, K] float32, ids [N, K] int64)``, as :func:`top_candidates`.
    """
    rows, shards, packed = gathered.shape
    m = (packed - 1) // 2
    values = gathered[:, :, :m].reshape(rows, shards * m)  # [N, tp*m]
    ids = gathered[:, :, m : 2 * m].reshape(rows, shards * m).long()  # [N, tp*m]
    kth = None
    if top_k is None:
        log_z = gathered[:, :, -1].logsumexp(dim=1, keepdim=True)  # [N, 1]
    else:
        kth = values.topk(min(top_k, shards * m), dim=1).values[:, -1:]  # [N, 1]
        log_z = values.masked_fill(values < kth, float("-inf")).logsumexp(1, keepdim=True)
    best, position = values.topk(min(k, shards * m), dim=1)  # [N, K]
    log_probs = best - log_z
    if kth is not None:
        log_probs = log_probs.masked_fill(best < kth, DEAD_SCORE)
    return log_probs, ids.gather(1, position)

# SPDX-License-Identifier: Apache-2.0
"""Offline acceptance: replay the target's greedy responses the way decoding walks them.

For one response ``x`` (prompt of length ``P``, then the target's greedy tokens), decoding
with speculation proceeds like the engine does:

- after the prefill the target emitted ``x[P]``; the drafter reads the target's hidden
  state ``h[P-1]`` (the row that produced ``x[P]``) with init token ``x[P]``;
- at a step with context row ``p`` the drafter's ``W`` beams draft ``L - 1`` tokens after
  ``x[p+1]``; a beam's accepted length ``k`` is its longest prefix equal to
  ``x[p+2 : p+L+1]`` (greedy acceptance: the response *is* the target's argmax);
  **chain** verification uses beam 0, **tree** verification the longest over beams (the
  deduplicated tree's greedy walk finds exactly that path);
- the step emits ``k + 1`` tokens and the next context row is ``p + k + 1``.

With look-up options (:func:`lookup_walk`), each step's tree joins the beams with the
context look-up branches of :mod:`vllm_redrafter.lookup` under the tree's node budget.

``tau = emitted / steps`` (the engine's mean acceptance length, ``1 + accepted / drafts``);
acceptance at depth ``d`` is the share of steps that accepted ``>= d`` drafts.

Beams for every position of a response are drafted in one batched beam search (the walk
only reads them), so the cost is one target forward plus ``L - 1`` drafter steps per
response. Pure torch + transformers; no vLLM.

Glossary: ``S`` response positions drafted from, ``W`` beams, ``L`` beam length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from vllm_redrafter.beam_search import beam_search
from vllm_redrafter.config import LookupOptions
from vllm_redrafter.lookup import (
    ContextIndex,
    SourceCounts,
    cut_untrusted,
    fill_order,
    lookup_depth,
    merge_branches,
    path_sources,
    trusted,
)
from vllm_redrafter.steps import TreeDraft


@dataclass
class WalkStats:
    """Accumulated walk counters of one verification mode.

    Attributes:
        steps: drafted (verification) steps.
        accepted: drafted tokens accepted.
        per_depth: ``per_depth[d - 1]`` = steps that accepted ``>= d`` drafts.
        nodes: drafted tree nodes summed over steps (look-up walks only; 0 otherwise).
        skipped: steps whose beams were left out because a look-up continuation was
            trusted (``skip_beams_match``; look-up walks only).
    """

    steps: int = 0
    accepted: int = 0
    per_depth: list[int] = field(default_factory=list)
    nodes: int = 0
    skipped: int = 0

    def add(self, k: int, depth: int) -> None:
        """Record one step that accepted ``k`` of ``depth`` drafted tokens."""
        if len(self.per_depth) < depth:
            self.per_depth += [0] * (depth - len(self.per_depth))
        self.steps += 1
        self.accepted += k
        for d in range(k):
            self.per_depth[d] += 1

    def merge(self, other: WalkStats) -> None:
        """Add ``other``'s counters to these."""
        for d, count in enumerate(other.per_depth):
            if d >= len(self.per_depth):
                self.per_depth.append(0)
            self.per_depth[d] += count
        self.steps += other.steps
        self.accepted += other.accepted
        self.nodes += other.nodes
        self.skipped += other.skipped

    @property
    def tau(self) -> float | None:
        """Mean tokens per step, ``1 + accepted / steps``."""
        return None if self.steps == 0 else 1.0 + self.accepted / self.steps

    @property
    def acceptance_per_depth(self) -> list[float]:
        """Share of steps accepting at least ``d`` drafts, ``d = 1 .. L - 1``."""
        return [c / self.steps for c in self.per_depth] if self.steps else []


def match_lengths(beams: torch.Tensor, sequence: torch.Tensor, start: int) -> torch.Tensor:
    """Accepted length of every beam at every drafted position.

    Args:
        beams: ``[S, W, L]`` beams drafted from context rows ``start .. start + S - 1``
            (column 0 = the init token ``sequence[p + 1]``).
        sequence: ``[T]`` prompt + response token ids.
        start: context row of the first beam set.

    Returns:
        ``[S, W]`` int64: leading matches of ``beams[s, w, 1:]`` with
        ``sequence[p + 2 : p + L + 1]`` (``p = start + s``); the sequence's end stops
        matching. Example: sequence ``[5, 6, 7, 8]``, ``start = 0``, beams
        ``[[[6, 7, 9]]]`` -> ``[[1]]``.
    """
    num, _, length = beams.shape
    padded = torch.cat([sequence, sequence.new_full((length + 1,), -1)])  # [T + L + 1]
    rows = start + 2 + torch.arange(num)[:, None] + torch.arange(length - 1)[None]  # [S, L-1]
    wanted = padded[rows]  # [S, L-1]
    ok = beams[:, :, 1:] == wanted[:, None, :]  # [S, W, L-1]
    return ok.to(torch.int64).cumprod(dim=2).sum(dim=2)  # [S, W]


def walk(lengths: Sequence[int], start: int, end: int, depth: int) -> WalkStats:
    """Walk the per-position accepted lengths like decoding does.

    Args:
        lengths: accepted length when drafting from context row ``start + i``.
        start: first context row (``P - 1``).
        end: last context row that still has a token to emit after it (``T - 2``).
        depth: drafted tokens per beam (``L - 1``).

    Example: ``lengths = [2, 0, 0, 1, 0]``, ``start = 0``, ``end = 4``: rows 0 (k=2),
    3 (k=1), then row 5 is past the end: 2 steps, 3 accepted, tau 2.5.
    """
    stats = WalkStats()
    p = start
    while p <= end:
        k = int(lengths[p - start])
        stats.add(k, depth)
        p += k + 1
    return stats


@dataclass(frozen=True)
class DraftedResponse:
    """One response with the beams drafted at every context row.

    Attributes:
        sequence: ``[T]`` prompt + response token ids.
        beams: ``[S, W, L]`` beams drafted from context rows ``start .. end``.
        start: first context row (``P - 1``).
        end: last context row with a token to emit after it (``T - 2``).
    """

    sequence: torch.Tensor
    beams: torch.Tensor
    start: int
    end: int


@torch.inference_mode()
def draft_response(
    target: torch.nn.Module,
    drafter: torch.nn.Module,
    token_ids: Sequence[int],
    prompt_len: int,
    beam_width: int,
    beam_length: int,
    *,
    draft_top_k: int | None = None,
) -> DraftedResponse | None:
    """One target forward and one batched beam search over every context row of a
    response (None when the response has no token to draft for).

    Args:
        target: a transformers causal LM (``.model`` returns post-norm hidden states,
            ``.get_input_embeddings()`` the table the drafter reads).
        drafter: a :class:`~vllm_redrafter.drafter.RecurrentDrafter` (in the target's
            dtype or, as the engine runs it, the one ``draft_dtype`` resolves to).
        token_ids: prompt + response.
        prompt_len: ``P``.
    """
    sequence = torch.tensor(list(token_ids), dtype=torch.int64)  # [T]
    start, end = prompt_len - 1, sequence.numel() - 2
    if end < start:
        return None
    hidden = target.model(input_ids=sequence[None]).last_hidden_state[0]  # [T, H]
    rows = torch.arange(start, end + 1)  # [S]
    dtype = drafter.dtype  # the drafter may run in 16 bits (draft_dtype)
    table = target.get_input_embeddings()
    beams = beam_search(drafter, lambda ids: table(ids).to(dtype), hidden[rows].to(dtype),
                        sequence[rows + 1], beam_width, beam_length,
                        draft_top_k=draft_top_k).tokens  # [S, W, L]
    return DraftedResponse(sequence, beams, start, end)


def chain_and_tree(drafted: DraftedResponse) -> tuple[WalkStats, WalkStats]:
    """Chain (beam 0) and drafter-only tree (best beam) walks of a drafted response."""
    lengths = match_lengths(drafted.beams, drafted.sequence, drafted.start)  # [S, W]
    depth = drafted.beams.shape[2] - 1
    chain = walk(lengths[:, 0].tolist(), drafted.start, drafted.end, depth)
    tree = walk(lengths.max(dim=1).values.tolist(), drafted.start, drafted.end, depth)
    return chain, tree


def lookup_walk(drafted: DraftedResponse, options: LookupOptions, budget: int
                ) -> tuple[WalkStats, SourceCounts]:
    """Walk a response with look-up branches merged into each step's tree.

    At context row ``p`` the committed tokens are ``sequence[: p + 2]`` (the init token
    ``sequence[p + 1]`` last); the tree is :func:`~vllm_redrafter.lookup.merge_branches`
    of the beams and the look-up candidates in :func:`~vllm_redrafter.lookup.fill_order`
    under ``budget`` drafted nodes, exactly as the proposer builds it (the look-up
    branches alone where one is :func:`~vllm_redrafter.lookup.trusted`, as the proposer
    does at batch 1; trusted continuations up to ``trusted_depth`` tokens); greedy
    acceptance descends the tree along the response's next tokens.

    Returns:
        ``(stats, accepted tokens by source)``.
    """
    sequence = drafted.sequence.tolist()
    beams = drafted.beams[:, :, 1:].tolist()  # [S][W][L-1]
    depth = drafted.beams.shape[2] - 1
    deep = lookup_depth(depth, options.trusted_depth)  # trusted continuations' length
    index = ContextIndex(options.min_match, options.max_match)
    stats, sources = WalkStats(), SourceCounts()
    p = drafted.start
    while p <= drafted.end:
        index.sync(sequence[: p + 2])
        found = cut_untrusted(index.candidates(options.max_candidates, deep), depth,
                              options.skip_beams_match)
        if trusted(found, options.skip_beams_match, depth):  # the engine skips the search
            branches = fill_order([], found, 0)
            stats.skipped += 1
        else:
            branches = fill_order(beams[p - drafted.start], found, options.rank)
        tree, bits = merge_branches(sequence[p + 1], branches, budget)
        node = _descend(tree, sequence[p + 2 : p + 2 + deep])
        accepted = path_sources(tree, bits, node)
        sources.add(accepted)
        stats.add(len(accepted), deep)
        stats.nodes += tree.num_nodes - 1
        p += len(accepted) + 1
    return stats, sources


def _descend(tree: TreeDraft, wanted: Sequence[int]) -> int:
    """Greedy acceptance on a known continuation: the deepest node whose path from the
    root spells a prefix of ``wanted``. Example: tokens ``A B C E``, parents
    ``-1 0 1 1``, wanted ``[B, E, F]`` -> node 3."""
    node = 0
    for token in wanted:
        child = next((c for c in range(node + 1, tree.num_nodes)
                      if tree.parents[c] == node and tree.tokens[c] == token), None)
        if child is None:
            break
        node = child
    return node

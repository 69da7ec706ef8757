# SPDX-License-Identifier: Apache-2.0
"""Context look-up branches for the draft tree (vLLM-free).

A dynamic tree does not care where a branch came from. Besides the drafter's ``W``
beams, a request's own tokens (prompt and output so far) often contain the
continuation: answers repeat their own phrases, summaries and extractions copy the
input. This module finds such continuations and merges them with the beams into one
prefix tree under one node budget.

- :class:`ContextIndex`: per request, an incremental index of every n-gram
  (``min_match <= n <= max_match``) of its tokens to the positions where it ended. A
  step appends only the new tokens (``max_match - min_match + 1`` dict updates per
  token), never rescans the history.
- :meth:`ContextIndex.candidates`: continuations after earlier occurrences of the
  newest tokens, longest match first, most recent occurrence first, distinct.
- :func:`trusted`: whether the best continuation is trusted enough that the drafter's
  beam search can be skipped (option ``skip_beams_match``); :func:`lookup_depth` and
  :func:`cut_untrusted`: trusted continuations may run deeper than the tree's depth
  (option ``trusted_depth``), the others are cut to it.
- :func:`fill_order` and :func:`merge_branches`: the explicit policy that picks which
  branches fill the node budget (beams ``0 .. rank-1``, then the look-up branches, then
  the remaining beams; every branch adds its new nodes until the budget is full) and the
  trie that merges them, recording where each node came from.

Worked example: tokens ``the cat sat on the mat . the cat`` (``min_match = 2``, depth
2): the newest 2-gram ``the cat`` ended before at position 1, so the look-up continuation
is ``sat on``; with beams ``[cat, sat, in]`` and ``[cat, ran, .]`` (root ``cat``),
``rank = 1`` and a budget of 4 drafted nodes the fill order is beam 0, the look-up
branch, beam 1::

    node     0    1    2    3    4
    token    cat  sat  in   on   ran
    parent   -1   0    1    1    0
    source   -    D+L  D    L    D        (D drafter, L look-up; beam 1's "." did not
                                           fit the budget)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_redrafter.steps import TreeDraft

DRAFTER = 1
"""Source bit of a node drafted by the drafter's beam search."""

LOOKUP = 2
"""Source bit of a node found by context look-up."""

OCCURRENCES_KEPT = 8
"""Most recent end positions remembered per n-gram (older ones are dropped)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One look-up continuation.

    Attributes:
        tokens: the continuation (tokens after the request's newest token).
        match: length of the matched suffix (n-gram) it follows.
    """

    tokens: tuple[int, ...]
    match: int


class ContextIndex:
    """Incremental n-gram index of one request's tokens.

    Args:
        min_match: shortest suffix matched (tokens).
        max_match: longest suffix matched.

    Example: after ``extend([5, 6, 7, 5, 6])`` with ``min_match = max_match = 2``,
    ``candidates(2, 3)`` is ``[Candidate((7, 5, 6), 2)]`` (``5 6`` ended at position 1
    before, ``7 5 6`` follows it); ``candidates(2, 1)`` is ``[Candidate((7,), 2)]``.
    """

    def __init__(self, min_match: int, max_match: int) -> None:
        if not 1 <= min_match <= max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match}, {max_match}")
        self.min_match = min_match
        self.max_match = max_match
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], deque[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens: Sequence[int]) -> None:
        """Append tokens and index every n-gram that ends at one of them."""
        for token in new_tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 1
            for n in range(self.min_match, min(self.max_match, end + 1) + 1):
                key = tuple(self.tokens[end - n + 1 : end + 1])
                ends = self._ends.get(key)
                if ends is None:
                    ends = self._ends[key] = deque(maxlen=OCCURRENCES_KEPT)
                ends.append(end)

    def sync(self, history: Sequence[int]) -> None:
        """Bring the index up to ``history`` (the request's committed tokens).

        Only the tokens past the indexed length are added. A history that is not a
        continuation of the indexed tokens (same length check and same last indexed
        token) rebuilds the index from scratch.
        """
        known = len(self.tokens)
        if len(history) < known or (known and int(history[known - 1]) != self.tokens[-1]):
            self.tokens, self._ends = [], {}
            known = 0
        if len(history) > known:
            self.extend([int(t) for t in history[known:]])

    def candidates(self, max_candidates: int, depth: int) -> list[Candidate]:
        """Up to ``max_candidates`` distinct continuations of at most ``depth`` tokens.

        Longest matching suffix first (``max_match`` down to ``min_match``), and within
        one length the most recent earlier occurrence first. A continuation equal to, or
        a prefix of, one already found is skipped (it would add no tree node).
        """
        found: list[Candidate] = []
        last = len(self.tokens) - 1
        if max_candidates < 1 or depth < 1 or last < 0:
            return found
        for n in range(min(self.max_match, last + 1), self.min_match - 1, -1):
            ends = self._ends.get(tuple(self.tokens[last - n + 1 :]))
            for end in reversed(ends or ()):
                if end >= last:
                    continue  # the suffix itself
                cont = tuple(self.tokens[end + 1 : end + 1 + depth])
                if any(c.tokens[: len(cont)] == cont for c in found):
                    continue
                found.append(Candidate(cont, n))
                if len(found) == max_candidates:
                    return found
        return found


def trusted(found: Sequence[Candidate], skip_match: int | None, depth: int) -> bool:
    """Whether the best look-up continuation may stand in for the drafter's beams: it
    follows a match of at least ``skip_match`` tokens and is ``depth`` tokens long.

    Example: ``[Candidate((7, 5, 6), 3)]`` with ``skip_match = 3``, ``depth = 3`` -> True;
    with ``depth = 4`` (too short) or ``skip_match = 4`` (match too short) -> False.
    """
    return (skip_match is not None and len(found) > 0 and found[0].match >= skip_match
            and len(found[0].tokens) >= depth)


def lookup_depth(depth: int, trusted_depth: int | None) -> int:
    """How far look-up continuations are read at a step of tree depth ``depth``: the
    tree's depth, or ``trusted_depth`` where that is deeper (option ``trusted_depth``).

    Example: ``lookup_depth(4, None) == 4``, ``lookup_depth(4, 8) == 8``,
    ``lookup_depth(2, 8) == 8`` (a trusted continuation is as long at any depth).
    """
    return depth if trusted_depth is None else max(depth, trusted_depth)


def cut_untrusted(found: Sequence[Candidate], depth: int, skip_match: int | None
                  ) -> list[Candidate]:
    """Continuations read past the tree's depth, with every one that is not trusted
    (match shorter than ``skip_match``) cut back to ``depth`` tokens; trusted ones keep
    their length (option ``trusted_depth``).

    Example: ``[Candidate((1, 2, 3, 4, 5, 6), 3), Candidate((7, 8, 9, 1, 2, 3), 1)]``,
    ``depth = 4``, ``skip_match = 3`` -> ``(1, 2, 3, 4, 5, 6)`` and ``(7, 8, 9, 1)``.
    """
    kept = []
    for c in found:
        if skip_match is not None and c.match >= skip_match:
            kept.append(c)
        else:
            kept.append(Candidate(c.tokens[:depth], c.match))
    return kept


@dataclass(frozen=True, slots=True)
class Branch:
    """A path below the root, and where it came from (:data:`DRAFTER` or
    :data:`LOOKUP`)."""

    tokens: tuple[int, ...]
    source: int


def fill_order(beams: Sequence[Sequence[int]], lookups: Sequence[Candidate],
               rank: int) -> list[Branch]:
    """The order in which branches claim the node budget.

    Args:
        beams: the drafter's beams **without** the root (best first).
        lookups: look-up candidates (best first).
        rank: beams placed before the look-up branches.

    Example: beams ``b0, b1, b2``, look-ups ``l0, l1``, ``rank = 1`` ->
    ``b0, l0, l1, b1, b2``.
    """
    drafted = [Branch(tuple(b), DRAFTER) for b in beams]
    found = [Branch(tuple(c.tokens), LOOKUP) for c in lookups]
    return drafted[:rank] + found + drafted[rank:]


def merge_branches(root: int, branches: Sequence[Branch], budget: int
                   ) -> tuple[TreeDraft, tuple[int, ...]]:
    """Merge branches into one prefix tree (a trie below ``root``).

    Branches are inserted in order; each adds the nodes its tokens do not share with
    the tree so far, until ``budget`` drafted nodes exist (a branch that does not fit
    whole keeps its leading part). Nodes are numbered in insertion order, so parents
    precede children and the highest-priority branches come first (vLLM's truncation of
    a draft list keeps them). Siblings always carry distinct tokens.

    Returns:
        ``(tree, sources)``: the :class:`~vllm_redrafter.steps.TreeDraft` and one bit set
        per node (``sources[0] = 0`` for the root) of every branch through the node.

    Example: root ``A``, branches ``[B C] (D)``, ``[B E] (L)``, budget 3 -> tokens
    ``A B C E``, parents ``-1 0 1 1``, sources ``0, D|L, D, L``.
    """
    tokens, parents, depths, sources = [root], [-1], [0], [0]
    children: dict[tuple[int, int], int] = {}
    for branch in branches:
        node = 0
        for token in branch.tokens:
            child = children.get((node, token))
            if child is None:
                if len(tokens) - 1 >= budget:
                    break
                child = len(tokens)
                children[(node, token)] = child
                tokens.append(token)
                parents.append(node)
                depths.append(depths[node] + 1)
                sources.append(0)
            sources[child] |= branch.source
            node = child
    return TreeDraft(tuple(tokens), tuple(parents), tuple(depths)), tuple(sources)


def path_sources(tree: TreeDraft, sources: Sequence[int], last_node: int) -> list[int]:
    """Source bits of the accepted drafted nodes, root excluded, from the root down.

    Example: parents ``-1 0 1 1``, sources ``0 3 1 2``, last node 3 -> ``[3, 2]``.
    """
    path = []
    node = last_node
    while node > 0:
        path.append(sources[node])
        node = tree.parents[node]
    return path[::-1]


@dataclass
class SourceCounts:
    """Accepted drafted tokens by source: drafter only, look-up only, both."""

    drafter: int = 0
    lookup: int = 0
    both: int = 0

    def add(self, bits: Sequence[int]) -> None:
        for b in bits:
            if b == DRAFTER | LOOKUP:
                self.both += 1
            elif b == LOOKUP:
                self.lookup += 1
            elif b == DRAFTER:
                self.drafter += 1

    def merge(self, other: SourceCounts) -> None:
        """Add ``other``'s counts to these."""
        self.drafter += other.drafter
        self.lookup += other.lookup
        self.both += other.both

    def as_dict(self) -> dict[str, int]:
        return {"drafter": self.drafter, "lookup": self.lookup, "both": self.both}

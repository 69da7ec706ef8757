# SPDX-License-Identifier: Apache-2.0
"""Context look-up (vllm_redrafter.lookup): the incremental index, the fill order and the
trie merge, checked on literal trees; the offline walk with look-up branches."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vllm_redrafter.config import LookupOptions
from vllm_redrafter.evaluate import DraftedResponse, chain_and_tree, lookup_walk
from vllm_redrafter.lookup import (
    DRAFTER,
    LOOKUP,
    Branch,
    Candidate,
    ContextIndex,
    SourceCounts,
    cut_untrusted,
    fill_order,
    lookup_depth,
    merge_branches,
    path_sources,
    trusted,
)
from vllm_redrafter.tree import build_tree

D, L = DRAFTER, LOOKUP


def test_index_docstring_example():
    index = ContextIndex(2, 2)
    index.extend([5, 6, 7, 5, 6])
    assert index.candidates(2, 3) == [Candidate((7, 5, 6), 2)]
    assert index.candidates(2, 1) == [Candidate((7,), 2)]


def test_candidates_longest_match_first_then_most_recent():
    #         0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 2, 3, 8, 4, 3, 7, 2, 3]
    index = ContextIndex(1, 3)
    index.extend(tokens)
    found = index.candidates(4, 2)
    # "2 3" (2-gram) ended at 5 and 2: continuations "8 4" (recent) then "9 2";
    # then 1-gram "3" ended at 8 -> "7 2" (5 and 2 give prefixes already found).
    assert found == [Candidate((8, 4), 2), Candidate((9, 2), 2), Candidate((7, 2), 1)]


def test_candidates_skip_the_suffix_itself_and_prefixes_of_found_ones():
    index = ContextIndex(1, 1)
    index.extend([4, 5, 4, 5, 4])
    # "4" ended at 2 -> "5 4"; at 0 -> "5 4" again (a duplicate): one candidate only
    assert index.candidates(3, 2) == [Candidate((5, 4), 1)]
    assert ContextIndex(1, 2).candidates(2, 4) == []  # empty history


def test_nothing_found_without_an_earlier_occurrence():
    index = ContextIndex(2, 4)
    index.extend([1, 2, 3, 4, 5])
    assert index.candidates(2, 4) == []


def test_incremental_index_equals_one_shot():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(200)]
    once = ContextIndex(1, 4)
    once.extend(tokens)
    grown = ContextIndex(1, 4)
    for end in range(0, 201, 7):
        grown.sync(np.asarray(tokens[:end]))  # numpy views, as the runner passes
    grown.sync(tokens)
    assert grown.tokens == once.tokens
    assert grown.candidates(4, 5) == once.candidates(4, 5)


def test_sync_rebuilds_when_the_history_is_not_a_continuation():
    index = ContextIndex(1, 2)
    index.sync([1, 2, 3, 1])
    assert index.candidates(1, 2) == [Candidate((2, 3), 1)]
    index.sync([7, 8, 7])  # another request's tokens under a reused id
    assert index.tokens == [7, 8, 7]
    assert index.candidates(1, 2) == [Candidate((8, 7), 1)]


def test_fill_order_places_lookups_after_rank_beams():
    beams = [[1], [2], [3]]
    found = [Candidate((8,), 2), Candidate((9,), 1)]
    order = [(b.tokens, b.source) for b in fill_order(beams, found, 1)]
    assert order == [((1,), D), ((8,), L), ((9,), L), ((2,), D), ((3,), D)]
    assert [b.tokens for b in fill_order(beams, found, 0)][:2] == [(8,), (9,)]
    assert [b.tokens for b in fill_order(beams, found, 3)][-2:] == [(8,), (9,)]


def test_merge_docstring_example():
    tree, sources = merge_branches(
        10, [Branch((11, 12), D), Branch((11, 13), L), Branch((14,), D)], budget=3)
    assert tree.tokens == (10, 11, 12, 13)  # beam 1's 14 does not fit the budget of 3
    assert tree.parents == (-1, 0, 1, 1)
    assert tree.depths == (0, 1, 2, 2)
    assert sources == (0, D | L, D, L)


def test_merge_keeps_the_leading_part_of_a_branch_that_does_not_fit():
    tree, sources = merge_branches(0, [Branch((1, 2), D), Branch((3, 4, 5), L)], budget=4)
    assert tree.tokens == (0, 1, 2, 3, 4)
    assert tree.parents == (-1, 0, 1, 0, 3)
    assert sources == (0, D, D, L, L)


def test_merge_of_beams_alone_is_the_deduplicated_beam_tree():
    """Without look-up candidates the trie is build_tree's packing, node for node."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        beams = torch.randint(0, 3, (1, 4, 5), generator=gen)
        beams[:, :, 0] = 7
        packed = build_tree(beams)
        n = int(packed.num_nodes[0])
        branches = fill_order(beams[0, :, 1:].tolist(), [], 0)
        tree, sources = merge_branches(7, branches, budget=16)
        assert tree.tokens == tuple(packed.packed_tokens[0, :n].tolist())
        assert tree.parents == tuple(packed.parents[0, :n].tolist())
        assert tree.depths == tuple(packed.depth[0, :n].tolist())
        assert set(sources[1:]) == {D}


def test_merged_siblings_are_distinct():
    rng = random.Random(1)
    for _ in range(50):
        branches = [Branch(tuple(rng.randrange(3) for _ in range(4)), rng.choice([D, L]))
                    for _ in range(6)]
        tree, _ = merge_branches(9, branches, budget=rng.randrange(1, 20))
        seen = set()
        for node in range(1, tree.num_nodes):
            key = (tree.parents[node], tree.tokens[node])
            assert key not in seen
            seen.add(key)


def test_path_sources_and_counts():
    tree, sources = merge_branches(0, [Branch((1, 2), D), Branch((1, 3), L)], budget=8)
    assert path_sources(tree, sources, 3) == [D | L, L]
    assert path_sources(tree, sources, 0) == []
    counts = SourceCounts()
    counts.add(path_sources(tree, sources, 3))
    counts.add(path_sources(tree, sources, 2))
    assert counts.as_dict() == {"drafter": 1, "lookup": 1, "both": 2}


def _drafted(sequence: list[int], prompt_len: int, beams_of) -> DraftedResponse:
    start, end = prompt_len - 1, len(sequence) - 2
    beams = torch.tensor([beams_of(p, sequence) for p in range(start, end + 1)])
    return DraftedResponse(torch.tensor(sequence), beams, start, end)


def test_lookup_walk_accepts_repeated_text_the_beams_miss():
    phrase = [11, 12, 13, 14, 15, 16]
    sequence = phrase + [20] + phrase + phrase  # the answer repeats the prompt's phrase

    def wrong(p, seq):  # W=2 beams of L=4 that are never right
        return [[seq[p + 1], 99, 99, 99], [seq[p + 1], 98, 98, 98]]

    drafted = _drafted(sequence, 7, wrong)
    _, tree = chain_and_tree(drafted)
    assert tree.accepted == 0
    stats, sources = lookup_walk(drafted, LookupOptions(min_match=1), budget=6)
    assert stats.tau >= 2.5  # 8 of 12 tokens come as drafts (walked: 4 steps)
    assert sources.lookup == stats.accepted and sources.drafter == sources.both == 0
    # negative control: a look-up that can never match (min_match longer than any
    # repeat) gives the drafter-only tree's tau
    none, _ = lookup_walk(drafted, LookupOptions(min_match=16, max_match=16), budget=6)
    assert none.tau == tree.tau


def test_lookup_walk_is_never_below_the_tree_when_the_budget_fits_all():
    rng = random.Random(3)
    sequence = [rng.randrange(5) for _ in range(80)]

    def noisy(p, seq):
        right = seq[p + 1 : p + 5] + [0] * 4
        return [right[:4], [right[0], right[1], 4, 4], [right[0], 3, 3, 3]]

    drafted = _drafted(sequence, 10, noisy)
    _, tree = chain_and_tree(drafted)
    stats, _ = lookup_walk(drafted, LookupOptions(min_match=1, max_candidates=2),
                           budget=3 * 3 + 2 * 3)
    assert stats.tau >= tree.tau


@pytest.mark.parametrize("spec, expected", [
    ("default", LookupOptions()),
    ("rank=0,max_candidates=4", LookupOptions(rank=0, max_candidates=4)),
])
def test_evaluate_lookup_spec(spec, expected):
    from vllm_redrafter.commands.evaluate import parse_lookup_spec

    assert parse_lookup_spec(spec) == expected


def test_evaluate_lookup_spec_refused():
    from vllm_redrafter.commands.evaluate import parse_lookup_spec

    with pytest.raises(ValueError, match="key=integer"):
        parse_lookup_spec("rank")
    with pytest.raises(ValueError, match="max_match"):
        parse_lookup_spec("min_match=5,max_match=2")


def test_trusted_docstring_example():
    found = [Candidate((7, 5, 6), 3)]
    assert trusted(found, 3, 3)
    assert not trusted(found, 3, 4)  # shorter than the tree's depth
    assert not trusted(found, 4, 3)  # match too short
    assert not trusted(found, None, 3) and not trusted([], 1, 1)


def test_skip_beams_match_range_is_validated():
    assert LookupOptions(min_match=2, max_match=4, skip_beams_match=3).skip_beams_match == 3
    with pytest.raises(ValueError, match="skip_beams_match=5 must be in"):
        LookupOptions(max_match=4, skip_beams_match=5)
    with pytest.raises(ValueError, match="skip_beams_match=1 must be in"):
        LookupOptions(min_match=2, max_match=4, skip_beams_match=1)


def test_lookup_walk_skips_beams_only_where_the_lookup_is_trusted():
    # the answer repeats the prompt's "1 2 3" but goes on differently ("9 ..."): after
    # "1 2 3" the 3-token match is trusted and its continuation "4 5 6" is wrong
    sequence = [1, 2, 3, 4, 5, 6, 7, 8, 8, 1, 2, 3, 9, 9, 9, 9, 9, 9, 9]

    def right(p, seq):  # W=2 beams of L=4: the first always right (padded past the end)
        nxt = (seq[p + 1 : p + 5] + [0] * 4)[:4]
        return [nxt, [nxt[0], 99, 99, 99]]

    drafted = _drafted(sequence, 7, right)
    _, tree = chain_and_tree(drafted)
    stats, sources = lookup_walk(drafted, LookupOptions(max_match=3, skip_beams_match=3),
                                 budget=6)
    assert stats.skipped == 1 and stats.steps > 1  # only the step after "1 2 3"
    assert stats.tau < tree.tau  # that step accepted nothing: "4 5 6" was wrong
    # negative control: without the option every step keeps the beams
    kept, _ = lookup_walk(drafted, LookupOptions(max_match=3), budget=6)
    assert kept.skipped == 0 and kept.tau == tree.tau
    assert kept.nodes / kept.steps > stats.nodes / stats.steps  # the skipped step is small


def test_trusted_depth_docstring_examples():
    assert lookup_depth(4, None) == 4
    assert lookup_depth(4, 8) == 8 and lookup_depth(2, 8) == 8
    found = [Candidate((1, 2, 3, 4, 5, 6), 3), Candidate((7, 8, 9, 1, 2, 3), 1)]
    assert cut_untrusted(found, 4, 3) == [Candidate((1, 2, 3, 4, 5, 6), 3),
                                          Candidate((7, 8, 9, 1), 1)]
    # without skip_beams_match nothing is trusted: every continuation is cut
    cut = [c.tokens for c in cut_untrusted(found, 4, None)]
    assert cut == [(1, 2, 3, 4), (7, 8, 9, 1)]


def test_trusted_depth_is_validated():
    from vllm_redrafter.config import ReDrafterOptions

    with pytest.raises(ValueError, match="set lookup.skip_beams_match too"):
        LookupOptions(trusted_depth=8)
    deep = {"skip_beams_match": 2, "trusted_depth": 8}
    ok = ReDrafterOptions(beam_width=1, beam_length=5, tree=True,
                          lookup={**deep, "extra_nodes": 4})
    assert ok.lookup.trusted_depth == 8 and ok.num_speculative_tokens == 8
    budget_4 = r"trusted_depth=8 must be in \[beam_length - 1 = 4, 4\]"
    with pytest.raises(ValueError, match=budget_4):
        ReDrafterOptions(beam_width=1, beam_length=5, tree=True, lookup=deep)
    with pytest.raises(ValueError, match="trusted_depth=3 must be in"):
        ReDrafterOptions(beam_width=4, beam_length=5, tree=True,
                         lookup={"skip_beams_match": 2, "trusted_depth": 3})


def test_lookup_walk_accepts_trusted_continuations_past_the_tree_depth():
    phrase = list(range(10, 30))
    sequence = phrase + [5] + phrase  # the answer copies a 20-token phrase

    def wrong(p, seq):  # W=1 beam of L=4 that is never right
        return [[seq[p + 1], 99, 99, 99]]

    drafted = _drafted(sequence, len(phrase) + 2, wrong)
    shallow, _ = lookup_walk(drafted, LookupOptions(skip_beams_match=2), budget=12)
    deep, sources = lookup_walk(
        drafted, LookupOptions(skip_beams_match=2, trusted_depth=12), budget=12)
    assert len(shallow.per_depth) == 3 and shallow.tau <= 4  # never past depth 3
    assert deep.per_depth[11] > 0 and deep.tau > 8  # 12-token paths accepted whole
    assert sources.lookup == deep.accepted

# SPDX-License-Identifier: Apache-2.0
"""The proposer's answer in tree mode: deduplicated trees for eligible requests, the best
beam as a chain for the others, capped at num_speculative_tokens (no engine)."""

from __future__ import annotations

import torch

from vllm_redrafter.proposers.redrafter import ReDrafterProposer
from vllm_redrafter.steps import DraftRequest, DraftStep


def _proposer(tree_mode: bool, cap: int) -> ReDrafterProposer:
    proposer = object.__new__(ReDrafterProposer)  # no vLLM config: only _proposal runs
    proposer.tree_mode = tree_mode
    proposer.num_speculative_tokens = cap
    return proposer


BEAMS = torch.tensor([
    [[7, 1, 2, 3], [7, 1, 2, 4], [7, 5, 6, 8]],   # request a: shares "7 1 2"
    [[9, 1, 1, 1], [9, 1, 1, 1], [9, 2, 2, 2]],   # request b: two identical beams
])


def _step(tree_ok=(True, True)) -> DraftStep:
    return DraftStep(num_reqs=3, num_rows=5, requests=[
        DraftRequest("a", 0, 0, 7, tree_ok[0]), DraftRequest("b", 2, 3, 9, tree_ok[1])])


def test_tree_mode_proposes_deduplicated_trees():
    proposal = _proposer(True, 9)._proposal(_step(), BEAMS)
    tree_a, tree_b = proposal.trees["a"], proposal.trees["b"]
    assert tree_a.tokens == (7, 1, 2, 3, 4, 5, 6, 8)
    assert tree_a.parents == (-1, 0, 1, 2, 2, 0, 5, 6)
    assert tree_b.tokens == (9, 1, 1, 1, 2, 2, 2)  # the duplicate beam adds no node
    assert proposal.drafts["a"] == [1, 2, 3, 4, 5, 6, 8]
    assert proposal.in_batch_order(["a", "x", "b"])[1] == []


def test_chain_fallback_and_chain_mode_send_the_best_beam():
    proposal = _proposer(True, 9)._proposal(_step(tree_ok=(False, True)), BEAMS)
    assert "a" not in proposal.trees and proposal.drafts["a"] == [1, 2, 3]
    chain = _proposer(False, 3)._proposal(_step(), BEAMS)
    assert chain.trees == {} and chain.drafts == {"a": [1, 2, 3], "b": [1, 1, 1]}


def test_trees_are_capped_in_topological_order():
    proposal = _proposer(True, 4)._proposal(_step(), BEAMS)
    assert proposal.trees["a"].tokens == (7, 1, 2, 3, 4)
    assert len(proposal.drafts["a"]) == 4


def _lookup_proposer(cap: int, **options) -> ReDrafterProposer:
    from vllm_redrafter.config import LookupOptions
    from vllm_redrafter.lookup import SourceCounts

    proposer = _proposer(True, cap)
    proposer.lookup = LookupOptions(**options)
    proposer._indices, proposer._proposed = {}, {}
    proposer.accepted_sources = SourceCounts()
    return proposer


def _lookup_step(history_a, history_b=(5, 9), last_nodes=(None, None)) -> DraftStep:
    return DraftStep(num_reqs=3, num_rows=5, requests=[
        DraftRequest("a", 0, 0, 7, True, history_a, last_nodes[0]),
        DraftRequest("b", 2, 3, 9, True, history_b, last_nodes[1])])


def test_lookup_branches_join_the_tree():
    # "7" appeared before, followed by "3 6 6": a look-up branch 7 -> 3 -> 6 -> 6
    proposer = _lookup_proposer(9, min_match=1, max_candidates=1, rank=1)
    proposal = proposer._proposal(_lookup_step((4, 7, 3, 6, 6, 2, 7)), BEAMS)
    tree_a = proposal.trees["a"]
    # beam 0 (1 2 3), then look-up (3 6 6: a new branch), then beams 1, 2 (cap 9)
    assert tree_a.tokens == (7, 1, 2, 3, 3, 6, 6, 4, 5, 6)
    assert tree_a.parents == (-1, 0, 1, 2, 0, 4, 5, 2, 0, 8)
    assert proposal.drafts["a"] == list(tree_a.tokens[1:])
    # request b's history has no earlier "9": its tree is the beams' tree
    assert proposal.trees["b"].tokens == (9, 1, 1, 1, 2, 2, 2)


def test_lookup_needs_a_history_that_ends_with_the_init_token():
    proposer = _lookup_proposer(9, min_match=1)
    proposal = proposer._proposal(_lookup_step((4, 7, 3, 6, 6, 2)), BEAMS)  # ends in 2
    assert proposal.trees["a"].tokens == (7, 1, 2, 3, 4, 5, 6, 8)  # beams only


def test_accepted_tokens_are_attributed_to_their_source():
    proposer = _lookup_proposer(9, min_match=1, max_candidates=1, rank=1)
    proposer._proposal(_lookup_step((4, 7, 3, 6, 6, 2, 7)), BEAMS)
    # next step: request a accepted down to node 6 (look-up 3 -> 6 -> 6), b node 1
    proposer._attribute(_lookup_step((4, 7, 3, 6, 6, 2, 7, 3, 6, 6, 1),
                                     last_nodes=(6, 1)))
    assert proposer.accepted_sources.as_dict() == {"drafter": 1, "lookup": 3, "both": 0}
    assert proposer._proposed == {}
    counters = proposer.policy_stats() if hasattr(proposer, "policy") else None
    assert counters is None  # (no policy on this bare proposer)

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

# SPDX-License-Identifier: Apache-2.0
"""Tree verification maths: steps dataclasses, verify_tree, KV moves, masks (no vLLM)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_redrafter.scorers.tree import TreeVerdict, tree_attention_mask, verify_tree
from vllm_redrafter.steps import Proposal, SamplingView, TreeDraft, tree_fallback_reason
from vllm_redrafter.tree import build_tree

A, B, C, D, E, X = 10, 11, 12, 13, 14, 15
VOCAB = 16

# root A; beam 0 = A X X X (wrong), beam 1 = A B C D, beam 2 = A B C E
ORACLE = TreeDraft(tokens=(A, X, X, X, B, C, D, E), parents=(-1, 0, 1, 2, 0, 4, 5, 5),
                   depths=(0, 1, 2, 3, 1, 2, 3, 3))


def _logits_with_argmax(argmax: list[int]) -> torch.Tensor:
    logits = torch.zeros(len(argmax), VOCAB)
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 5.0
    return logits


def test_tree_draft_rejects_non_topological_trees():
    with pytest.raises(ValueError, match="root"):
        TreeDraft((A, B), (0, -1), (0, 1))
    with pytest.raises(ValueError, match="topologically"):
        TreeDraft((A, B, C), (-1, 2, 0), (0, 1, 1))
    with pytest.raises(ValueError, match="topologically"):
        TreeDraft((A, B), (-1, 0), (0, 2))


def test_truncation_keeps_a_prefix_tree():
    sub = ORACLE.truncated(5)
    assert sub.tokens == (A, X, X, X, B, C) and sub.parents == (-1, 0, 1, 2, 0, 4)
    assert sub.drafts == [X, X, X, B, C]


def test_build_tree_matches_the_oracle_layout():
    beams = torch.tensor([[[A, X, X, X], [A, B, C, D], [A, B, C, E]]])
    packed = build_tree(beams)
    n = int(packed.num_nodes[0])
    assert tuple(packed.packed_tokens[0, :n].tolist()) == ORACLE.tokens
    assert tuple(packed.parents[0, :n].tolist()) == ORACLE.parents
    assert tuple(packed.depth[0, :n].tolist()) == ORACLE.depths


def test_greedy_walk_accepts_the_off_beam_zero_branch():
    # argmax after each node: root -> B, node 4 (B) -> C, node 5 (C) -> D, node 6 -> Y
    argmax = [B, 0, 0, 0, C, D, 9, 0]
    verdict = verify_tree(ORACLE, _logits_with_argmax(argmax), SamplingView())
    assert verdict.path == [0, 4, 5, 6] and verdict.emitted == [B, C, D, 9]
    assert verdict.num_accepted == 3 and verdict.last_node == 6
    assert verdict.kv_moves() == [(4, 1), (5, 2), (6, 3)]


def test_greedy_walk_stops_at_the_first_mismatch():
    argmax = [B, 0, 0, 0, C, 9, 0, 0]  # after C the target wants 9: no child has it
    verdict = verify_tree(ORACLE, _logits_with_argmax(argmax), SamplingView())
    assert verdict.path == [0, 4, 5] and verdict.emitted == [B, C, 9]
    nothing = verify_tree(ORACLE, _logits_with_argmax([9] * 8), SamplingView())
    assert nothing.path == [0] and nothing.emitted == [9] and nothing.kv_moves() == []


def test_beam_zero_path_needs_no_kv_move():
    assert TreeVerdict([0, 1, 2], [X, X, 3]).kv_moves() == []
    assert TreeVerdict([0, 2, 5], [1, 2, 3]).kv_moves() == [(2, 1), (5, 2)]


def test_sampling_with_a_point_mass_target_descends_like_greedy():
    argmax = [B, 0, 0, 0, C, D, 9, 0]
    logits = _logits_with_argmax(argmax) * 100  # T=1 softmax is a point mass
    verdict = verify_tree(ORACLE, logits, SamplingView(temperature=1.0),
                          torch.Generator().manual_seed(0))
    assert verdict.path == [0, 4, 5, 6] and verdict.emitted == [B, C, D, 9]


def test_sampling_first_token_follows_the_target_distribution():
    """Emitted token 1 is drawn from row 0 (chi-square-free check: exact frequencies
    over many seeds stay within 4 sigma of p)."""
    logits = torch.zeros(8, VOCAB)
    logits[0, B], logits[0, X] = 2.0, 1.0  # p(B) > p(X), both are children of the root
    draws = [verify_tree(ORACLE, logits, SamplingView(temperature=1.0),
                         torch.Generator().manual_seed(s)).emitted[0] for s in range(2000)]
    p = torch.softmax(logits[0], dim=0)
    for token in (B, X, 3):
        freq = draws.count(token) / len(draws)
        sigma = (p[token] * (1 - p[token]) / len(draws)).sqrt()
        assert abs(freq - p[token]) < 4 * sigma + 1e-3, (token, freq, float(p[token]))


def test_verify_tree_checks_the_row_count():
    with pytest.raises(ValueError, match=r"\[8, V\]"):
        verify_tree(ORACLE, torch.zeros(3, VOCAB), SamplingView())


def test_tree_attention_mask_is_ancestor_or_self_of_drafted_nodes():
    mask = tree_attention_mask(ORACLE).int().tolist()
    # node 7 (E) sees B (4), C (5) and itself; node 3 sees nodes 1, 2, 3
    assert mask[6] == [0, 0, 0, 1, 1, 0, 1]
    assert mask[2] == [1, 1, 1, 0, 0, 0, 0]
    assert mask[3] == [0, 0, 0, 1, 0, 0, 0]


def test_proposal_in_batch_order():
    proposal = Proposal(drafts={"b": [1, 2], "c": [3]})
    assert proposal.in_batch_order(["a", "b", "c"]) == [[], [1, 2], [3]]


@pytest.mark.parametrize("params,reason", [
    (SimpleNamespace(temperature=0.7, top_k=5, top_p=0.9), None),
    (SimpleNamespace(logprobs=1), "logprobs"),
    (SimpleNamespace(structured_outputs=object()), "structured output"),
    (SimpleNamespace(bad_words=["no"]), "bad words"),
    (SimpleNamespace(bad_words=[]), None),
    (SimpleNamespace(repetition_penalty=1.2), "repetition penalty"),
    (SimpleNamespace(min_tokens=3), "min_tokens"),
    (SimpleNamespace(logit_bias={1: 2.0}), "logit_bias"),
    (None, "no sampling parameters"),
])
def test_tree_fallback_reason(params, reason):
    assert tree_fallback_reason(params) == reason

# SPDX-License-Identifier: Apache-2.0
"""``ReDrafterProposer.propose_step`` on hand-made hidden states and step metadata (no
engine): each request is drafted from *its* context row of ``sample_hidden_states`` and
its init token, exactly as a direct ``beam_search`` on those rows drafts.

The layout: 3 requests in the batch, 6 sampled rows (partial prefills and drafts put
each request's context row anywhere); request ``b`` (batch index 1) gets no draft.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vllm_redrafter.beam_search import beam_search
from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.policy import Decision, DraftPolicy
from vllm_redrafter.proposers.redrafter import ReDrafterProposer
from vllm_redrafter.steps import DraftRequest, DraftStep
from vllm_redrafter.tree import build_tree

HIDDEN, VOCAB, WIDTH, LENGTH = 8, 40, 3, 4
ROWS = {"a": 4, "c": 1}  # context row of each drafted request
INIT = {"a": 11, "c": 29}


def _proposer(tree_mode: bool) -> ReDrafterProposer:
    generator = torch.Generator().manual_seed(0)
    config = DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, exit_dim=2 * HIDDEN,
                           num_draft_layers=1)
    proposer = object.__new__(ReDrafterProposer)  # no vLLM config: built by hand
    proposer.drafter = RecurrentDrafter(config, generator=generator).eval()
    proposer.embed = nn.Embedding(VOCAB, HIDDEN)
    nn.init.normal_(proposer.embed.weight, generator=generator)
    proposer.dtype = proposer.draft_dtype = torch.float32
    proposer.options = SimpleNamespace(beam_width=WIDTH, beam_length=LENGTH,
                                       draft_top_k=None, num_draft_tokens=LENGTH - 1)
    proposer.tree_mode = tree_mode
    proposer.num_speculative_tokens = WIDTH * (LENGTH - 1) if tree_mode else LENGTH - 1
    proposer.policy = DraftPolicy(max_length=LENGTH - 1)  # not adaptive: full drafts
    proposer._step_beam_length = LENGTH
    proposer._graphed = None
    proposer._host = None
    proposer._rows_cpu = torch.zeros(4, dtype=torch.int64)
    proposer._init_cpu = torch.zeros(4, dtype=torch.int64)
    proposer._rows = torch.zeros(4, dtype=torch.int64)
    proposer._init = torch.zeros(4, dtype=torch.int64)
    proposer.draft_seconds, proposer.num_proposals = 0.0, 0
    return proposer


def _step() -> DraftStep:
    return DraftStep(num_reqs=3, num_rows=6, requests=[
        DraftRequest("a", 0, ROWS["a"], INIT["a"], True),
        DraftRequest("c", 2, ROWS["c"], INIT["c"], True)])


def _expected_beams(proposer: ReDrafterProposer, hidden: torch.Tensor) -> torch.Tensor:
    rows = torch.tensor([ROWS["a"], ROWS["c"]])
    init = torch.tensor([INIT["a"], INIT["c"]])
    return beam_search(proposer.drafter, proposer.embed, hidden[rows], init, WIDTH,
                       LENGTH).tokens  # [2, W, L]


@pytest.fixture
def hidden() -> torch.Tensor:
    return torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(1))  # [rows, H]


def test_chain_drafts_the_best_beam_of_each_context_row(hidden):
    proposer = _proposer(tree_mode=False)
    proposal = proposer.propose_step(_step(), hidden)
    beams = _expected_beams(proposer, hidden)
    assert proposal.in_batch_order(["a", "b", "c"]) == [
        beams[0, 0, 1:].tolist(), [], beams[1, 0, 1:].tolist()]
    assert proposal.trees == {}
    # Negative control: drafting from the wrong rows (the first two) drafts otherwise.
    wrong = beam_search(proposer.drafter, proposer.embed, hidden[:2],
                        torch.tensor([INIT["a"], INIT["c"]]), WIDTH, LENGTH).tokens
    assert not torch.equal(wrong[:, 0], beams[:, 0])
    assert proposer.num_proposals == 2


def test_tree_drafts_the_deduplicated_beams_of_each_context_row(hidden):
    proposer = _proposer(tree_mode=True)
    proposal = proposer.propose_step(_step(), hidden)
    packed = build_tree(_expected_beams(proposer, hidden))
    for k, req_id in enumerate(["a", "c"]):
        n = int(packed.num_nodes[k])
        tree = proposal.trees[req_id]
        assert list(tree.tokens) == packed.packed_tokens[k, :n].tolist()
        assert list(tree.parents) == packed.parents[k, :n].tolist()
        assert tree.tokens[0] == INIT[req_id]
        assert proposal.drafts[req_id] == list(tree.tokens[1:])
    assert "b" not in proposal.drafts


def test_a_non_finite_context_row_is_refused_but_other_rows_are_not_read(hidden):
    proposer = _proposer(tree_mode=False)
    hidden[ROWS["a"], 0] = float("nan")
    with pytest.raises(FloatingPointError):
        proposer.propose_step(_step(), hidden)
    hidden[ROWS["a"], 0] = 0.0
    hidden[0, 0] = float("inf")  # row 0 belongs to no drafted request
    assert proposer.propose_step(_step(), hidden).drafts["a"]


def _lookup_proposer(skip: int | None, trusted_depth: int | None = None
                     ) -> ReDrafterProposer:
    from vllm_redrafter.config import LookupOptions
    from vllm_redrafter.lookup import SourceCounts

    proposer = _proposer(tree_mode=True)
    proposer.lookup = LookupOptions(max_match=3, skip_beams_match=skip,
                                    trusted_depth=trusted_depth)
    proposer.options.max_tree_drafts = WIDTH * (LENGTH - 1)
    proposer.options.adaptive = False
    proposer.lookup_policy = proposer._make_lookup_policy()
    proposer._indices, proposer._proposed = {}, {}
    proposer.accepted_sources, proposer.beam_searches_skipped = SourceCounts(), 0
    return proposer


def _repeating_step(tail_a: list[int]) -> DraftStep:
    """Request ``a``'s history repeats ``5 6 7 8 9 10`` and ends with ``tail_a``; request
    ``c``'s history repeats ``2 3 4 5 6 7`` and ends with ``2 3 4`` (a 3-token match)."""
    hist_a = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10] + tail_a
    hist_c = [2, 3, 4, 5, 6, 7, 2, 3, 4]
    return DraftStep(num_reqs=3, num_rows=6, requests=[
        DraftRequest("a", 0, ROWS["a"], hist_a[-1], True, history=hist_a),
        DraftRequest("c", 2, ROWS["c"], hist_c[-1], True, history=hist_c)])


def test_trusted_lookups_skip_the_beam_search(hidden):
    proposer = _lookup_proposer(skip=3)
    searched = []
    original = proposer._draft_beams
    proposer._draft_beams = lambda step, h: searched.append(1) or original(step, h)
    # both requests end with a 3-token match continued for the whole depth (3)
    proposal = proposer.propose_step(_repeating_step([5, 6, 7]), hidden)
    assert searched == [] and proposer.beam_searches_skipped == 1
    assert proposal.drafts["a"] == [8, 9, 10] and proposal.drafts["c"] == [5, 6, 7]
    assert proposer.policy_stats()["beams_skipped"] == 1.0
    # one request without a trusted match (a 1-token match only): the beams are drafted
    proposal = proposer.propose_step(_repeating_step([7, 1, 10]), hidden)
    assert searched == [1] and proposer.beam_searches_skipped == 1
    assert len(proposal.drafts["a"]) > 3  # beams joined the tree
    # negative control: without skip_beams_match the beams are always drafted
    plain = _lookup_proposer(skip=None)
    plain._draft_beams = lambda step, h: searched.append(2) or original(step, h)
    proposal = plain.propose_step(_repeating_step([5, 6, 7]), hidden)
    assert searched == [1, 2] and plain.beam_searches_skipped == 0
    assert len(proposal.drafts["a"]) > 3  # beams joined the tree


def test_trusted_lookups_run_past_the_tree_depth_with_trusted_depth(hidden):
    proposer = _lookup_proposer(skip=3, trusted_depth=6)
    proposal = proposer.propose_step(_repeating_step([5, 6, 7]), hidden)
    assert proposer.beam_searches_skipped == 1
    # the continuations after the earlier "5 6 7" and "2 3 4", 6 tokens (depth is 3)
    assert proposal.drafts["a"] == [8, 9, 10, 5, 6, 7]
    assert proposal.drafts["c"] == [5, 6, 7, 2, 3, 4]
    # an untrusted continuation (1-token match "10") is cut to the tree's depth, beside
    # the beams
    proposal = proposer.propose_step(_repeating_step([7, 1, 10]), hidden)
    tree = proposal.trees["a"]
    assert max(tree.depths) == LENGTH - 1 and proposer.beam_searches_skipped == 1
    assert (5, 6, 7) in _paths(tree)  # "10" was followed by "5 6 7 8 ..." before
    # negative control: without trusted_depth the trusted path stops at the tree's depth
    plain = _lookup_proposer(skip=3)
    drafts = plain.propose_step(_repeating_step([5, 6, 7]), hidden).drafts
    assert drafts["a"] == [8, 9, 10]


def _paths(tree) -> set[tuple[int, ...]]:
    """Every root-to-leaf path of a tree, root excluded."""
    leaves = set(range(1, tree.num_nodes)) - set(tree.parents)
    paths = set()
    for leaf in leaves:
        path, node = [], leaf
        while node > 0:
            path.append(tree.tokens[node])
            node = tree.parents[node]
        paths.add(tuple(path[::-1]))
    return paths


class _Fixed(DraftPolicy):
    """A policy that always decides ``length``."""

    def __init__(self, length: int, max_length: int) -> None:
        super().__init__(max_length=max_length)
        self.fixed = length

    def _decide(self, num_reqs: int) -> Decision:
        return Decision(self.fixed, "rate")


def test_trusted_steps_are_decided_and_measured_by_the_lookup_policy(hidden):
    from vllm_redrafter.steps import StepCosts

    proposer = _lookup_proposer(skip=3, trusted_depth=6)
    assert proposer.lookup_policy.max_length == 6  # the trusted continuations' depth
    proposer.policy = _Fixed(LENGTH - 1, LENGTH - 1)
    proposer.lookup_policy = _Fixed(2, 6)
    proposal = proposer.propose_step(_repeating_step([5, 6, 7]), hidden)
    # every request trusted: the look-up policy chose depth 2, no beam search
    assert (proposer.lookup_policy.steps, proposer.policy.steps) == (1, 0)
    assert proposal.drafts == {"a": [8, 9], "c": [5, 6]}
    assert proposer.beam_searches_skipped == 1
    assert 2 in proposer.lookup_policy.draft.by_length
    assert not proposer.policy.draft.by_length
    # the next step's acceptance goes to the policy that drafted it; this step (one
    # request untrusted) is the beam policy's
    costs = StepCosts(6, 0.05, ((2, 2), (2, 1)))
    step = _repeating_step([7, 1, 10])
    step = DraftStep(step.num_reqs, step.requests, step.num_rows, costs)
    proposal = proposer.propose_step(step, hidden)
    assert (proposer.lookup_policy.steps, proposer.policy.steps) == (1, 1)
    assert proposer.lookup_policy.acceptance.samples > 0
    assert proposer.policy.acceptance.samples == 0
    assert len(proposal.drafts["a"]) > 3 and proposer.policy.draft.by_length
    # a look-up policy that does not draft: the trusted step drafts nothing, though
    # the beam policy would draft fully
    proposer.lookup_policy = _Fixed(0, 6)
    assert proposer.propose_step(_repeating_step([5, 6, 7]), hidden).drafts == {}
    # negative control: without skip_beams_match there is no look-up policy and the
    # beam policy decides every step
    plain = _lookup_proposer(skip=None)
    assert plain.lookup_policy is None
    plain.policy = _Fixed(LENGTH - 1, LENGTH - 1)
    plain.propose_step(_repeating_step([5, 6, 7]), hidden)
    assert plain.policy.steps == 1


def test_untrusted_branches_of_lookup_only_steps_stay_at_the_tree_depth(hidden):
    """A look-up-only step drafts its trusted continuation ``trusted_depth`` deep; the
    other look-up branch (a 1-token match) stays at the tree's depth ``L - 1``."""
    proposer = _lookup_proposer(skip=3, trusted_depth=6)
    history = [3, 20, 21, 22, 23, 24, 25, 1, 2, 3, 9, 9, 1, 2, 3]
    step = DraftStep(num_reqs=1, num_rows=6, requests=[
        DraftRequest("a", 0, ROWS["a"], history[-1], True, history=history)])
    tree = proposer.propose_step(step, hidden).trees["a"]
    assert proposer.beam_searches_skipped == 1  # trusted "1 2 3": look-up only
    paths = _paths(tree)
    assert (9, 9, 1, 2, 3) in paths  # the trusted continuation, past depth 3
    assert (20, 21, 22) in paths  # after "3" at position 0: cut to depth 3


def test_plain_steps_look_up_only_where_a_lookup_policy_needs_it(hidden):
    """Without ``skip_beams_match`` (no look-up policy) a step that drafts nothing looks
    nothing up; with it the look-ups come first, since they pick the policy."""
    for skip, expected in ((None, 0), (3, 2)):
        proposer = _lookup_proposer(skip=skip)
        proposer.policy = _Fixed(0, LENGTH - 1)
        if proposer.lookup_policy is not None:
            proposer.lookup_policy = _Fixed(0, LENGTH - 1)
        calls = []
        original = proposer._lookup_candidates
        proposer._lookup_candidates = lambda *a, f=original: calls.append(1) or f(*a)
        assert proposer.propose_step(_repeating_step([5, 6, 7]), hidden).drafts == {}
        assert len(calls) == expected, skip


def test_the_cycle_between_drafting_calls_goes_to_the_overhead_table(hidden):
    """From one drafting call to the next: 0.10 s on the policy's clock, of which the
    target's step measured 0.05 s and the first call's drafting 0.01 s: 0.04 s of
    overhead for (2 requests, L - 1 tokens). Negative controls: a step that scheduled
    more tokens than its decode (a prefill too) and a step without a measured forward (no
    costs) observe nothing."""
    from vllm_redrafter.steps import StepCosts

    proposer = _proposer(tree_mode=False)
    ticks = iter([0.0, 0.01, 0.01,  # call 1: start, D measured, cycle opened
                  0.10, 0.11, 0.11,  # call 2
                  0.30, 0.31, 0.31,  # call 3
                  0.50, 0.51, 0.51])  # call 4
    proposer._cost_clock = lambda: next(ticks)
    proposer.propose_step(_step(), hidden)
    step = _step()

    def with_costs(num_tokens):
        return DraftStep(step.num_reqs, step.requests, step.num_rows,
                         StepCosts(num_tokens, 0.05, ()))

    decode_tokens = 2 * (1 + (LENGTH - 1))  # 2 requests, each 1 + L - 1 drafted tokens
    proposer.propose_step(with_costs(decode_tokens), hidden)
    assert proposer.policy.overhead.estimate(2, LENGTH - 1) == pytest.approx(0.04)
    assert set(proposer.policy.overhead.by_length) == {LENGTH - 1}
    proposer.policy.overhead.by_length.clear()
    # a step that also prefilled (more tokens than a decode step verifying the drafts)
    proposer.propose_step(with_costs(decode_tokens + 1), hidden)
    assert not proposer.policy.overhead.by_length
    proposer.propose_step(_step(), hidden)  # no costs: not observed
    assert not proposer.policy.overhead.by_length

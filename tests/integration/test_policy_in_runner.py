# SPDX-License-Identifier: Apache-2.0
"""Load-aware drafting's glue (no engine): the runner's step costs, the step timer patch,
and the proposer drafting the policy's length (nothing, a shorter chain, or all)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vllm_redrafter.integration import hooks, patches
from vllm_redrafter.integration import runner as runner_state
from vllm_redrafter.policy import Decision, DraftPolicy, TreeSizeTable
from vllm_redrafter.proposers.redrafter import ReDrafterProposer
from vllm_redrafter.steps import DraftRequest, DraftStep, StepCosts


def test_step_costs_from_the_finished_step():
    runner_state.note_step_start()
    costs = runner_state._step_costs(
        SimpleNamespace(total_num_scheduled_tokens=11), [[1, 2, 3], [5], [7], []],
        SimpleNamespace(num_draft_tokens=[4, 0, 2, 3]))
    assert costs.num_tokens == 11
    assert costs.forward_seconds is not None and 0 <= costs.forward_seconds < 5
    # request 1 carried no draft; request 3 sampled nothing (partial prefill)
    assert costs.verified == ((4, 2), (2, 0))
    again = runner_state._step_costs(SimpleNamespace(total_num_scheduled_tokens=3), [[1]],
                                     None)
    assert again.forward_seconds is None and again.verified == ()  # timer consumed


def test_step_costs_use_the_proposers_clock():
    """The step timer reads the clock the proposer set (the thread's CPU time on a CPU);
    negative control: the wall clock, restored, counts a sleep."""
    import time

    ticks = iter([10.0, 10.25])
    runner_state.set_cost_clock(lambda: next(ticks))
    try:
        runner_state.note_step_start()
        costs = runner_state._step_costs(SimpleNamespace(total_num_scheduled_tokens=1),
                                         [[1]], None)
        assert costs.forward_seconds == 0.25
        runner_state.set_cost_clock(time.thread_time)
        runner_state.note_step_start()
        time.sleep(0.2)
        cpu = runner_state._step_costs(SimpleNamespace(total_num_scheduled_tokens=1),
                                       [[1]], None).forward_seconds
        assert cpu is not None and cpu < 0.05
    finally:
        runner_state.set_cost_clock(time.perf_counter)
    runner_state.note_step_start()
    time.sleep(0.2)
    wall = runner_state._step_costs(SimpleNamespace(total_num_scheduled_tokens=1), [[1]],
                                    None).forward_seconds
    assert wall is not None and wall >= 0.19


def test_step_timer_patch_stamps_before_the_original():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_redrafter import plugin

    plugin.register()
    patches.ensure_applied(hooks.TIMER_HOOK)
    runner_state._STATE.step_started = None
    runner = object.__new__(GPUModelRunner)
    runner.execute_model_state = "busy"  # vLLM's original raises on it at once
    try:
        runner.execute_model(SimpleNamespace())
    except RuntimeError as exc:
        assert "sample_tokens() must be called" in str(exc)
    assert runner_state._STATE.step_started is not None


class _FixedPolicy(DraftPolicy):
    def __init__(self, length: int) -> None:
        super().__init__(max_length=4)
        self.fixed = length

    def _decide(self, num_reqs: int) -> Decision:
        return Decision(self.fixed, "rate")


def _proposer(length: int) -> ReDrafterProposer:
    proposer = object.__new__(ReDrafterProposer)
    proposer.policy = _FixedPolicy(length)
    proposer.options = SimpleNamespace(num_draft_tokens=4, beam_length=5)
    proposer.drafter = None
    proposer.tree_mode = False
    proposer.num_speculative_tokens = 4
    proposer._step_beam_length = 5
    proposer._rows_cpu = torch.zeros(4, dtype=torch.int64)
    proposer._rows = torch.zeros(4, dtype=torch.int64)
    proposer._host = None
    proposer.draft_seconds, proposer.num_proposals = 0.0, 0
    proposer.calls = []

    def draft_beams(step, hidden):  # noqa: ANN001, ANN202
        length = proposer._step_beam_length
        proposer.calls.append(length)
        beams = torch.arange(3 * length).view(1, 3, length).repeat(2, 1, 1)
        return beams[: len(step.requests)]

    proposer._draft_beams = draft_beams
    return proposer


def _step():
    requests = [DraftRequest("a", 0, 0, 7), DraftRequest("b", 1, 1, 8)]
    return DraftStep(2, requests, 2, StepCosts(10, 0.05, ((4, 1), (4, 0))))


def test_no_draft_runs_no_beam_search_and_sends_nothing():
    proposer = _proposer(0)
    proposal = proposer.propose_step(_step(), torch.zeros(2, 3))
    assert proposal.drafts == {} and proposer.calls == []
    assert proposer.policy.no_draft_steps == 1
    # the finished step's acceptance reached the policy; its cost did not (no drafting
    # call before it, so nothing says it verified only drafts)
    assert proposer.policy.target.num_bins == 0 and proposer.policy.plain.num_bins == 0
    assert abs(proposer.policy.acceptance.reach(1) - 0.5) < 1e-3


def test_plain_steps_are_timed_apart_from_verification_steps():
    """A step that verified no draft goes to the policy's plain table; one that verified
    the 2 x 4 drafts of the call before (10 tokens) to the verification table. Negative
    control: a step that verified drafts beside a prefill (more tokens) goes to neither."""
    proposer = _proposer(4)
    requests = [DraftRequest("a", 0, 0, 7), DraftRequest("b", 1, 1, 8)]
    proposer.propose_step(DraftStep(2, requests, 2, StepCosts(2, 0.03)), torch.zeros(2, 3))
    assert proposer.policy.plain.estimate(2) == 0.03
    assert proposer.policy.target.num_bins == 0
    proposer.propose_step(_step(), torch.zeros(2, 3))  # StepCosts(10, 0.05, verified)
    assert proposer.policy.target.estimate(10) == 0.05
    assert proposer.policy.plain.num_bins == 1
    mixed = StepCosts(60, 0.07, ((4, 1), (4, 0)))
    proposer.propose_step(DraftStep(2, requests, 2, mixed), torch.zeros(2, 3))
    assert proposer.policy.target.num_bins == 1 and proposer.policy.plain.num_bins == 1
    assert abs(proposer.policy.acceptance.reach(1) - 0.5) < 1e-3


def test_shorter_and_full_drafts():
    short = _proposer(2)
    proposal = short.propose_step(_step(), torch.zeros(2, 3))
    assert short.calls == [3]  # beam length = length + 1
    assert all(len(d) == 2 for d in proposal.drafts.values())
    assert 2 in short.policy.draft.by_length  # drafting cost measured at that length
    full = _proposer(4)
    proposal = full.propose_step(_step(), torch.zeros(2, 3))
    assert full.calls == [5] and all(len(d) == 4 for d in proposal.drafts.values())


def test_tree_depth_choice_measures_sizes_and_depth_acceptance():
    """Tree mode: the policy's depth cuts the beams; the trees' node counts are recorded
    per depth, and acceptance is observed at the depth drafted (not the node count)."""
    proposer = _proposer(2)
    proposer.tree_mode = True
    proposer.num_speculative_tokens = 12
    proposer.policy.tree = TreeSizeTable(width=3, budget=12)
    draft = proposer._draft_beams

    def rooted(step, hidden):  # noqa: ANN001, ANN202 - beams share the init token
        beams = draft(step, hidden) + 100
        beams[:, :, 0] = 7
        return beams

    proposer._draft_beams = rooted
    requests = [DraftRequest("a", 0, 0, 7, True), DraftRequest("b", 1, 1, 8, True)]
    proposal = proposer.propose_step(DraftStep(2, requests, 2), torch.zeros(2, 3))
    assert proposer.calls == [3]
    assert all(max(tree.depths) == 2 for tree in proposal.trees.values())
    assert proposer.policy.tree.means[2] == 6.0  # 3 disjoint beams of 2 tokens
    # next step: two trees of 6 nodes verified, 2 and 0 accepted, at depth 2
    proposer.propose_step(DraftStep(2, requests, 2, StepCosts(14, 0.05, ((6, 2), (6, 0)))),
                          torch.zeros(2, 3))
    tracker = proposer.policy.acceptance
    assert tracker.drafted[2] > 0 and tracker.drafted[3] == 0
    assert abs(tracker.reach(2) - 0.5) < 1e-3


def _sampling_runner(method="custom_class"):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    calls = []
    runner = object.__new__(GPUModelRunner)
    runner.drafter = SimpleNamespace(propose_step=lambda step, hidden: None)
    runner.speculative_config = SimpleNamespace(method=method)
    runner.input_batch = SimpleNamespace(sampling_metadata="meta",
                                         update_async_output_token_ids=lambda: None)
    runner.use_async_scheduling = False
    runner.sampler = lambda logits, sampling_metadata: calls.append("plain") or "plain"
    runner.rejection_sampler = lambda *args: calls.append("rejection") or "rejection"
    runner._get_spec_decode_draft_probs = lambda metadata: None
    return runner, calls


def test_steps_without_drafts_use_the_plain_sampler():
    from vllm_redrafter import plugin

    plugin.register()
    patches.ensure_applied(hooks.NO_DRAFT_HOOK)
    runner, calls = _sampling_runner()
    assert runner._sample("logits", SimpleNamespace(num_draft_tokens=[0, 0])) == "plain"
    assert runner._sample("logits", SimpleNamespace(num_draft_tokens=[2, 0])) == "rejection"
    assert runner._sample("logits", None) == "plain"
    # other speculative methods keep vLLM's behaviour (negative control)
    other, _ = _sampling_runner(method="ngram")
    assert other._sample("logits", SimpleNamespace(num_draft_tokens=[0, 0])) == "rejection"
    assert calls == ["plain", "rejection", "plain"]

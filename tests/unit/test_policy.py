# SPDX-License-Identifier: Apache-2.0
"""Load-aware drafting decisions on recorded cost tables (no engine)."""

from __future__ import annotations

import pytest

from vllm_redrafter.policy import (
    AcceptanceTracker,
    Decision,
    DraftCostTable,
    DraftPolicy,
    StepCostTable,
    TreeSizeTable,
)

# Recorded on this project's 2-core CPU (demo target, float32; verify-cost and bench of
# 2026-11-30): seconds of a target step against the tokens it verifies.
CPU_TARGET = {1: 0.100, 5: 0.110, 9: 0.126, 17: 0.151, 16: 0.150, 64: 0.40, 80: 0.50,
              256: 1.50, 320: 1.90}
# A GPU-like target: verification is almost free up to a few hundred tokens.
FLAT_TARGET = {1: 0.020, 5: 0.020, 16: 0.0205, 64: 0.0208, 80: 0.021, 256: 0.024,
               320: 0.026}
# Acceptance per depth of the demo drafter (chain W=4, L=5): 0.36/0.16/0.08/0.04.
CHAIN_ACCEPTED = [0] * 64 + [1] * 20 + [2] * 8 + [3] * 4 + [4] * 4  # 100 requests


def _with_target(target: dict[int, float], max_length: int = 4, **options) -> DraftPolicy:
    """A policy whose target step costs are ``target``; nothing else measured yet."""
    policy = DraftPolicy(max_length=max_length, **options)
    for n, seconds in target.items():
        policy.target.observe(n, seconds)
    return policy


def _policy(target: dict[int, float], draft_s: float, per_req: float = 0.0,
            tree: TreeSizeTable | None = None, accepted=CHAIN_ACCEPTED) -> DraftPolicy:
    policy = _with_target(target, tree=tree)
    for b in (1, 4, 16, 64):
        policy.draft.observe(b, 4, draft_s + per_req * b)
    for a in accepted:
        policy.acceptance.observe(4, a)
    return policy


def test_cost_table_interpolates_and_extrapolates():
    table = StepCostTable()
    table.observe(8, 0.10)
    table.observe(32, 0.16)
    assert table.estimate(16) == pytest.approx(0.12)
    assert table.estimate(64) == pytest.approx(0.24)
    assert table.estimate(4) == pytest.approx(0.09)
    assert StepCostTable().estimate(5) is None


def test_cost_table_running_mean_per_bin():
    table = StepCostTable()
    table.observe(10, 1.0)
    for _ in range(50):
        table.observe(10, 2.0)
    assert table.estimate(10) == pytest.approx(2.0, rel=1e-3)


def test_acceptance_tracker_worked_example():
    tracker = AcceptanceTracker(4, decay=1.0)
    for a in (1, 0, 2):
        tracker.observe(4, a)
    assert [tracker.reach(d) for d in (1, 2, 3, 4)] == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert tracker.expected_tokens(4) == pytest.approx(2.0)
    assert AcceptanceTracker(4).expected_tokens(1) is None


def test_batch_one_on_cpu_drafts():
    """Drafting pays at batch 1; the deepest tokens are rarely accepted and each costs a
    drafter step and a verified token, so the best chain is shorter than L - 1."""
    policy = _policy(CPU_TARGET, draft_s=0.02)
    decision = policy.choose(1)
    assert decision.reason == "rate" and decision.length >= 1
    assert decision.rates[decision.length] > decision.rates[0] * 1.15
    assert decision.rates[decision.length] == max(decision.rates.values())


def test_batch_sixteen_on_cpu_never_drafts():
    """Verification is not free on this CPU: 16 requests x 5 tokens cost 3x a plain step,
    which tau 1.68 cannot repay, so the policy turns drafting off."""
    policy = _policy(CPU_TARGET, draft_s=0.02, per_req=0.002)
    decision = policy.choose(16)
    assert decision.length == 0 and decision.reason == "rate"
    assert all(decision.rates[0] > rate for k, rate in decision.rates.items() if k)


def test_flat_verification_cost_keeps_drafting_under_load():
    policy = _policy(FLAT_TARGET, draft_s=0.002, per_req=0.00005)
    decision = policy.choose(64)
    assert decision.length >= 1 and decision.rates[decision.length] > 1.2 * decision.rates[0]


def test_useless_drafter_is_switched_off_even_at_batch_one():
    policy = _policy(CPU_TARGET, draft_s=0.02, accepted=[0] * 100)
    assert policy.choose(1).length == 0


def test_tree_mode_chooses_the_depth_from_measured_tree_sizes():
    sizes = TreeSizeTable(width=4, budget=16)
    tree = _policy(CPU_TARGET, draft_s=0.03, tree=sizes)
    assert tree.candidates() == [0, 1, 2, 3, 4]
    assert tree.verified_tokens(16, 4) == 16 * 17  # unmeasured: 4 disjoint beams
    assert tree.choose(16).length == 0  # 272 verified tokens: far too dear on CPU
    sizes.observe(4, 10.0)
    assert tree.verified_tokens(2, 4) == 2 * 11
    assert sizes.nodes(2) == 8 and sizes.nodes(0) == 0


def test_tree_sizes_change_the_choice():
    """Same costs and acceptance: a bushy depth-4 tree is not worth its nodes, a lean one
    (measured) is."""
    bushy = _policy(CPU_TARGET, draft_s=0.02, tree=TreeSizeTable(width=4, budget=16))
    lean_sizes = TreeSizeTable(width=4, budget=16)
    for depth in range(1, 5):
        lean_sizes.observe(depth, float(depth))  # one branch: a chain's size
    lean = _policy(CPU_TARGET, draft_s=0.02, tree=lean_sizes)
    chain = _policy(CPU_TARGET, draft_s=0.02)
    assert lean.choose(1).length == chain.choose(1).length
    assert bushy.choose(1).length < lean.choose(1).length


def test_warm_up_pinned_and_exploration():
    fresh = DraftPolicy(max_length=4)
    assert fresh.choose(8).reason == "warm-up" and fresh.choose(8).length == 4
    pinned = _policy(CPU_TARGET, draft_s=0.02, per_req=0.002)
    pinned.adaptive = False
    assert pinned.choose(16).length == 4 and pinned.choose(16).reason == "pinned"
    policy = _policy(CPU_TARGET, draft_s=0.02, per_req=0.002)
    policy.explore_every = 5
    decisions = [policy.choose(16) for _ in range(10)]
    lengths = [d.length for d in decisions]
    explore = decisions[4]
    assert explore.reason == "explore"
    best_draft = max((k for k in explore.rates if k), key=lambda k: explore.rates[k])
    assert best_draft == 1  # under load the cheapest draft is the one closest to paying
    assert lengths == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1]  # one draft every 5 idle steps
    stats = policy.stats()
    assert stats["no_draft_share"] == pytest.approx(0.8)
    assert stats["mean_length"] == pytest.approx(0.2)


def test_warm_up_drafts_only_where_a_full_draft_is_affordable():
    policy = _with_target(CPU_TARGET)
    small = policy.choose(1)  # T(5) / T(1) = 1.1
    assert small.reason == "warm-up" and small.length == 4
    large = policy.choose(64)  # T(320) / T(64) = 4.75: plain decoding
    assert large.reason == "warm-up" and large.length == 0
    # negative controls: nearly free verification warms up at any batch; so does a
    # policy that accepts any warm-up cost
    assert _with_target(FLAT_TARGET).choose(64).length == 4
    lenient = _with_target(CPU_TARGET)
    lenient.warm_up_cost = float("inf")
    assert lenient.choose(64).length == 4


# Recorded 2026-12-01 in bfloat16 (demo target, in-process engine, runs/cost_probe.py):
# plain steps of 1, 8 and 64 requests, and steps verifying full chains (5 tokens per
# request) of 1, 4, 9, 16 and 64 requests; the drafter's W=4 L=5 beam search per batch.
BF16_TARGET = {1: 0.0231, 8: 0.0337, 64: 0.0885,
               5: 0.0288, 20: 0.0398, 45: 0.0705, 80: 0.150, 320: 0.380}
BF16_DRAFT = {1: 0.0094, 4: 0.0102, 9: 0.0190, 16: 0.0252, 64: 0.0740}


def test_warm_up_counts_the_drafting_cost():
    policy = _with_target(BF16_TARGET)
    for batch, seconds in BF16_DRAFT.items():
        policy.draft.observe(batch, 4, seconds)
    # 1 request: (T(5) + D(1, 4)) / T(1) = 1.67: warm up
    assert policy.choose(1) == Decision(4, "warm-up")
    # 8 requests: T(40) = 0.064 is 1.9 plain steps, with D(8, 4) = 0.017 it is 2.4
    assert policy.choose(8) == Decision(0, "warm-up")
    assert policy.choose(64) == Decision(0, "warm-up")
    # negative control: the same target costs before any drafting was timed
    assert _with_target(BF16_TARGET).choose(8) == Decision(4, "warm-up")
    # one request warms up even with a drafter costing three plain steps: no smaller
    # batch will come, and only measured acceptance can tell whether it pays
    slow = _with_target(BF16_TARGET)
    slow.draft.observe(1, 4, 3 * BF16_TARGET[1])
    assert slow.choose(1) == Decision(4, "warm-up")
    assert slow.choose(2) == Decision(0, "warm-up")


def test_draft_cost_scales_from_the_nearest_measured_length():
    table = DraftCostTable()
    table.observe(4, 4, 0.040)
    assert table.estimate(4, 2) == pytest.approx(0.020)
    assert table.estimate(4, 0) == 0.0
    assert DraftCostTable().estimate(4, 2) is None


# Recorded 2026-12-01 (demo target, fp32, 4 requests, T=0.7; runs/step_probe.py): steps
# that verify drafts of 1..4 tokens per request, a prefill, and the plain 4-token step that
# the drafting steps never measure.
DRAFTING_ONLY = {8: 0.0788, 12: 0.0804, 20: 0.089, 300: 0.40}
PLAIN_4 = 0.0602
SAMPLED_ACCEPTED = [0] * 71 + [1] * 24 + [2] * 3 + [3] * 1 + [4] * 1  # A(1) = 0.29


def test_a_plain_step_is_measured_before_its_extrapolated_cost_is_trusted():
    policy = _policy(DRAFTING_ONLY, draft_s=0.005, per_req=0.0005, accepted=SAMPLED_ACCEPTED)
    assert not policy.plain_measured(4)
    first = policy.choose(4)
    # extrapolated T(4) ~ 0.078 s: drafting one token looks worth it, but T(4) is unmeasured
    assert first.rates[1] > first.rates[0]
    assert first.length == 0 and first.reason == "explore"
    policy.target.observe(4, PLAIN_4)  # the plain step's measured cost
    assert policy.plain_measured(4)
    second = policy.choose(4)
    assert second.length == 0 and second.reason == "rate"  # measured: drafting loses
    # negative control: had the plain step really cost what was extrapolated, it drafts
    control = _policy(DRAFTING_ONLY, draft_s=0.005, per_req=0.0005,
                      accepted=SAMPLED_ACCEPTED)
    control.target.observe(4, 0.078)
    assert control.choose(4).length >= 1


def test_drafting_takes_a_plain_step_every_explore_every_steps():
    policy = _policy(CPU_TARGET, draft_s=0.02)
    policy.explore_every = 8
    lengths = [policy.choose(1).length for _ in range(16)]
    assert lengths.count(0) == 2 and lengths[7] == 0 and lengths[15] == 0
    assert all(length >= 1 for i, length in enumerate(lengths) if i not in (7, 15))


# Recorded in one engine (2026-12-01, demo target fp32, 4 requests, T = 0.7, per-step
# probe): a plain step 63.0 ms, a step verifying one drafted token per request 76.7 ms
# plus 3.8 ms of drafting; A(1) = 0.32. Predicted gain of drafting one token: +3%; the
# cell measured 0.96x of plain decoding with it pinned.
C4_SAMPLED_TARGET = {4: 0.0630, 8: 0.0767}
C4_SAMPLED_ACCEPTED = [0] * 68 + [1] * 32


def _one_token_policy(min_gain: float) -> DraftPolicy:
    policy = _with_target(C4_SAMPLED_TARGET, max_length=1, min_gain=min_gain)
    policy.draft.observe(4, 1, 0.0038)
    for a in C4_SAMPLED_ACCEPTED:
        policy.acceptance.observe(1, a)
    return policy


def test_a_gain_within_the_margin_is_not_drafted():
    assert DraftPolicy(max_length=1).min_gain == pytest.approx(1.10)  # the default margin
    decision = _one_token_policy(min_gain=1.10).choose(4)
    assert 1.0 < decision.rates[1] / decision.rates[0] < 1.05  # the recorded +3%
    assert decision.length == 0 and decision.reason == "rate"
    # negative control: without the margin the same costs draft
    assert _one_token_policy(min_gain=1.0).choose(4).length == 1


def test_a_clear_gain_is_drafted_despite_the_margin():
    policy = _one_token_policy(min_gain=1.10)
    for i in range(400):  # greedy at c=4: A(1) = 0.44, predicted +13%
        policy.acceptance.observe(1, 1 if i % 100 < 44 else 0)
    decision = policy.choose(4)
    assert decision.rates[1] > 1.10 * decision.rates[0] and decision.length == 1


def test_cost_clock_leaves_out_time_the_thread_does_not_run_on_a_cpu():
    """On a CPU the policy's costs are the thread's CPU time (a VM's steal, like a sleep,
    is not counted); on a GPU the wall clock (the host may sleep in a synchronisation)."""
    import time

    from vllm_redrafter.policy import cost_clock

    def measured(clock):
        start = clock()
        time.sleep(0.2)  # not running: like time stolen by a hypervisor
        return clock() - start

    assert cost_clock("cpu") is time.thread_time
    assert measured(cost_clock("cpu")) < 0.05
    assert measured(cost_clock("cuda")) >= 0.19  # negative control: wall time counts it


# Recorded in ``bench`` on the 2-core Xeon (2026-12-03, bfloat16, 16 requests, greedy):
# plain steps 160 ms a cycle against T(16) = 140 ms; drafting 2 tokens (A = 0.41/0.18)
# 265-308 ms a cycle against T(48) + D(16, 2) = 158 + 13 ms. Rounded.
C16_TARGET = {16: 0.140, 48: 0.158}
C16_ACCEPTED = [0] * 59 + [1] * 23 + [2] * 18  # A = 0.41/0.18, E(2) = 1.59


def _c16_policy() -> DraftPolicy:
    policy = _with_target(C16_TARGET, max_length=2)
    policy.draft.observe(16, 2, 0.013)
    for a in C16_ACCEPTED:
        policy.acceptance.observe(2, a)
    return policy


def test_the_cycle_outside_the_target_and_drafting_is_measured_per_length():
    policy = DraftPolicy(max_length=4)
    assert policy.overhead.estimate(16, 3) == 0.0  # nothing measured: the model without it
    policy.observe_cycle(16, 2, cycle_s=0.271, target_s=0.158, drafting_s=0.013)
    policy.observe_cycle(16, 0, cycle_s=0.160, target_s=0.140, drafting_s=0.0)
    assert policy.overhead.estimate(16, 2) == pytest.approx(0.100)
    assert policy.overhead.estimate(16, 0) == pytest.approx(0.020)
    assert policy.overhead.estimate(16, 1) == pytest.approx(0.060)  # between 0 and 2
    assert policy.overhead.estimate(16, 4) == pytest.approx(0.100)  # beyond: nearest
    # a remainder longer than the step itself is a gap (the engine idle, or a step
    # between two drafting calls that sampled nothing), not a cost; nor is a negative one
    policy.observe_cycle(16, 2, cycle_s=0.500, target_s=0.158, drafting_s=0.013)
    policy.observe_cycle(16, 0, cycle_s=0.120, target_s=0.140, drafting_s=0.0)
    assert policy.overhead.estimate(16, 2) == pytest.approx(0.100)
    assert policy.overhead.estimate(16, 0) == pytest.approx(0.020)


def test_a_drafts_overhead_can_turn_drafting_off():
    """By ``T + D`` alone a 2-token draft looks 1.3x faster at 16 requests; with the
    measured rest of each cycle (20 ms plain, 100 ms drafting 2 tokens, so 60 ms for 1 by
    interpolation) no draft pays: plain decoding. Negative control: without the overhead
    the same tables draft."""
    decision = _c16_policy().choose(16)
    assert decision.length >= 1 and decision.rates[2] > 1.25 * decision.rates[0]
    policy = _c16_policy()
    policy.overhead.observe(16, 0, 0.020)
    policy.overhead.observe(16, 2, 0.100)
    decision = policy.choose(16)
    assert decision.length == 0 and decision.reason == "rate"
    tokens = policy.acceptance.expected_tokens(2)  # 1.59, recent samples weigh more
    assert tokens == pytest.approx(1.59, abs=0.02)
    assert decision.rates[2] == pytest.approx(16 * tokens / (0.158 + 0.013 + 0.100))
    assert decision.rates[0] == pytest.approx(16 / (0.140 + 0.020))


# Recorded in-process (2026-12-03, bfloat16, greedy, runs/s21/probe_split.py): steps that
# verified drafts (4 requests drafting 1-4 tokens, 16 drafting 2) and plain steps (1, 4
# and 16 requests), by tokens; and a 16-token verification step (4 requests x 4 tokens)
# that before the split shared the plain 16-request step's bin.
SPLIT_VERIFY = {5: 0.064, 8: 0.0706, 12: 0.0901, 20: 0.091, 48: 0.1555}
SPLIT_PLAIN = {1: 0.056, 4: 0.0648, 16: 0.0803}
VERIFY_16 = 0.133


def _split_policy(one_table: bool) -> DraftPolicy:
    policy = DraftPolicy(max_length=2)
    plain = policy.target if one_table else policy.plain
    for n, seconds in SPLIT_PLAIN.items():
        plain.observe(n, seconds)
    for n, seconds in SPLIT_VERIFY.items():
        policy.target.observe(n, seconds)
    for _ in range(20):  # c=4's 3-token drafts, after the 16-request plain steps
        policy.target.observe(16, VERIFY_16)
    policy.draft.observe(16, 2, 0.010)
    for a in C16_ACCEPTED:
        policy.acceptance.observe(2, a)
    return policy


def test_plain_steps_are_not_estimated_from_verification_steps_of_their_size():
    """At 16 requests a plain step costs 80 ms, not the 133 ms of verifying 16 tokens of
    4 requests: plain decoding (rate 199 tok/s) beats drafting 1 or 2 tokens.
    Negative control: with both kinds in one table the plain step reads 133 ms and the
    drafts are rated up to 1.5x faster than plain decoding, so it drafts."""
    split = _split_policy(one_table=False)
    decision = split.choose(16)
    assert decision.length == 0 and decision.reason == "rate"
    assert decision.rates[0] == pytest.approx(16 / 0.0803, rel=1e-3)
    assert split.plain_measured(16)
    mixed = _split_policy(one_table=True).choose(16)
    assert mixed.length >= 1
    assert mixed.rates[mixed.length] > 1.25 * mixed.rates[0]


def test_one_measured_verification_size_follows_the_plain_steps_slope():
    """The docstring's example; negative control: without plain steps the single
    verification bin is scaled in proportion (the cost table's own rule)."""
    policy = DraftPolicy(max_length=4)
    policy.target.observe(5, 0.110)
    policy.plain.observe(1, 0.100)
    policy.plain.observe(16, 0.130)
    assert policy.costs_known()
    assert policy.verify_cost(3) == pytest.approx(0.106)
    assert policy.verify_cost(20) == pytest.approx(0.110 + 0.138 - 0.108)
    alone = DraftPolicy(max_length=4)
    alone.target.observe(5, 0.110)
    assert not alone.costs_known()
    assert alone.verify_cost(20) == pytest.approx(0.44)


def test_with_no_verification_step_measured_plain_steps_stand_in():
    """A fresh engine has timed only prefills: a full draft's verification is priced from
    them (the warm-up's affordability rule needs a price); negative control: nothing
    measured at all gives no price."""
    policy = DraftPolicy(max_length=4)
    assert policy.verify_cost(80) is None
    policy.plain.observe(64, 0.40)
    policy.plain.observe(300, 1.50)
    assert policy.verify_cost(80) == pytest.approx(policy.plain.estimate(80))
    assert policy._warm_up(16).length == 0  # 16 x 5 tokens: more than 2 plain steps

# SPDX-License-Identifier: Apache-2.0
"""A ReDrafter proposer that sees a machine under heavy load (imported in vLLM workers).

Its policy's target-step cost table is fixed at ``T(n) = 0.01 s * n`` (every verified token
costs as much as a whole plain step, as on a compute-bound CPU at high concurrency) and
ignores the engine's real timings, so load-aware drafting must stop drafting once its
warm-up has measured acceptance. Everything else is the real proposer.
"""

from __future__ import annotations

from vllm_redrafter.policy import StepCostTable
from vllm_redrafter.proposers.redrafter import ReDrafterProposer

CLASS_PATH = "tests.e2e.forced_load.ForcedLoadProposer"


class FixedCostTable(StepCostTable):
    """A recorded cost table that live observations do not change."""

    def observe(self, n: int, seconds: float) -> None:
        return None


class ForcedLoadProposer(ReDrafterProposer):
    def __init__(self, vllm_config):  # noqa: ANN001
        super().__init__(vllm_config)
        table = FixedCostTable()
        for n in (1, 4, 16, 64, 256):
            StepCostTable.observe(table, n, 0.01 * n)
        for policy in (self.policy, self.lookup_policy):  # (look-up-only steps' policy)
            if policy is not None:
                policy.target = policy.plain = table
                # warm up whatever it costs (by this table a full draft costs 5 plain
                # steps, which would skip the warm-up): the test checks that drafting
                # stops after it
                policy.warm_up_cost = float("inf")

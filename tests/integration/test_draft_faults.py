# SPDX-License-Identifier: Apache-2.0
"""Faults inside the drafter never stop serving: an exception or a non-finite hidden
state in a drafting step gives no draft for that step (counted, logged once), and the
next step drafts again (no engine)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from vllm_redrafter.integration import runner as runner_state
from vllm_redrafter.policy import DraftPolicy
from vllm_redrafter.proposers.redrafter import ReDrafterProposer
from vllm_redrafter.steps import Proposal


def _runner(req_ids):
    batch = SimpleNamespace(req_ids=list(req_ids))
    return SimpleNamespace(input_batch=batch, requests={})


class _Drafter:
    """Raises on the calls listed in ``fail_on``; drafts ``[5, 6]`` otherwise."""

    tree_mode = False
    wants_history = False

    def __init__(self, fail_on):
        self.fail_on, self.calls = set(fail_on), 0

    def propose_step(self, step, hidden):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("injected drafter fault")
        proposal = Proposal()
        for req in step.requests:
            proposal.drafts[req.req_id] = [5, 6]
        return proposal


def _propose(drafter, runner):
    return runner_state.propose_drafts(runner, drafter, sampled_token_ids=[[1], [2]],
                                       sample_hidden_states=torch.zeros(2, 4),
                                       spec_decode_metadata=None)


def test_a_failing_step_drafts_nothing_and_the_next_step_drafts_again(caplog):
    runner = _runner(["a", "b"])
    drafter = _Drafter(fail_on={1, 2})
    before = runner_state.draft_fault_count()
    with caplog.at_level(logging.DEBUG, logger="vllm"):
        assert _propose(drafter, runner) == [[], []]
        assert _propose(drafter, runner) == [[], []]
        assert _propose(drafter, runner) == [[5, 6], [5, 6]]
    assert runner_state.draft_fault_count() - before == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "drafting step failed" in r.getMessage()]
    assert len(warnings) <= 1  # once per process (earlier tests may have used it)
    assert any("injected drafter fault" in r.getMessage() for r in caplog.records)


def test_non_finite_hidden_states_are_a_fault_not_a_draft():
    proposer = object.__new__(ReDrafterProposer)  # only propose_step's input check runs
    proposer.policy = DraftPolicy(max_length=2, adaptive=False)
    proposer.options = SimpleNamespace(num_draft_tokens=2)
    proposer.drafter = None
    proposer._rows_cpu = torch.zeros(4, dtype=torch.int64)
    proposer._rows = torch.zeros(4, dtype=torch.int64)
    proposer._host = None
    proposer._proposal = lambda step, beams, found: pytest.fail("drafted from NaN")
    proposer._draft_beams = lambda step, hidden: torch.zeros(len(step.requests), 2, 3,
                                                             dtype=torch.int64)
    step = runner_state.DraftStep(2, [runner_state.DraftRequest("a", 0, 1, 3, False)], 2)
    hidden = torch.tensor([[0.0, 1.0], [float("nan"), 1.0]])
    with pytest.raises(FloatingPointError, match="non-finite"):
        proposer.propose_step(step, hidden)
    # control: the same step from the finite row drafts
    shapes = []
    proposer._proposal = lambda step, beams, found: (shapes.append(tuple(beams.shape))
                                                     or Proposal())
    proposer.draft_seconds, proposer.num_proposals = 0.0, 0
    ok = runner_state.DraftStep(2, [runner_state.DraftRequest("a", 0, 0, 3, False)], 2)
    assert proposer.propose_step(ok, hidden) == Proposal() and shapes == [(1, 2, 3)]

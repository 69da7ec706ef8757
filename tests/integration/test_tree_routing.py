# SPDX-License-Identifier: Apache-2.0
"""Which registered trees are verified as trees (no engine): a tree that is a single path
as scheduled goes to vLLM's chain verification (exact, cheaper), a branching one to the
tree step; the path's last accepted node is its accepted count."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_redrafter.integration import runner as runner_state
from vllm_redrafter.steps import TreeDraft

PATH = TreeDraft((5, 6, 7, 8), (-1, 0, 1, 2), (0, 1, 2, 3))  # 5 -> 6 -> 7 -> 8
FORK = TreeDraft((9, 1, 2, 3), (-1, 0, 1, 1), (0, 1, 2, 2))  # 9 -> 1 -> {2, 3}


def test_is_chain_literal():
    assert PATH.is_chain
    assert not FORK.is_chain
    assert FORK.truncated(2).is_chain  # 9 -> 1 -> 2: the fork cut above its branch
    assert TreeDraft((4,), (-1,), (0,)).is_chain


def _fake_step(scheduled: dict[str, list[int]], computed: dict[str, int]):
    """A runner and scheduler output for one step of decode requests whose drafts are
    ``scheduled`` (batch order = dict order)."""
    ids = list(scheduled)
    rows = [1 + len(scheduled[r]) for r in ids]
    query_start = np.concatenate([[0], np.cumsum(rows)])
    runner = SimpleNamespace(
        input_batch=SimpleNamespace(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            num_computed_tokens_cpu=np.array([computed[r] for r in ids])),
        query_start_loc=SimpleNamespace(np=query_start),
        discard_request_mask=SimpleNamespace(np=np.zeros(len(ids), dtype=bool)),
        positions=torch.arange(int(query_start[-1]), dtype=torch.int64),
        requests={r: SimpleNamespace(sampling_params=None) for r in ids})
    scheduler_output = SimpleNamespace(
        finished_req_ids=set(), scheduled_spec_decode_tokens=scheduled,
        num_scheduled_tokens={r: n for r, n in zip(ids, rows)})
    metadata = SimpleNamespace(num_draft_tokens=[len(scheduled[r]) for r in ids])
    return runner, scheduler_output, metadata


@pytest.fixture(autouse=True)
def _clean_state():
    saved = runner_state._STATE
    runner_state._STATE = runner_state._WorkerState()
    yield
    runner_state._STATE = saved


def test_a_single_path_goes_to_the_chain_verifier_a_fork_to_the_tree_step():
    runner_state._STATE.trees.update({"path": PATH, "fork": FORK})
    runner, sched, meta = _fake_step({"path": PATH.drafts, "fork": FORK.drafts},
                                     {"path": 10, "fork": 20})
    runner_state.after_prepare_inputs(runner, sched, (None, meta))
    step = runner_state.current_tree_step()
    assert step is not None and [r.req_id for r in step.requests] == ["fork"]
    assert runner_state._STATE.chained == {"path"}
    assert runner_state.chain_tree_count() == 1
    # the path's positions stay linear; the fork's nodes get depth positions
    assert runner.positions[:4].tolist() == [0, 1, 2, 3]
    assert runner.positions[4:8].tolist() == [4, 5, 6, 6]

    # the path accepted 2 of its 3 drafts (3 tokens out): its last node is node 2
    runner_state._STATE.current = None
    draft_step = runner_state.read_draft_step(
        runner, [[6, 7, 4], [1, 2]], meta, tree_mode=True)
    nodes = {r.req_id: r.last_node for r in draft_step.requests}
    assert nodes == {"path": 2, "fork": None}  # the fork's comes from the tree verdict
    assert draft_step.requests[0].row == 2  # the chain row rule: row of node 2


def test_a_tree_cut_to_one_path_by_the_scheduler_is_a_chain_too():
    runner_state._STATE.trees["fork"] = FORK
    runner, sched, meta = _fake_step({"fork": FORK.drafts[:2]}, {"fork": 20})
    runner_state.after_prepare_inputs(runner, sched, (None, meta))
    assert runner_state.current_tree_step() is None
    assert runner_state._STATE.chained == {"fork"}


def test_chain_routing_lasts_one_step():
    runner_state._STATE.trees["path"] = PATH
    runner, sched, meta = _fake_step({"path": PATH.drafts}, {"path": 10})
    runner_state.after_prepare_inputs(runner, sched, (None, meta))
    assert runner_state._STATE.chained == {"path"}
    runner, sched, meta = _fake_step({"path": []}, {"path": 14})
    runner_state.after_prepare_inputs(runner, sched, (None, None))
    assert runner_state._STATE.chained == set()

# SPDX-License-Identifier: Apache-2.0
"""Tensor parallelism: ReDrafter at TP=2 (multiprocessing and Ray) matches plain vLLM and
ReDrafter at TP=1 (outputs identical to plain vLLM; drafts and accepted tokens as at TP=1).

The tiny peaked Llama with the overfit drafter (so drafts are accepted and rejected, and
the drafter's vocab-parallel head, embedding all-reduce and logits all-gather all run on
both ranks). Greedy, fp32, 10 prompts x 64 tokens.

TP=2 on this single-NUMA CPU box needs ``VLLM_CPU_OMP_THREADS_BIND="0|1"``. Upstream vLLM
refuses Ray on CPU; the Ray case runs in a fresh interpreter with the TEST-ONLY shim
``tests/e2e/ray_cpu_shim.py`` registered as a second ``vllm.general_plugins`` entry point
through a temporary ``*.dist-info`` on ``PYTHONPATH`` (on GPUs Ray needs no shim).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import chain_helpers as h

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


MODES = ["chain", "tree"]
TARGET_HEAD = "chain-target-head"
"""Chain mode with the drafter that scores through the target's lm_head: at TP=1 its
draft-vocabulary rows are gathered once, at TP=2 the vocab-parallel head is used by
reference (all-gather + column select); the two paths must draft the same."""


def _spec(assets, mode="chain"):
    drafter = assets["target_head_dir"] if mode == TARGET_HEAD else assets["overfit_dir"]
    return {"method": "redrafter", "model": str(drafter), "adaptive": False,
            "beam_width": h.BEAM_WIDTH, "beam_length": h.BEAM_LENGTH,
            "tree": mode == "tree"}


def _greedy(assets, mode, **engine):
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       speculative_config=_spec(assets, mode), **engine) as llm:
        ids = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        return ids, h.spec_metrics(llm)


@pytest.fixture(scope="module")
def plain(assets):
    """Plain vLLM at TP=1: the reference every ReDrafter run must equal."""
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True) as llm:
        return h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def tp1(assets, plain):
    runs = {mode: _greedy(assets, mode) for mode in [*MODES, TARGET_HEAD]}
    for mode, (ids, _) in runs.items():
        assert ids == plain, f"ReDrafter {mode} at TP=1 differs from plain vLLM"
    return runs


def _assert_close_to_tp1(metrics, reference):
    """Same drafts and acceptance as TP=1 (a broken vocab-parallel head, a rank that
    moved other KV or drafted otherwise would change them)."""
    assert metrics["num_drafts"] > 0 and metrics["num_accepted_tokens"] > 0
    for key in ("num_drafts", "num_accepted_tokens"):
        assert abs(metrics[key] - reference[key]) <= 0.02 * reference[key] + 1, (
            key, metrics, reference)


@pytest.mark.parametrize("mode", [*MODES, TARGET_HEAD])
def test_tp2_multiprocessing_matches_tp1(assets, plain, tp1, mode):
    old = h.set_env(TP_ENV)
    try:
        ids, metrics = _greedy(assets, mode, tensor_parallel_size=2,
                               distributed_executor_backend="mp", in_process=False)
    finally:
        h.set_env(old)
    assert ids == plain
    _assert_close_to_tp1(metrics, tp1[mode][1])


def test_tree_beats_chain_with_the_overfit_drafter(tp1):
    """Tree verification of the same beams accepts at least as much as the chain."""
    chain, tree = tp1["chain"][1], tp1["tree"][1]
    assert tp1["chain"][0] == tp1["tree"][0]
    assert tree["mean_acceptance_length"] >= chain["mean_acceptance_length"], (chain, tree)


def _shim_dist_info(root: Path) -> Path:
    """A metadata-only distribution whose entry point registers the Ray CPU shim."""
    dist = root / "redrafter_test_ray_cpu_shim-0.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: redrafter-test-ray-cpu-shim\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nray_cpu_shim = tests.e2e.ray_cpu_shim:register\n")
    return root


@pytest.mark.parametrize("mode", ["tree"])
def test_tp2_ray_matches_tp1(assets, plain, tp1, tmp_path, mode):
    """Ray at TP=2 in tree mode: the Ray path (plugin and proposer in both actors, the
    drafter broadcast) with the most patches in play. Chain mode on Ray runs in
    ``test_examples.py``'s Ray example, and chain parity at TP=2 in the multiprocessing
    test above; a separate chain-on-Ray engine added ~80 s to the suite."""
    pytest.importorskip("ray")
    shim_path = _shim_dist_info(tmp_path / "shim")
    pythonpath = os.pathsep.join(
        p for p in (str(shim_path), str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **TP_ENV, "PYTHONPATH": pythonpath,
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    request = {"model": str(assets["target_dir"]), "tensor_parallel_size": 2,
               "speculative_config": _spec(assets, mode), "prompts": assets["prompts"],
               "max_tokens": h.NEW_TOKENS}
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.ray_cpu_shim",
                           json.dumps(request)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["ids"] == plain
    _assert_close_to_tp1(result["metrics"], tp1[mode][1])
    # the plugin and the proposer ran inside both Ray actors, at TP=2
    actor_lines = [line for line in (proc.stdout + proc.stderr).splitlines()
                   if "CpuRayWorkerProc pid=" in line]
    active = {line.split("pid=")[1].split(")")[0] for line in actor_lines
              if "vllm-redrafter" in line and " active in " in line}
    ready = [line for line in actor_lines if "ReDrafter proposer ready" in line]
    assert len(active) == 2, actor_lines[-50:]
    assert len(ready) == 2 and all("tp=2" in line for line in ready), ready

# SPDX-License-Identifier: Apache-2.0
"""The patch ledger: completeness, idempotence, signature guards, the runner hook."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_redrafter import plugin
from vllm_redrafter.integration import compat, hooks, patches
from vllm_redrafter.versioning import PatchError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _active_plugin():
    plugin.register()
    assert plugin.status()["status"] == "active"
    patches.ensure_applied(hooks.RUNNER_HOOK)


def test_ledger_entries_are_complete():
    names = [p.name for p in patches.LEDGER]
    assert len(names) == len(set(names))
    assert {hooks.RUNNER_HOOK, hooks.CONFIG_HOOK, hooks.CLI_ARG_HOOK,
            hooks.CLI_MERGE_HOOK, hooks.REFUSAL_GUARD} <= set(names)
    for patch in patches.LEDGER:
        assert patch.target.startswith("vllm.")
        assert patch.why and patch.how and patch.remove_when
        assert patch.stage in {"plugin", "proposer", "refused"}


def test_docs_patches_md_is_in_sync():
    text = (REPO_ROOT / "docs" / "patches.md").read_text()
    assert patches.ledger_markdown() in text, (
        "docs/patches.md is stale: regenerate it with "
        "`python -m vllm_redrafter.integration.ledger_doc`"
    )


def test_applying_again_is_a_no_op():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    before = (EngineArgs.create_speculative_config, EngineArgs.__dict__["add_cli_args"],
              EngineArgs.__dict__["from_cli_args"], GPUModelRunner.propose_draft_token_ids)
    for patch in patches.LEDGER:
        if patch.stage != "refused":
            patch.apply()  # bypasses the applied-list: the wrappers themselves must detect it
    after = (EngineArgs.create_speculative_config, EngineArgs.__dict__["add_cli_args"],
             EngineArgs.__dict__["from_cli_args"], GPUModelRunner.propose_draft_token_ids)
    assert before == after
    # exactly one wrapper layer around vLLM's original
    wrapped = GPUModelRunner.propose_draft_token_ids
    assert getattr(wrapped, "__redrafter_patch__", None) == hooks.RUNNER_HOOK
    assert not hasattr(wrapped.__wrapped__, "__redrafter_patch__")


def test_signature_guard_raises_patch_error():
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids):
        return None

    with pytest.raises(patches.PatchError, match="has parameters"):
        compat.require_parameters("demo", propose_draft_token_ids, hooks.RUNNER_PARAMETERS)
    with pytest.raises(patches.PatchError, match="no attribute"):
        compat.require_attribute("demo", SimpleNamespace(), "missing")


def test_version_guard(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    with pytest.raises(patches.PatchError, match="outside the supported range"):
        compat.require_vllm_version("demo")


def test_runner_hook_dispatches_to_propose_step():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_redrafter.steps import Proposal

    calls = {}

    class FakeDrafter:
        tree_mode = False
        wants_history = False

        def propose_step(self, step, hidden):
            calls.update(step=step, hidden=hidden)
            return Proposal(drafts={"b": [1, 2]})

    runner = object.__new__(GPUModelRunner)  # no __init__: only the attributes used
    runner.drafter = FakeDrafter()
    runner.speculative_config = SimpleNamespace(method="custom_class")
    runner.input_batch = SimpleNamespace(req_ids=["a", "b"])
    runner.requests = {}
    runner._draft_probs = "stale"
    hidden = torch.zeros(4, 3)
    spec_meta = SimpleNamespace(num_draft_tokens=[2, 0])
    args = ["sched", [[5, 6], [7]], "sampling", "hidden", hidden, None, spec_meta,
            "attn_meta"]
    out = runner.propose_draft_token_ids(*args, slot_mappings=None)
    assert out == [[], [1, 2]]
    assert runner._draft_probs is None and runner._draft_prob_req_ids is None
    step = calls["step"]
    # request a: rows 0..2, two tokens emitted -> row 1; request b: row 3.
    assert [(r.req_id, r.row, r.init_token, r.tree_ok) for r in step.requests] == [
        ("a", 1, 6, False), ("b", 3, 7, False)]
    assert calls["hidden"] is hidden


@pytest.mark.parametrize("method,drafter", [
    ("custom_class", SimpleNamespace()),  # a custom proposer without the hook
    ("ngram", SimpleNamespace(propose_step=lambda step, hidden: None)),
])
def test_runner_hook_leaves_other_proposers_alone(method, drafter):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner = object.__new__(GPUModelRunner)
    runner.drafter = drafter
    runner.speculative_config = SimpleNamespace(method=method)
    # vLLM's original runs: its first statement reads this attribute.
    with pytest.raises(AttributeError, match="total_num_scheduled_tokens"):
        runner.propose_draft_token_ids(SimpleNamespace(), [[5]], None, None, None, None,
                                       None, None, None)


def _profiling_runner(drafter, method="custom_class"):
    """A GPUModelRunner with only what vLLM's own profile_run reads (no __init__)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    events = []
    runner = object.__new__(GPUModelRunner)
    runner.supports_mm_inputs = False
    runner.max_num_tokens = 64
    runner.max_num_reqs = 48
    runner.is_pooling_model = False
    runner.encoder_cache = {}
    runner.drafter = drafter
    runner.speculative_config = SimpleNamespace(method=method)
    runner._dummy_run = lambda n, **kw: events.append(("target", n)) or ("h", "last")
    runner._dummy_sampler_run = lambda hidden: events.append(("sampler", hidden))
    runner._sync_device = lambda: events.append(("sync",))
    return runner, events


def test_profile_hook_profiles_the_drafter_at_the_largest_batch(monkeypatch):
    from vllm.v1.worker import gpu_model_runner

    patches.ensure_applied(hooks.PROFILE_HOOK)
    monkeypatch.setattr(gpu_model_runner, "get_pp_group",
                        lambda: SimpleNamespace(is_last_rank=True))
    drafter = SimpleNamespace(propose_step=lambda step, hidden: None)
    runner, events = _profiling_runner(drafter)
    drafter.profile_run = lambda num_reqs: events.append(("drafter", num_reqs))
    runner.profile_run()
    # vLLM's own profiling first, then the drafter at max_num_seqs, still inside it
    assert events == [("target", 64), ("sampler", "last"), ("sync",), ("drafter", 48)]


def test_profile_hook_leaves_other_proposers_alone(monkeypatch):
    from vllm.v1.worker import gpu_model_runner

    patches.ensure_applied(hooks.PROFILE_HOOK)
    monkeypatch.setattr(gpu_model_runner, "get_pp_group",
                        lambda: SimpleNamespace(is_last_rank=True))
    drafter = SimpleNamespace(propose_step=lambda step, hidden: None)
    runner, events = _profiling_runner(drafter, method="ngram")
    drafter.profile_run = lambda num_reqs: events.append(("drafter", num_reqs))
    runner.profile_run()
    assert ("drafter", 48) not in events and ("target", 64) in events


def test_user_can_skip_only_skippable_patches(monkeypatch):
    """``VLLM_REDRAFTER_SKIP_PATCHES`` leaves a vLLM bug fix out (the tests' negative
    control of each fix); hooks ReDrafter runs on cannot be skipped, typos are errors."""
    import dataclasses

    from vllm_redrafter.integration import cpu_fixes

    monkeypatch.setenv(patches.ENV_SKIP, hooks.RUNNER_HOOK)
    with pytest.raises(PatchError, match="not skippable"):
        patches.skipped_by_user()
    monkeypatch.setenv(patches.ENV_SKIP, "cpu-expand-kernel-fx")
    with pytest.raises(PatchError, match="cpu-expand-kernel-fix"):  # lists the valid ones
        patches.skipped_by_user()
    monkeypatch.setenv(patches.ENV_SKIP, f" {cpu_fixes.CPU_EXPAND_FIX}, ")
    assert patches.skipped_by_user() == {cpu_fixes.CPU_EXPAND_FIX}

    calls = []
    fake = dataclasses.replace(patches.get_patch(cpu_fixes.CPU_EXPAND_FIX),
                               apply=lambda: calls.append("applied"))
    monkeypatch.setattr(patches, "_applied", [])
    monkeypatch.setattr(patches, "_skipped", [])
    patches._apply_one(fake)
    assert calls == [] and patches._skipped == [cpu_fixes.CPU_EXPAND_FIX]
    monkeypatch.delenv(patches.ENV_SKIP)
    monkeypatch.setattr(patches, "_skipped", [])
    patches._apply_one(fake)
    assert calls == ["applied"] and patches.applied() == [cpu_fixes.CPU_EXPAND_FIX]

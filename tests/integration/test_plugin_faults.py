# SPDX-License-Identifier: Apache-2.0
"""The plugin never takes vLLM down (issue: reliability, item 1).

Each plugin-stage patch's guard is forced to fail by "moving" the vLLM internal it wraps
(an extra parameter, a staticmethod turned into a function, ...), in a fresh interpreter.
The plugin must then: not raise; roll back every patch it had applied (all targets are the
objects found before); log one WARNING naming the failed patch; refuse only a ReDrafter
request, naming the cause; and leave other speculative configs to vLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_redrafter.integration import cpu_fixes, hooks

SCRIPT = Path(__file__).with_name("plugin_fault_script.py")
CASES = [hooks.CONFIG_HOOK, hooks.CLI_ARG_HOOK, hooks.CLI_MERGE_HOOK, cpu_fixes.CPU_EXPAND_FIX]


def _run(*args: str) -> dict[str, dict]:
    env = {**os.environ, "VLLM_CONFIGURE_LOGGING": "0", "VLLM_PLUGINS": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["case"]: row for row in rows}


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return _run(*CASES)


@pytest.mark.parametrize("case", CASES)
def test_failed_patch_leaves_vllm_untouched_and_refuses_only_redrafter(results, case):
    row = results[case]
    assert row["status"] == "failed", row
    assert f"patch {case}" in row["detail"], row
    # everything applied before the failure was undone; only the refusal guard is in
    assert row["applied"] == [hooks.REFUSAL_GUARD], row
    assert row["untouched"], row
    log = [line for line in row["log"].splitlines() if "vllm-redrafter" in line]
    assert len(log) == 1 and "rolled back" in log[0] and case in log[0], row["log"]
    assert row["guard_message"] is not None, row
    assert "ReDrafter speculative decoding is unavailable" in row["guard_message"], row
    assert f"patch {case}" in row["guard_message"], row
    assert row["other_spec_ok"], row


def test_without_rollback_vllm_would_stay_half_patched():
    """Negative control: the cli-merge guard fails *after* the config and cli-arg patches
    were applied (ledger order); with the rollback switched off they stay in vLLM."""
    row = _run("--no-rollback", hooks.CLI_MERGE_HOOK)[hooks.CLI_MERGE_HOOK]
    assert row["status"] == "failed"
    assert not row["untouched"], row


LLM_CODE = """
import json, sys
from vllm.engine.arg_utils import EngineArgs
original = EngineArgs.__dict__["from_cli_args"].__func__
def from_cli_args(cls, args, extra=None):  # vLLM internals "moved": one extra parameter
    return original(cls, args)
EngineArgs.from_cli_args = classmethod(from_cli_args)
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
kw = dict(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, max_model_len=128)
try:
    LLM(speculative_config={"method": "redrafter", "model": sys.argv[2]}, **kw)
except Exception as err:
    print("REDRAFTER:", type(err).__name__, err)
llm = LLM(**kw)
out = llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7])],
                   SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
print("PLAIN:", list(out[0].outputs[0].token_ids))
"""


def test_plain_llm_still_serves_when_the_plugin_cannot_load(tiny_llama_dir, tmp_path):
    """The issue's reproduction: with ``EngineArgs.from_cli_args`` given one extra parameter
    before vLLM loads its plugins, a plain ``LLM(model)`` generates, and a ReDrafter
    request is refused with the failed patch named."""
    env = {**os.environ, "VLLM_CONFIGURE_LOGGING": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-c", LLM_CODE, str(tiny_llama_dir),
                           str(tmp_path / "drafter")], capture_output=True, text=True,
                          timeout=600, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    assert "REDRAFTER: RuntimeError ReDrafter speculative decoding is unavailable" in out, out
    assert f"patch {hooks.CLI_MERGE_HOOK}" in out, out
    plain = [line for line in out.splitlines() if line.startswith("PLAIN:")]
    assert len(plain) == 1 and len(json.loads(plain[0].split(":", 1)[1])) == 3, out

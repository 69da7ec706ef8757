# SPDX-License-Identifier: Apache-2.0
"""Run in a fresh interpreter by test_plugin_faults.py: force each plugin-stage patch's
guard to fail (vLLM internals "moved"), call the plugin, and report what it left behind.

Prints one JSON line per case: ``{"case", "status", "detail", "log", "untouched",
"guard_message", "other_spec_ok"}``.
"""

from __future__ import annotations

import io
import json
import logging
import sys

import vllm  # noqa: F401  (the plugin reads its version)
from vllm.engine.arg_utils import EngineArgs
from vllm.utils import cpu_triton_utils

from vllm_redrafter import plugin
from vllm_redrafter.integration import cpu_fixes, hooks, patches

ORIGINALS = {
    "create_speculative_config": (EngineArgs, "create_speculative_config"),
    "add_cli_args": (EngineArgs, "add_cli_args"),
    "from_cli_args": (EngineArgs, "from_cli_args"),
    "_expand_kernel_impl": (cpu_triton_utils, "_expand_kernel_impl"),
}
SAVED = {k: vars(owner)[attr] for k, (owner, attr) in ORIGINALS.items()}


def _moved_create_speculative_config(self, target_model_config, parallel_config, extra):
    raise AssertionError("never called by the test")


def _moved_from_cli_args(cls, args, extra=None):  # one extra parameter (the case)
    return SAVED["from_cli_args"].__func__(cls, args)


def _moved_expand(output, input_val, cu_num_tokens, replace_from, replace_to):
    raise AssertionError("never called by the test")


BREAKERS = {
    hooks.CONFIG_HOOK: ("create_speculative_config", _moved_create_speculative_config),
    hooks.CLI_ARG_HOOK: ("add_cli_args", lambda parser: parser),  # no longer a staticmethod
    hooks.CLI_MERGE_HOOK: ("from_cli_args", classmethod(_moved_from_cli_args)),
    cpu_fixes.CPU_EXPAND_FIX: ("_expand_kernel_impl", _moved_expand),
}


def _restore() -> None:
    for key, (owner, attr) in ORIGINALS.items():
        setattr(owner, attr, SAVED[key])


def _case(name: str) -> dict:
    _restore()
    plugin._state.clear()
    patches._applied.clear()
    key, broken = BREAKERS[name]
    owner, attr = ORIGINALS[key]
    setattr(owner, attr, broken)
    before = {k: vars(o)[a] for k, (o, a) in ORIGINALS.items()}
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("vllm").addHandler(handler)
    try:
        plugin.register()  # must not raise
    finally:
        logging.getLogger("vllm").removeHandler(handler)
    after = {k: vars(o)[a] for k, (o, a) in ORIGINALS.items()}
    # Everything but create_speculative_config is exactly as before; that one may only
    # be the refusal guard (which wraps what was there).
    untouched = all(after[k] is before[k] for k in after if k != "create_speculative_config")
    guard = after["create_speculative_config"]
    guard_ok = guard is before["create_speculative_config"] or (
        patches.is_patched(guard, hooks.REFUSAL_GUARD)
        and guard.__wrapped__ is before["create_speculative_config"])
    message = None
    try:
        args = EngineArgs(model="unused", speculative_config={"method": "redrafter",
                                                              "model": "/nowhere"})
        EngineArgs.create_speculative_config(args, None, None)
    except Exception as err:  # noqa: BLE001
        message = f"{type(err).__name__}: {err}"
    other_ok = True
    if name != hooks.CONFIG_HOOK:  # the moved function itself cannot be called
        other_ok = EngineArgs.create_speculative_config(EngineArgs(model="unused"), None,
                                                        None) is None
    return {"case": name, "status": plugin.status().get("status"),
            "detail": plugin.status().get("detail"), "log": stream.getvalue(),
            "untouched": untouched and guard_ok, "guard_message": message,
            "other_spec_ok": other_ok, "applied": patches.applied()}


if __name__ == "__main__":
    cases = sys.argv[1:]
    if cases and cases[0] == "--no-rollback":  # negative control of the test
        cases = cases[1:]
        patches._snapshot = lambda patch: (lambda: None)
    for case in cases:
        print(json.dumps(_case(case)), flush=True)
    _restore()

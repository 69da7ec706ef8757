# SPDX-License-Identifier: Apache-2.0
"""``stop_process_group`` stops a server the way ``vllm serve`` expects: SIGTERM to the
leader only (it shuts its engine processes down in order), then nothing left behind.

The leader here is a small Python process with one child in its process group, standing in
for the API server and its engine core. On SIGTERM the leader records whether its child is
still alive (an engine core that died first is what made the real server log
``EngineDeadError``), then exits without stopping the child; the group kill must reap it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vllm_redrafter.server import stop_process_group

_LEADER = r"""
import os, signal, subprocess, sys, time
report = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(report + ".child", "w").write(str(child.pid))
def on_term(signum, frame):
    time.sleep(0.3)  # an engine core hit by the same signal would be gone by now
    alive = child.poll() is None
    open(report, "w").write("alive" if alive else "dead")
    os._exit(0)  # leaves the child running: the group kill must stop it
signal.signal(signal.SIGTERM, on_term)
open(report + ".ready", "w").write("1")
time.sleep(600)
"""


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    report = tmp_path / "report"
    proc = subprocess.Popen([sys.executable, "-c", _LEADER, str(report)],
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "report.ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "leader did not start"
        time.sleep(0.05)
    return proc, report


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie child of the (exited) leader is re-parented and reaped by init
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" in status.read_text()


def test_leader_stops_first_and_nothing_is_left(tmp_path):
    proc, report = _start(tmp_path)
    child_pid = int((tmp_path / "report.child").read_text())
    stop_process_group(proc, grace=30)
    assert report.read_text() == "alive"  # the child was not signalled before the leader
    assert proc.returncode is not None
    deadline = time.monotonic() + 10
    while not _gone(child_pid):
        assert time.monotonic() < deadline, "the leader's child outlived stop_process_group"
        time.sleep(0.05)


def test_negative_control_signalling_the_whole_group_kills_the_child_first(tmp_path):
    """What the old stop did (SIGTERM to the group): the child dies before the leader
    looks, so this harness does see the race the fix removes."""
    proc, report = _start(tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    assert report.read_text() == "dead"

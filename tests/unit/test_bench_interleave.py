# SPDX-License-Identifier: Apache-2.0
"""`bench`'s interleaved run (vllm_redrafter.bench.interleave) against fake engines that
speak the ``worker --serve`` protocol: the order cells run in, and what a configuration
that fails to start, crashes or hangs does to the others."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from vllm_redrafter.bench.interleave import cell_order, run_interleaved
from vllm_redrafter.bench.runner import BenchSettings

FAKE_WORKER = textwrap.dedent('''
    """A stand-in for `worker --serve`: same protocol, no engine. Its spec says where to
    log each cell it runs and whether to fail."""
    import json, os, sys, time
    from vllm_redrafter.bench.report import CellResult
    from vllm_redrafter.bench.runner import cell_to_json

    job = json.load(open(sys.argv[1]))
    name, spec = job["name"], job["spec"] or {}
    if spec.get("fail_start"):
        sys.exit(3)
    reply = os.fdopen(int(sys.argv[2]), "w", buffering=1)
    reply.write(json.dumps({"ready": True}) + "\\n")
    for count, line in enumerate(sys.stdin):
        command = json.loads(line)
        if command["op"] == "quit":
            break
        if count == spec.get("crash_at"):
            os._exit(5)
        if count == spec.get("hang_at"):
            time.sleep(60)
        with open(spec["log"], "a") as log:
            log.write(f"{name} {command['temperature']} {command['concurrency']}\\n")
        cell = CellResult(config=name, concurrency=command["concurrency"],
                          temperature=command["temperature"], num_prompts=1,
                          output_tokens=10, wall_s=1.0, token_ids=[[1, 2]])
        reply.write(json.dumps({"cell": cell_to_json(cell)}) + "\\n")
''')


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return (sys.executable, str(script))


def _settings(timeout_s: float = 30.0) -> BenchSettings:
    return BenchSettings(target="unused", prompts=[[1, 2, 3]], max_tokens=4,
                         concurrency=[1, 4], temperatures=[0.0, 0.7], timeout_s=timeout_s)


def _ran(log: Path) -> list[tuple[str, float, int]]:
    rows = [line.split() for line in log.read_text().splitlines()]
    return [(name, float(t), int(c)) for name, t, c in rows]


def test_cell_order_alternates_so_no_config_always_runs_first():
    names = ["none", "redrafter", "redrafter-tree"]
    firsts = [cell_order(names, index, round_)[0] for round_ in range(2)
              for index in range(4)]
    assert firsts.count("none") == firsts.count("redrafter-tree") == 4
    assert cell_order(names, 1, 0) == names[::-1]
    assert all(sorted(cell_order(names, i, 0)) == sorted(names) for i in range(3))


def test_every_cell_runs_on_all_engines_back_to_back(fake, tmp_path):
    log = tmp_path / "ran.log"
    specs = {"none": {"log": str(log)}, "redrafter": {"log": str(log)}}
    cells = run_interleaved(["none", "redrafter"], specs, _settings(), repeats=2,
                            command=fake)
    assert [c.status for c in cells] == ["ok"] * 16
    ran = _ran(log)
    # Each cell on both engines before the next cell (a sequential run would have run
    # all four of one config's cells first), alternating which goes first.
    grid = [(0.0, 1), (0.0, 4), (0.7, 1), (0.7, 4)]
    for step, (t, c) in enumerate(grid * 2):
        pair = ran[2 * step: 2 * step + 2]
        assert {(x[1], x[2]) for x in pair} == {(t, c)}, ran
        first = "none" if (step % 4 + step // 4) % 2 == 0 else "redrafter"
        assert pair[0][0] == first, ran
    # The report keeps a sequential run's order: round, config, temperature, concurrency.
    assert [(c.repeat, c.config, c.temperature, c.concurrency) for c in cells[:4]] == [
        (0, "none", t, c) for t, c in grid]
    assert {c.repeat for c in cells[8:]} == {1}


def test_a_config_that_crashes_fails_its_later_cells_only(fake, tmp_path):
    log = tmp_path / "ran.log"
    specs = {"none": {"log": str(log)}, "redrafter": {"log": str(log), "crash_at": 2}}
    cells = run_interleaved(["none", "redrafter"], specs, _settings(), command=fake)
    red = [c for c in cells if c.config == "redrafter"]
    assert [c.status for c in red] == ["ok", "ok", "failed", "failed"]
    assert "exited with code 5" in red[2].error and red[3].error == red[2].error
    assert all(c.status == "ok" for c in cells if c.config == "none")


def test_a_config_that_cannot_start_fails_and_the_others_run(fake, tmp_path):
    log = tmp_path / "ran.log"
    specs = {"none": {"log": str(log)}, "redrafter": {"fail_start": True}}
    cells = run_interleaved(["none", "redrafter"], specs, _settings(), command=fake,
                            out_dir=tmp_path)
    red = [c for c in cells if c.config == "redrafter"]
    assert len(red) == 4 and all(c.status == "failed" for c in red)
    assert "start: exited with code 3" in red[0].error and "redrafter.log" in red[0].error
    assert all(c.status == "ok" for c in cells if c.config == "none")
    assert len(_ran(log)) == 4


def test_a_hung_config_times_out_and_is_killed(fake, tmp_path):
    log = tmp_path / "ran.log"
    specs = {"none": {"log": str(log)}, "redrafter": {"log": str(log), "hang_at": 0}}
    cells = run_interleaved(["none", "redrafter"], specs, _settings(timeout_s=2.0),
                            command=fake)
    red = [c for c in cells if c.config == "redrafter"]
    assert all(c.status == "failed" for c in red)
    assert "timed out after 2 s" in red[0].error
    assert all(c.status == "ok" for c in cells if c.config == "none")

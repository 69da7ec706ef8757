# SPDX-License-Identifier: Apache-2.0
"""``bench --max-steal``: a cell measured while the hypervisor stole CPU time is measured
again, and the least-stolen attempt is kept (the engine itself is faked)."""

import pytest

from vllm_redrafter.bench import worker
from vllm_redrafter.bench.machine import steal_share, stolen_seconds
from vllm_redrafter.bench.report import CellResult


def _fake_attempts(monkeypatch, shares):
    """``_measure_once`` returning cells with these stolen shares, in turn."""
    calls = []

    def measure_once(llm, name, spec, s, temperature, concurrency, tag):
        share = shares[len(calls)]
        calls.append(tag)
        return CellResult(config=name, concurrency=concurrency, temperature=temperature,
                          output_tokens=100, wall_s=1.0 + share, steal_share=share)

    monkeypatch.setattr(worker, "_measure_once", measure_once)
    return calls


def _measure(settings):
    return worker._measure_cell(None, "none", None, settings, 0.0, 4, "c4")


def test_a_stolen_cell_is_measured_again_and_the_least_stolen_kept(monkeypatch):
    calls = _fake_attempts(monkeypatch, [0.30, 0.12, 0.20])
    cell = _measure({"max_steal": 0.05, "steal_retries": 2})
    assert calls == ["c4", "c4a1", "c4a2"]  # distinct request tags per attempt
    assert (cell.steal_share, cell.attempts, cell.wall_s) == (0.12, 3, pytest.approx(1.12))


def test_measuring_stops_at_the_first_clean_attempt(monkeypatch):
    calls = _fake_attempts(monkeypatch, [0.30, 0.01, 0.0])
    cell = _measure({"max_steal": 0.05, "steal_retries": 2})
    assert len(calls) == 2 and (cell.steal_share, cell.attempts) == (0.01, 2)


def test_without_a_limit_every_cell_is_measured_once(monkeypatch):
    # negative controls: no limit, no retries, or no steal reading (not a VM / no /proc)
    for settings in ({"max_steal": None, "steal_retries": 2},
                     {"max_steal": 0.05, "steal_retries": 0}, {}):
        calls = _fake_attempts(monkeypatch, [0.30, 0.0])
        cell = _measure(settings)
        assert len(calls) == 1 and (cell.steal_share, cell.attempts) == (0.30, 1)
    monkeypatch.setattr(worker, "_measure_once", lambda *a: CellResult(
        config="none", concurrency=4, temperature=0.0, steal_share=None))
    assert _measure({"max_steal": 0.05, "steal_retries": 2}).attempts == 1


def test_steal_is_counted_on_the_most_stolen_cpu():
    """The model's worker runs on one CPU and the steal falls there: 1 s stolen from it in
    10 s is 10% of its time, not the 5% a two-CPU machine-wide average would say."""
    assert stolen_seconds((10.0, 4.0), (11.0, 4.0)) == 1.0
    assert stolen_seconds((10.0, 4.0), (10.2, 4.7)) == pytest.approx(0.7)
    assert steal_share((10.0, 4.0), (11.0, 4.0), 10.0) == pytest.approx(0.1)
    assert steal_share((10.0, 4.0), (10.0, 4.0), 10.0) == 0.0
    # no reading, no time, or a CPU come online in between: unknown
    assert steal_share(None, (12.0, 2.0), 10.0) is None
    assert steal_share((10.0, 4.0), (12.0, 4.0), 0.0) is None
    assert stolen_seconds((10.0,), (10.0, 4.0)) is None

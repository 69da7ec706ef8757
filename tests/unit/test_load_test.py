# SPDX-License-Identifier: Apache-2.0
"""The load test's plan, summary and stream checks (no server)."""

from __future__ import annotations

from vllm_redrafter.bench import load_test as lt


def _result(req, status, ids, finish=None, latency=1.0):
    return lt.LoadResult(req, status, list(ids), finish, latency, 0.1)


def test_plan_mixes_lengths_and_outcomes():
    plan = lt.plan_requests([[1], [2], [3]], clients=16, lengths=(4, 8))
    assert [r.kind for r in plan].count(lt.DISCONNECT) == 2  # requests 3 and 11
    assert [r.index for r in plan if r.kind == lt.ABORT] == [7, 15]
    assert {r.max_tokens for r in plan} == {4, 8}
    assert [r.prompt_key for r in plan[:4]] == [0, 1, 2, 0] and plan[3].prompt == (1,)


def test_check_streams_finds_dropped_duplicated_and_short_streams():
    req = lt.LoadRequest(0, 0, (1,), 4, lt.COMPLETE)
    reference = {0: [5, 6, 7, 8, 9]}
    good = _result(req, "ok", [5, 6, 7, 8], "length")
    assert lt.check_streams([good], reference) == []
    dropped = _result(req, "ok", [5, 7, 8, 9], "length")
    duplicated = _result(req, "ok", [5, 6, 6, 7], "length")
    short = _result(req, "ok", [5, 6, 7], "length")
    early_stop = _result(req, "ok", [5, 6], "stop")
    problems = lt.check_streams([dropped, duplicated, short, early_stop], reference)
    assert len(problems) == 4 and "first difference at 1" in problems[0]
    assert "first difference at 2" in problems[1]
    cut = lt.LoadRequest(1, 0, (1,), 4, lt.DISCONNECT)
    assert lt.check_streams([_result(cut, "disconnected", [5, 6])], reference) == []
    assert lt.check_streams([_result(cut, "disconnected", [6])], reference)
    # a reference that ends (EOS) before max_tokens: the stream must stop there too
    assert lt.check_streams([_result(req, "ok", [5, 6], "stop")], {0: [5, 6]}) == []


def test_summary_counts_and_percentiles():
    req = lt.LoadRequest(0, 0, (1,), 4, lt.COMPLETE)
    results = [_result(req, "ok", [1, 2], latency=t) for t in (1.0, 2.0, 3.0, 4.0)]
    results.append(lt.LoadResult(req, "error", [], None, 0.5, None, "boom"))
    summary = lt.summarize(results, wall=2.0)
    assert summary["ok"] == 4 and summary["error"] == 1 and summary["errors"] == ["#0: boom"]
    assert summary["requests_per_s"] == 2.0 and summary["output_tok_per_s"] == 4.0
    assert summary["latency_p50_s"] in (2.0, 3.0) and summary["latency_p99_s"] == 4.0

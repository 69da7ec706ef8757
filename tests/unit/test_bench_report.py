# SPDX-License-Identifier: Apache-2.0
"""Benchmark arithmetic on recorded metrics: counters, τ, ratios, identical outputs, JSON."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vllm_redrafter.bench import report as rep


def _metrics(drafts, draft_tokens, accepted, per_pos):
    """Objects shaped like vllm.v1.metrics.reader Counter / Vector."""
    return [
        SimpleNamespace(name="vllm:spec_decode_num_drafts", value=drafts),
        SimpleNamespace(name="vllm:spec_decode_num_draft_tokens", value=draft_tokens),
        SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens", value=accepted),
        SimpleNamespace(name="vllm:spec_decode_num_accepted_tokens_per_pos", values=per_pos),
        SimpleNamespace(name="vllm:generation_tokens", value=999),
    ]


def test_counters_from_metrics_and_delta():
    before = rep.counters_from_metrics(_metrics(5, 15, 4, [3, 1, 0]))
    after = rep.counters_from_metrics(_metrics(15, 45, 18, [11, 5, 2]))
    delta = after.minus(before)
    assert (delta.num_drafts, delta.num_draft_tokens, delta.num_accepted_tokens) == (10, 30, 14)
    assert delta.accepted_per_pos == [8, 4, 2]
    assert delta.mean_acceptance_length == pytest.approx(2.4)
    assert delta.acceptance_per_depth == pytest.approx([0.8, 0.4, 0.2])
    assert delta.draft_acceptance_rate == pytest.approx(14 / 30)


def test_no_speculation_has_no_tau():
    counters = rep.counters_from_metrics([])
    assert counters.mean_acceptance_length is None
    assert counters.acceptance_per_depth is None


def test_count_identical():
    assert rep.count_identical([[1, 2], [3], [4, 5]], [[1, 2], [3, 9], [4, 5]]) == (2, 3)
    assert rep.count_identical([[1]], []) == (0, 0)


def _cell(config, conc, temp, tokens, wall, counters=None, token_ids=None, **kw):
    return rep.CellResult(config=config, concurrency=conc, temperature=temp,
                          num_prompts=len(token_ids or []), output_tokens=tokens,
                          wall_s=wall, counters=counters or rep.SpecCounters(),
                          token_ids=token_ids or [], **kw)


def test_summarize_ratios_identical_and_failures():
    base_ids = [[1, 2, 3], [4, 5]]
    cells = [
        _cell("none", 1, 0.0, 100, 10.0, token_ids=base_ids),
        _cell("redrafter", 1, 0.0, 100, 4.0, rep.SpecCounters(10, 30, 14, [8, 4, 2]),
              token_ids=[[1, 2, 3], [4, 6]], draft_s=1.0),
        _cell("ngram", 1, 0.0, 100, 8.0, token_ids=base_ids),
        _cell("redrafter", 1, 0.7, 90, 6.0, token_ids=[[7], [8]]),
        rep.CellResult(config="ngram", concurrency=1, temperature=0.7, status="failed",
                       error="boom"),
    ]
    rows = {(r["config"], r["temperature"]): r for r in rep.summarize(cells)}
    red = rows[("redrafter", 0.0)]
    assert red["output_tok_per_s"] == 25.0
    assert red["speedup_vs_baseline"] == 2.5
    assert red["mean_acceptance_length"] == 2.4
    assert red["identical_to_baseline"] == 1 and red["compared_to_baseline"] == 2
    assert red["draft_time_share"] == 0.25
    assert rows[("ngram", 0.0)]["speedup_vs_baseline"] == 1.25
    assert rows[("ngram", 0.0)]["identical_to_baseline"] == 2
    # No baseline at T=0.7 in this invocation: no ratio, and sampled runs are never compared.
    assert rows[("redrafter", 0.7)]["speedup_vs_baseline"] is None
    assert red["accepted_sources"] is None  # no look-up in this cell
    assert rows[("redrafter", 0.7)]["identical_to_baseline"] is None
    assert rows[("ngram", 0.7)]["status"] == "failed"
    assert rows[("ngram", 0.7)]["output_tok_per_s"] is None


STABLE_KEYS = {
    "config", "concurrency", "temperature", "status", "error", "num_prompts",
    "output_tokens", "wall_s", "output_tok_per_s", "speedup_vs_baseline",
    "mean_acceptance_length", "acceptance_per_depth", "draft_acceptance_rate",
    "mean_verified_tokens", "num_drafts",
    "num_draft_tokens", "num_accepted_tokens", "draft_time_share", "identical_to_baseline",
    "compared_to_baseline", "no_draft_share", "mean_draft_length", "accepted_sources",
    "beams_skipped_share", "repeat", "steal_share", "attempts", "stolen_s", "net_tok_per_s",
    "net_speedup_vs_baseline"}


def test_report_schema_and_files(tmp_path):
    cells = [_cell("none", 1, 0.0, 50, 5.0, token_ids=[[1]]),
             _cell("redrafter", 1, 0.0, 50, 2.5, rep.SpecCounters(4, 12, 6, [3, 2, 1]),
                   token_ids=[[1]])]
    report = rep.build_report(cells, {"max_tokens": 8}, {"date": "x", "command": "y"})
    paths = rep.write_reports(report, tmp_path)
    loaded = json.loads(paths["json"].read_text())
    assert loaded["schema"] == rep.SCHEMA
    assert loaded["settings"] == {"max_tokens": 8}
    assert all(set(r) == STABLE_KEYS for r in loaded["results"])
    md = paths["md"].read_text()
    assert "| redrafter | 1 | 0.0 | 20.0 | 2.00× | – | – | 2.50 |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert loaded["repeats"] == [] and "rounds" not in md  # one round: no summary


def test_repeats_compare_each_round_with_its_own_baseline():
    """``bench --repeats``: a cell's ratio uses its own round's baseline (the baseline
    moved 10 -> 5 s between rounds here), and the summary gives the median and range.
    Negative control: against round 0's baseline, round 1 would read 0.5x."""
    cells = []
    for round_, (base_wall, walls) in enumerate([(10.0, 10.0), (5.0, 5.5), (8.0, 7.6)]):
        cells += [_cell("none", 1, 0.0, 100, base_wall, token_ids=[[1]], repeat=round_),
                  _cell("x", 1, 0.0, 100, walls, token_ids=[[1]], repeat=round_)]
    rows = rep.summarize(cells)
    ratios = [r["speedup_vs_baseline"] for r in rows if r["config"] == "x"]
    assert ratios == [1.0, pytest.approx(0.909, abs=1e-3), pytest.approx(1.053, abs=1e-3)]
    assert rep.repeat_summary(rows) == [{"config": "x", "concurrency": 1,
                                         "temperature": 0.0, "median": 1.0,
                                         "low": ratios[1], "high": ratios[2],
                                         "best": 0.909, "repeats": 3, "net_median": None,
                                         "net_low": None, "net_high": None}]
    md = rep.markdown_table(rep.build_report(cells, {}, {}))
    assert "| x #2 | 1 | 0.0 |" in md
    assert "| x | 1 | 0.0 | 1.00× | 0.91–1.05× | 0.91× | – | – | 3 |" in md


def test_repeats_best_compares_each_engines_fastest_round():
    """``best`` divides the config's fastest round by the baseline's fastest round, even
    when they come from different rounds: both engines ran 10 s clean once, so ``best``
    is 1.0x, while the same-round ratios (2.0x in a round where a burst slowed only the
    baseline, then 0.91x and 0.83x where bursts slowed only the config) give a median of
    0.91x. Negative control: a faster baseline round (9 s) moves ``best`` to 0.9x."""
    cells = []
    for round_, (base_wall, wall) in enumerate([(20.0, 10.0), (10.0, 11.0), (10.0, 12.0)]):
        cells += [_cell("none", 1, 0.0, 100, base_wall, token_ids=[[1]], repeat=round_),
                  _cell("x", 1, 0.0, 100, wall, token_ids=[[1]], repeat=round_)]
    (summary,) = rep.repeat_summary(rep.summarize(cells))
    assert summary["median"] == pytest.approx(0.909, abs=1e-3)
    assert summary["high"] == 2.0
    assert summary["best"] == 1.0
    cells[0] = _cell("none", 1, 0.0, 100, 9.0, token_ids=[[1]], repeat=0)
    assert rep.repeat_summary(rep.summarize(cells))[0]["best"] == pytest.approx(0.9)


def test_verified_tokens_and_tree_config_names():
    from vllm_redrafter.bench.runner import config_specs, parse_redrafter_name

    counters = rep.SpecCounters(num_drafts=4, num_draft_tokens=28, num_accepted_tokens=6,
                                accepted_per_pos=[3, 2, 1] + [0] * 13)
    assert counters.mean_verified_tokens == 8.0
    assert rep._depths(counters.acceptance_per_depth) == [0.75, 0.5, 0.25, 0.0]
    assert parse_redrafter_name("redrafter-tree@W2L4") == (True, 2, 4)
    assert parse_redrafter_name("redrafter@W1L5") == (False, 1, 5)
    assert parse_redrafter_name("redrafter-tree") is None
    specs = config_specs("d", 4, 5, names=["redrafter@W1L5"])
    assert specs["redrafter-tree"]["tree"] is True and specs["redrafter"]["tree"] is False
    assert specs["redrafter@W1L5"]["beam_width"] == 1
    auto = config_specs("d", 4, 5, names=["redrafter+auto", "redrafter-tree@W2L4+auto",
                                           "ngram+auto"])
    assert auto["redrafter+auto"] == {**auto["redrafter"], "adaptive": True}
    assert auto["redrafter-tree@W2L4+auto"]["beam_width"] == 2
    assert auto["redrafter-tree@W2L4+auto"]["adaptive"] is True
    assert "ngram+auto" not in auto
    # plain names are fixed drafting whatever the option's default (load-aware)
    assert auto["redrafter"]["adaptive"] is False
    assert auto["redrafter-tree"]["adaptive"] is False
    hybrid = config_specs("d", 4, 5, names=["redrafter-tree+lookup",
                                             "redrafter-tree@W2L5+lookup+auto",
                                             "redrafter+lookup",
                                             "redrafter-tree@W1L5+lookup4"])
    assert hybrid["redrafter-tree+lookup"] == {**hybrid["redrafter-tree"], "lookup": True}
    both = hybrid["redrafter-tree@W2L5+lookup+auto"]
    assert (both["beam_width"], both["lookup"], both["adaptive"]) == (2, True, True)
    assert "redrafter+lookup" not in hybrid  # chain configs cannot take look-up
    assert hybrid["redrafter-tree@W1L5+lookup4"]["lookup"] == {"extra_nodes": 4}
    dtypes = config_specs("d", 4, 5, names=["redrafter+auto+fp32draft", "redrafter+bf16draft"])
    assert dtypes["redrafter+auto+fp32draft"] == {**dtypes["redrafter"], "adaptive": True,
                                                  "draft_dtype": "float32"}
    assert dtypes["redrafter+bf16draft"]["draft_dtype"] == "bfloat16"
    int8 = config_specs("d", 4, 5, names=["redrafter+auto+int8", "redrafter-tree+int8"])
    assert int8["redrafter+auto+int8"] == {**int8["redrafter"], "adaptive": True,
                                           "draft_int8": True, "draft_bits": 8}
    int4 = config_specs("d", 4, 5, names=["redrafter-default+int4"])
    assert int4["redrafter-default+int4"] == {"method": "redrafter", "model": "d",
                                              "draft_int8": True, "draft_bits": 4}
    assert int8["redrafter-tree+int8"]["draft_int8"] is True
    off = config_specs("d", 4, 5, names=["redrafter@W1L5+auto+noint8"])
    assert off["redrafter@W1L5+auto+noint8"]["draft_int8"] is False
    assert "draft_int8" not in int8["redrafter"]  # the option's default ("auto")
    assert int8["redrafter-default"] == {"method": "redrafter", "model": "d"}
    default = config_specs("d", 4, 5, names=["redrafter-default+noint8"])
    assert default["redrafter-default+noint8"] == {"method": "redrafter", "model": "d",
                                                   "draft_int8": False}
    skip = config_specs("d", 4, 5, names=["redrafter-tree+lookup4+skip3+auto",
                                           "redrafter-tree+lookup+skip2", "redrafter-tree+skip3"])
    assert skip["redrafter-tree+lookup4+skip3+auto"]["lookup"] == {"extra_nodes": 4,
                                                                  "skip_beams_match": 3}
    assert skip["redrafter-tree+lookup+skip2"]["lookup"] == {"skip_beams_match": 2}
    assert "redrafter-tree+skip3" not in skip  # +skip<N> needs +lookup
    deep = config_specs("d", 1, 5, names=[
        "redrafter-tree@W1L5+lookup4+skip3+deep8+auto", "redrafter-tree+deep8"])
    assert deep["redrafter-tree@W1L5+lookup4+skip3+deep8+auto"]["lookup"] == {
        "extra_nodes": 4, "skip_beams_match": 3, "trusted_depth": 8}
    assert "redrafter-tree+deep8" not in deep  # +deep<N> needs +lookup


def test_policy_columns():
    cell = _cell("redrafter", 4, 0.0, 50, 2.5, rep.SpecCounters(4, 12, 6, [3, 2, 1]),
                 token_ids=[[1]])
    cell.policy = {"steps": 10.0, "no_draft_steps": 4.0, "length_sum": 18.0}
    assert cell.no_draft_share == 0.4 and cell.mean_draft_length == 1.8
    row = rep.summarize([cell])[0]
    assert row["no_draft_share"] == 0.4 and row["mean_draft_length"] == 1.8
    assert "| 40% | 1.80 |" in rep.markdown_table({"results": [row]})
    assert _cell("none", 4, 0.0, 50, 2.5).no_draft_share is None


def test_accepted_sources_column():
    cell = _cell("redrafter-tree+lookup", 1, 0.0, 100, 4.0, token_ids=[[1]],
                 policy={"steps": 10.0, "no_draft_steps": 0.0, "length_sum": 40.0,
                         "accepted_drafter": 5.0, "accepted_lookup": 3.0,
                         "accepted_both": 2.0})
    row = rep.summarize([cell])[0]
    assert row["accepted_sources"] == {"drafter": 5, "lookup": 3, "both": 2}
    table = rep.markdown_table({"results": [row]})
    assert "| 5/3/2 |" in table


def test_none_control_is_a_second_plain_engine_compared_like_any_config():
    """``none-control`` runs without speculation and is compared with ``none`` (an A/A
    ratio), not used as a baseline itself."""
    from vllm_redrafter.bench.runner import CONTROL_CONFIG, config_specs

    assert CONTROL_CONFIG == "none-control"
    assert config_specs(None, 4, 5)[CONTROL_CONFIG] is None
    cells = [_cell("none", 16, 0.0, 100, 10.0, token_ids=[[1]]),
             _cell(CONTROL_CONFIG, 16, 0.0, 100, 9.0, token_ids=[[1]])]
    rows = {r["config"]: r for r in rep.summarize(cells)}
    assert rows["none"]["speedup_vs_baseline"] == 1.0
    assert rows[CONTROL_CONFIG]["speedup_vs_baseline"] == pytest.approx(1.111, abs=1e-3)
    assert rows[CONTROL_CONFIG]["identical_to_baseline"] == 1


def test_report_shows_the_stolen_share_and_the_attempts():
    cells = [_cell("none", 1, 0.0, 50, 5.0, steal_share=0.02),
             _cell("redrafter", 1, 0.0, 50, 2.5, steal_share=0.1234, attempts=3)]
    report = rep.build_report(cells, {}, {"date": "x", "command": "y"})
    rows = {r["config"]: r for r in report["results"]}
    assert (rows["none"]["steal_share"], rows["none"]["attempts"]) == (0.02, 1)
    assert (rows["redrafter"]["steal_share"], rows["redrafter"]["attempts"]) == (0.123, 3)
    md = rep.markdown_table(report)
    assert "| none | 1 | 0.0 | 10.0 | 1.00× | 2% | – | –" in md
    assert "| redrafter | 1 | 0.0 | 20.0 | 2.00× | 12% (3 tries) | – |" in md


def test_ratios_net_of_steal_leave_the_stolen_seconds_out():
    """Two engines doing the same work, one robbed of 2 s by the hypervisor: by wall time
    it reads 0.8x, net of steal 1.0x (negative control: with the steal unknown there is
    no net ratio, and with none stolen the two readings agree)."""
    cells, walls = [], [(8.0, 0.0, 10.0, 2.0), (8.0, 0.5, 8.0, 0.5), (9.0, 1.0, 8.0, 0.0)]
    for round_, (base_wall, base_stolen, wall, stolen) in enumerate(walls):
        cells += [_cell("none", 4, 0.0, 80, base_wall, repeat=round_, stolen_s=base_stolen),
                  _cell("x", 4, 0.0, 80, wall, repeat=round_, stolen_s=stolen)]
    rows = [r for r in rep.summarize(cells) if r["config"] == "x"]
    assert [r["speedup_vs_baseline"] for r in rows] == [0.8, 1.0, 1.125]
    assert [r["net_speedup_vs_baseline"] for r in rows] == [1.0, 1.0, 1.0]
    assert (rows[0]["stolen_s"], rows[0]["net_tok_per_s"]) == (2.0, 10.0)
    (summary,) = rep.repeat_summary(rep.summarize(cells))
    assert (summary["median"], summary["net_median"]) == (1.0, 1.0)
    assert (summary["low"], summary["net_low"], summary["net_high"]) == (0.8, 1.0, 1.0)
    md = rep.markdown_table(rep.build_report(cells, {}, {}))
    assert "| x | 4 | 0.0 | 1.00× | 0.80–1.12× | 1.00× | 1.00× | 1.00–1.00× | 3 |" in md
    # negative controls
    assert _cell("x", 4, 0.0, 80, 10.0).net_tok_per_s is None
    assert _cell("x", 4, 0.0, 80, 10.0, stolen_s=0.0).net_tok_per_s == 8.0
    cells[0] = _cell("none", 4, 0.0, 80, 8.0, repeat=0)  # round 0's steal unknown
    (summary,) = rep.repeat_summary(rep.summarize(cells))
    assert summary["net_median"] is None and summary["median"] == 1.0


def _pooled_cells(ratios_by_config, conc=16, base_wall=10.0):
    """Cells of two temperatures x rounds: ``none`` at ``base_wall`` and each config at
    the ratio given (``ratios_by_config[config][i]`` for cell i, temperatures inner)."""
    cells = []
    count = len(next(iter(ratios_by_config.values())))
    for i in range(count):
        temp, round_ = (0.0, 0.7)[i % 2], i // 2
        cells.append(_cell("none", conc, temp, 100, base_wall, repeat=round_))
        for config, ratios in ratios_by_config.items():
            cells.append(_cell(config, conc, temp, 100, base_wall / ratios[i], repeat=round_))
    return cells


def test_pooled_summary_geometric_mean_and_interval():
    """Four cells at 1.0, 0.9, 1.1 and 1.0x of ``none`` pool to 0.997x with the interval
    0.876-1.136x (the docstring's example); against the control, measured in the same
    cells, the ratios are the config's over the control's."""
    cells = _pooled_cells({"x": [1.0, 0.9, 1.1, 1.0], rep.CONTROL: [1.0, 1.0, 1.0, 0.8]})
    pooled = {(p["config"], p["concurrency"]): p
              for p in rep.pooled_summary(rep.summarize(cells))}
    x = pooled[("x", 16)]
    assert x["cells"] == 4
    assert (x["vs_none"], x["vs_none_low"], x["vs_none_high"]) == (0.997, 0.876, 1.136)
    # against the control: 1.0, 0.9, 1.1, 1.25
    assert x["vs_control"] == pytest.approx((0.9 * 1.1 * 1.25) ** 0.25, abs=1e-3)
    assert "vs_control" not in pooled[(rep.CONTROL, 16)]  # the control is not its own
    assert pooled[(rep.CONTROL, 16)]["vs_none"] == pytest.approx(0.8 ** 0.25, abs=1e-3)
    assert ("x", None) not in pooled  # one concurrency: no row over all of them
    md = rep.markdown_table(rep.build_report(cells, {}, {}))
    assert "| x | 16 | 4 | 1.00× | 0.88–1.14× | 1.05× |" in md
    assert "| x | all |" not in md


def test_pooled_summary_finds_a_loss_that_single_cells_hide():
    """A config 7% slower than ``none`` in every cell, under +-5% noise per cell: no
    single cell is below 0.88x, yet the pooled interval over 8 cells ends below 0.97x.
    Negative control: the same noise around 1.0x gives an interval that holds 1."""
    noise = [1.05, 0.95, 1.03, 0.97, 1.0, 1.04, 0.96, 1.0]
    lossy = rep.pooled_summary(rep.summarize(_pooled_cells({"x": [0.93 * n for n in noise]})))
    even = rep.pooled_summary(rep.summarize(_pooled_cells({"x": noise})))
    assert min(0.93 * n for n in noise) > 0.88
    assert lossy[0]["vs_none_high"] < 0.97
    assert even[0]["vs_none_low"] < 1.0 < even[0]["vs_none_high"]


def test_pooled_summary_per_concurrency_and_over_all():
    """Each concurrency pools its own cells; ``concurrency`` None pools every cell. Two
    cells give no interval worth the name (t = 12.7), so a config measured in fewer than
    three is left out."""
    cells = (_pooled_cells({"x": [1.2, 1.2, 1.2]}, conc=4)
             + _pooled_cells({"x": [0.9, 0.9, 0.9]}, conc=64))
    pooled = {p["concurrency"]: p for p in rep.pooled_summary(rep.summarize(cells))}
    assert pooled[4]["vs_none"] == 1.2 and pooled[64]["vs_none"] == 0.9
    assert pooled[None]["cells"] == 6
    assert pooled[None]["vs_none"] == pytest.approx((1.2 * 0.9) ** 0.5, abs=1e-3)
    assert "vs_control" not in pooled[None]  # no control engine in this run
    assert rep.pooled_summary(rep.summarize(_pooled_cells({"x": [1.0, 1.1]}))) == []

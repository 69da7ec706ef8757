# SPDX-License-Identifier: Apache-2.0
"""`vllm-redrafter bench` end to end, small: tiny random Llama, random drafter, 2 prompts ×
16 tokens, the default configs none / ngram / redrafter / redrafter-tree. Checks the
reports, not the speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import chain_helpers as h

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _env() -> dict[str, str]:
    """The bench's engine workers run their engine in their own process (~30 s less per
    engine on 2 cores): these tests check the reports, and the bench's numbers in the
    README come from runs with vLLM's default multiprocess engines."""
    return {**os.environ, h.MULTIPROCESSING_ENV: "0"}


@pytest.fixture(scope="module")
def random_drafter_dir(tmp_path_factory) -> Path:
    import torch

    from tests.conftest import TINY_LLAMA
    from vllm_redrafter.checkpoint import save_drafter
    from vllm_redrafter.config import DrafterConfig, ReDrafterOptions
    from vllm_redrafter.drafter import RecurrentDrafter

    torch.manual_seed(0)
    cfg = DrafterConfig(hidden_size=TINY_LLAMA["hidden_size"],
                        vocab_size=TINY_LLAMA["vocab_size"], exit_dim=128,
                        num_draft_layers=1, rnn=True)
    out = tmp_path_factory.mktemp("drafter")
    save_drafter(RecurrentDrafter(cfg), out,
                 options=ReDrafterOptions(beam_width=2, beam_length=3))
    return out


def test_bench_smoke(tiny_llama_dir, random_drafter_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": [5 + i, 17, 300 + 7 * i, 42]})
                                 for i in range(2)) + "\n")
    out = tmp_path / "bench"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vllm-redrafter"), "bench",
         "--target", str(tiny_llama_dir), "--drafter", str(random_drafter_dir),
         "--prompts", str(prompts), "--num-prompts", "2", "--max-tokens", "16",
         "--concurrency", "1,2", "--temperatures", "0", "--max-model-len", "256",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    rows = {(r["config"], r["concurrency"]): r for r in report["results"]}
    configs = ("none", "ngram", "redrafter", "redrafter-tree")
    assert set(rows) == {(c, k) for c in configs for k in (1, 2)}
    for (config, _), row in rows.items():
        assert row["status"] == "ok", row
        assert 0 < row["output_tokens"] <= 2 * 16
        assert row["output_tok_per_s"] > 0
        # Greedy float32: every configuration emits the baseline's tokens.
        assert row["output_tokens"] == rows[("none", 1)]["output_tokens"]
    for k in (1, 2):
        for name, verified in (("redrafter", 3.0), ("redrafter-tree", None)):
            red = rows[(name, k)]
            assert red["identical_to_baseline"] == 2 and red["compared_to_baseline"] == 2
            assert red["num_drafts"] > 0 and red["mean_acceptance_length"] >= 1.0
            assert red["draft_time_share"] is not None and 0 < red["draft_time_share"] < 1
            if verified is not None:  # a chain verifies L = 3 tokens per step
                assert red["mean_verified_tokens"] == verified
            else:  # a tree of 2 beams of 3 verifies 3..5 tokens (random beams differ)
                assert 3.0 < red["mean_verified_tokens"] <= 5.0, red
        assert rows[("none", k)]["speedup_vs_baseline"] == 1.0
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| redrafter | 1 | 0.0 |" in (out / "bench.md").read_text()
    assert "| redrafter | 1 | 0.0 |" in proc.stdout
    # the report names the machine it measured (CPU, its matmul flags, cores, versions)
    assert report["machine"]["cpus"] >= 1 and "cpu_flags" in report["machine"]
    assert (out / "bench.md").read_text().startswith("Machine: ")


def test_verify_cost_smoke(tiny_llama_dir, random_drafter_dir, tmp_path):
    """`vllm-redrafter verify-cost` runs chain and tree shapes and reports every size."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [5, 17, 300, 42]}) + "\n")
    out = tmp_path / "cost"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vllm-redrafter"), "verify-cost",
         "--target", str(tiny_llama_dir), "--drafter", str(random_drafter_dir),
         "--prompts", str(prompts), "--num-prompts", "1", "--max-tokens", "6",
         "--sizes", "0,4", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "verify_cost.json").read_text())["rows"]
    assert {(r["shape"], r["verified_tokens"]) for r in rows} == {
        ("chain", 1), ("chain", 5), ("tree", 5)}
    assert all(r["steps"] > 0 and r["ms_per_step"] > 0 for r in rows)
    assert "| 5 |" in proc.stdout

# SPDX-License-Identifier: Apache-2.0
"""The GPU check script runs in its reduced form on CPU (CI); on a lent GPU the same
script runs full size (see the README). Its checks must be able to fail: the tree
attention check's negative control (a causal mask) is far off the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_gpu_check_passes_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(REPO / "examples" / "gpu_check.py"),
                             "--quick", "--device", "cpu", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["failures"] == []
    rows = report["beam_search"]
    assert {r["dtype"] for r in rows} == {"torch.float32", "torch.bfloat16"}
    for row in rows:
        assert 0 < row["eager"]["peak_bytes"] <= row["formula_bytes"]
        assert row["graph"].startswith("skipped")
    for tree in report["tree_attention"]:
        assert tree["max_abs_error"] < 3e-2 < tree["causal_mask_error"]
    assert 0.5 <= report["bf16_vs_fp32"]["best_beam_agreement"] <= 1.0

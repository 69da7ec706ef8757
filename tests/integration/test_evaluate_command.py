# SPDX-License-Identifier: Apache-2.0
"""`vllm-redrafter evaluate` end to end on a tiny random Llama (transformers only)."""

from __future__ import annotations

import json

import torch


def test_evaluate_command_reports_chain_and_tree(tiny_llama_dir, tmp_path, capsys):
    from tests.conftest import TINY_LLAMA
    from vllm_redrafter.checkpoint import save_drafter
    from vllm_redrafter.cli import main
    from vllm_redrafter.config import DrafterConfig, ReDrafterOptions
    from vllm_redrafter.drafter import RecurrentDrafter

    cfg = DrafterConfig(hidden_size=TINY_LLAMA["hidden_size"],
                        vocab_size=TINY_LLAMA["vocab_size"], exit_dim=64,
                        num_draft_layers=1, rnn=True)
    drafter = save_drafter(RecurrentDrafter(cfg, generator=torch.Generator().manual_seed(0)),
                           tmp_path / "drafter",
                           options=ReDrafterOptions(beam_width=3, beam_length=4))
    data = tmp_path / "generations.jsonl"
    rows = [{"id": str(81 + i), "prompt_len": 5,
             "token_ids": [(7 * i + 13 * t) % 4096 for t in range(40)]} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    rc = main(["evaluate", "--target", str(tiny_llama_dir), "--drafter", str(drafter),
               "--data", str(data), "--beam-width", "3", "--beam-length", "4",
               "--questions", str(tmp_path / "absent.jsonl"), "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    (overall,) = report["rows"]
    assert overall["group"] == "all"
    # 35 drafted positions per record, every step emits >= 1 token.
    assert 0 < overall["steps_chain"] <= 3 * 35
    assert overall["tau_tree"] >= overall["tau_chain"] >= 1.0
    assert len(overall["accept_tree"]) == 3
    assert "| all |" in capsys.readouterr().out

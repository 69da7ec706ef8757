# SPDX-License-Identifier: Apache-2.0
"""Smoke run of the distillation pipeline on a tiny random Llama (no tokenizer):
``vllm-redrafter generate`` (vLLM, token-id prompts) then ``vllm-redrafter train``
(transformers hidden states, a few optimiser steps, resume, export) -> a loadable drafter."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import chain_helpers as h

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # generate's engine in the CLI's own process: ~30 s less per engine on 2 cores; the
    # multiprocess topology is the serve, bench and example tests' subject, not this one's
    env[h.MULTIPROCESSING_ENV] = "0"
    proc = subprocess.run([str(VENV_BIN / "vllm-redrafter"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _result_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """Our result lines (vLLM may log to stdout too, even after them)."""
    return [line for line in proc.stdout.splitlines()
            if line.startswith(("{", "/"))]


def test_generate_then_train(tiny_llama_dir, tmp_path):
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": [rng.randrange(3, 4096) for _ in range(rng.randrange(4, 12))]})
        + "\n" for _ in range(12)))
    gen_dir = tmp_path / "gen"
    out = _cli("generate", "--target", str(tiny_llama_dir), "--prompts", str(prompts),
               "--out", str(gen_dir), "--max-tokens", "24", "--chunk-size", "8",
               "--no-progress")
    gens_path = Path(_result_lines(out)[-1])
    gens = [json.loads(line) for line in gens_path.read_text().splitlines()]
    assert len(gens) == 12
    assert all(len(g["token_ids"]) > g["prompt_len"] for g in gens)
    # resumable: a second run has nothing left to do (and does not start vLLM)
    again = _cli("generate", "--target", str(tiny_llama_dir), "--prompts", str(prompts),
                 "--out", str(gen_dir), "--max-tokens", "24", "--no-progress")
    assert "0 to go" in again.stderr
    assert len(gens_path.read_text().splitlines()) == 12

    run_dir = tmp_path / "run"
    common = ["train", "--target", str(tiny_llama_dir), "--data", str(gen_dir),
              "--eval-data", f"again={gen_dir}", "--out", str(run_dir),
              "--hidden-backend", "hf", "--steps", "3", "--exit-dim", "64", "--layers", "1",
              "--draft-vocab", "256", "--epochs", "2", "--batch-tokens", "32",
              "--heldout-fraction", "0.25", "--eval-every", "4", "--eval-rows", "128",
              "--accept-rows", "32", "--beam-width", "2", "--no-progress"]
    part = _cli(*common, "--stop-after", "3")
    assert json.loads(_result_lines(part)[-1])["stopped_at"] == 3
    done = _cli(*common)
    lines = _result_lines(done)
    summary = json.loads(lines[-2])
    assert len(summary["final_eval"]["heldout"]["top1"]) == 3
    assert "accept_len_w2" in summary["final_eval"]["again"]

    from vllm_redrafter.checkpoint import load_drafter

    drafter = load_drafter(lines[-1])
    assert drafter.config.hidden_size == 256 and drafter.config.vocab_size == 4096
    assert drafter.config.draft_vocab_size == 256
    assert (run_dir / "curves.png").is_file()


def test_sampled_generation_with_chunked_prefill(tiny_llama_dir, tmp_path):
    """Sampled responses (``--temperature``) to prompts longer than the step's token
    budget, so that their prefill is chunked: vLLM 0.32 on CPU crashed on exactly this
    when each request carried its own seed; ``generate`` seeds the engine instead."""
    rng = random.Random(1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": [rng.randrange(3, 4096) for _ in range(300)]}) + "\n"
        for _ in range(4)))
    out = _cli("generate", "--target", str(tiny_llama_dir), "--prompts", str(prompts),
               "--out", str(tmp_path / "gen"), "--max-tokens", "16", "--temperature", "0.8",
               "--seed", "1", "--max-num-batched-tokens", "128", "--no-progress")
    gens = [json.loads(line) for line in Path(_result_lines(out)[-1]).read_text().splitlines()]
    assert len(gens) == 4 and all(len(g["token_ids"]) > g["prompt_len"] for g in gens)

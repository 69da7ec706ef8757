# SPDX-License-Identifier: Apache-2.0
"""Foundation e2e checks: the demo target converts, vLLM loads and serves it, and our plugin
loads in every vLLM process (front end, engine core, worker)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
HERE = Path(__file__).parent
QUESTION = "What is the capital of France?"
PLUGIN_LINE = re.compile(r"vllm-redrafter \S+ active in (\S+) pid=(\d+)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["VLLM_LOGGING_LEVEL"] = "INFO"
    return env


def test_demo_target_cli_prints_directory_last(demo_target_dir):
    proc = subprocess.run([str(VENV_BIN / "vllm-redrafter"), "demo-target"],
                          capture_output=True, text=True, timeout=600, check=True)
    last = proc.stdout.strip().splitlines()[-1]
    assert Path(last) == demo_target_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (Path(last) / name).is_file(), name
    config = json.loads((Path(last) / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llm_answers_paris_and_plugin_loads_everywhere(demo_target_dir, dtype):
    proc = subprocess.run(
        [sys.executable, str(HERE / "_chat_once.py"), str(demo_target_dir), dtype, QUESTION],
        capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    if dtype == "float32":
        assert "Paris" in result["text"], result
    elif "Paris" not in result["text"]:
        # The demo target is a dequantized Q4_1 model: for this question its first answer
        # token is a near-tie between "The" (-> "...is Paris.") and "L"/"La" (French).
        # transformers in bf16 measures a 0.26-logit margin; vLLM's CPU bf16 kernels can
        # flip it. Accept the flip only as such a tie: "The" must be the runner-up, close.
        top = result["first_token_top"]
        assert top and top[0][0].strip() in {"L", "La"}, result
        runner_up = {tok.strip(): lp for tok, lp in top[1:]}
        assert "The" in runner_up and top[0][1] - runner_up["The"] < 0.5, result
    # One activation line per process in the engine core and the worker. (In the front-end
    # process the plugin loads before vLLM configures logging, so its INFO line is not shown.)
    logs = proc.stdout + proc.stderr  # vLLM logs to stdout by default
    found = {m.group(1): m.group(2) for m in PLUGIN_LINE.finditer(logs)}
    assert "EngineCore" in found, logs[-3000:]
    assert any(name.startswith("VllmWorker") for name in found), found
    assert len(set(found.values())) == len(found), f"one line per process: {found}"


def test_vllm_serve_answers_chat_completion(demo_target_dir, tmp_path):
    from vllm_redrafter.server import LocalServer, post_json

    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
            "--max-num-seqs", "4"]
    with LocalServer(str(demo_target_dir), args, tmp_path / "serve.log",
                     env=_env(), startup_timeout=300) as server:
        reply = post_json(f"{server.base}/v1/chat/completions", {
            "model": str(demo_target_dir), "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": QUESTION}]})
        assert "Paris" in reply["choices"][0]["message"]["content"], reply
    served = (tmp_path / "serve.log").read_text()
    assert PLUGIN_LINE.search(served), served[-2000:]

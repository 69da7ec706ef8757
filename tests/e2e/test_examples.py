# SPDX-License-Identifier: Apache-2.0
"""Smoke tests of the runnable examples (each one is run as a user would run it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
VENV_BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return env


def _random_drafter(out: Path, hidden: int, vocab: int, draft_vocab=None) -> Path:
    import torch

    from vllm_redrafter.checkpoint import save_drafter
    from vllm_redrafter.config import DrafterConfig, ReDrafterOptions
    from vllm_redrafter.drafter import RecurrentDrafter

    torch.manual_seed(0)
    cfg = DrafterConfig(hidden_size=hidden, vocab_size=vocab, exit_dim=128,
                        num_draft_layers=1, rnn=True, draft_vocab=draft_vocab)
    save_drafter(RecurrentDrafter(cfg), out, options=ReDrafterOptions(beam_width=2,
                                                                        beam_length=3))
    return out


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_offline_inference_example(tiny_llama_dir, tmp_path, mode):
    from tests.conftest import TINY_LLAMA

    drafter = _random_drafter(tmp_path / "drafter", TINY_LLAMA["hidden_size"],
                              TINY_LLAMA["vocab_size"])
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "offline_inference.py"), "--target",
         str(tiny_llama_dir), "--drafter", str(drafter), "--max-tokens", "12",
         "--prompt-token-ids", "5,17,300,42"] + (["--tree"] if mode == "tree" else []),
        capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "token ids:" in proc.stdout
    assert "mean acceptance length:" in proc.stdout, proc.stdout[-2000:]


def test_serve_example_with_openai_client(demo_target_dir, tmp_path):
    from vllm_redrafter.server import free_port, stop_process_group, wait_for_health

    drafter = _random_drafter(tmp_path / "drafter", 576, 49152,
                              draft_vocab=list(range(0, 49152, 16)))
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        ["bash", str(EXAMPLES / "serve.sh"), "shorthand", str(demo_target_dir), str(drafter),
         str(port), "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT, env=_env(),
        start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", server, tmp_path / "serve.log", 400)
        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "openai_client.py"), "--port", str(port)],
            capture_output=True, text=True, timeout=300, env=_env())
        assert client.returncode == 0, client.stderr[-3000:]
        assert "non-streaming:" in client.stdout and "Paris" in client.stdout, client.stdout
        assert client.stdout.count("Paris") >= 2  # streaming answer too
    finally:
        stop_process_group(server)
        log.close()


def test_tensor_parallel_ray_example_with_cpu_shim(tiny_llama_dir, tmp_path):
    """The Ray example, on CPU through the TEST-ONLY shim (GPUs need none)."""
    pytest.importorskip("ray")
    from tests.conftest import TINY_LLAMA
    from tests.e2e.test_chain_tp import TP_ENV, _shim_dist_info

    drafter = _random_drafter(tmp_path / "drafter", TINY_LLAMA["hidden_size"],
                              TINY_LLAMA["vocab_size"])
    shim = _shim_dist_info(tmp_path / "shim")
    env = {**_env(), **TP_ENV, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(shim), str(REPO),
                                                     os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "tensor_parallel_ray.py"), "--target",
         str(tiny_llama_dir), "--drafter", str(drafter), "--tp", "2", "--max-tokens", "8",
         "--prompt-token-ids", "5,17,300,42"],
        capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "token ids:" in proc.stdout
    assert (proc.stdout + proc.stderr).count("vllm-redrafter 0.1.0 active in") >= 2

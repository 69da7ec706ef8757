# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter demo`` (what ``make demo`` runs).

1. prepares the demo target (SmolLM2-135M-Instruct from the bundled GGUF);
2. starts ``vllm serve`` on 127.0.0.1 with ReDrafter and the shipped demo drafter
   (``examples/drafters/smollm2-135m-instruct``), sends one chat request and prints the
   answer; without a drafter it serves the target without speculation and says so;
3. stops the server (also on Ctrl-C) and runs a short side-by-side measurement: a few
   MT-Bench prompts at batch 1, greedy, no speculation vs ReDrafter; prints the speedup
   and the mean acceptance length τ.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from vllm_redrafter.commands.bench import DEFAULT_DRAFTER, DEFAULT_MT_BENCH

QUESTION = "Give me three short tips for staying focused while studying."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drafter", default=None,
                        help=f"drafter dir (default: {DEFAULT_DRAFTER})")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--num-prompts", type=int, default=3,
                        help="MT-Bench prompts in the side-by-side measurement")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--skip-measure", action="store_true",
                        help="only serve and chat; skip the side-by-side measurement")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"vllm serve did not become healthy within {timeout:.0f} s")


def _chat(base: str, model: str, question: str) -> str:
    body = {"model": model, "temperature": 0, "max_tokens": 160,
            "messages": [{"role": "user", "content": question}]}
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def serve_and_chat(target: str, drafter: str | None, question: str, log_path: Path) -> str:
    """Start ``vllm serve`` (with ReDrafter when ``drafter``), chat once, always stop it."""
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", target, "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--max-model-len", "2048",
           "--max-num-seqs", "4", "--served-model-name", "demo"]
    if drafter:
        cmd += ["--speculative-config", json.dumps({"method": "redrafter", "model": drafter})]
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    _say("starting: " + " ".join(cmd[1:]) + f"  (log: {log_path})")
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=600)
            _say(f"server up on 127.0.0.1:{port}; asking: {question}")
            return _chat(f"http://127.0.0.1:{port}", "demo", question)
        finally:
            _stop(proc)
            _say("server stopped")


def measure(target: str, drafter: str, num_prompts: int, max_tokens: int,
            out_dir: Path) -> dict:
    """Batch 1, greedy, float32: no speculation vs ReDrafter on MT-Bench first turns."""
    from vllm_redrafter.bench import report as rep
    from vllm_redrafter.bench.runner import BenchSettings, config_specs, run_config
    from vllm_redrafter.checkpoint import load_checkpoint_config
    from vllm_redrafter.training.data import load_prompts
    from vllm_redrafter.training.generate import render_prompts

    options = load_checkpoint_config(drafter).default_options()
    records = load_prompts(DEFAULT_MT_BENCH, limit=num_prompts)
    prompts = [p for p in render_prompts(records, target, 1024) if p is not None]
    settings = BenchSettings(target=target, prompts=prompts, max_tokens=max_tokens,
                             concurrency=[1], temperatures=[0.0], dtype="float32")
    specs = config_specs(drafter, options.beam_width, options.beam_length)
    cells = []
    for name in ("none", "redrafter"):
        _say(f"measuring {name} ({len(prompts)} prompts x {max_tokens} tokens, batch 1)...")
        cells += run_config(name, specs[name], settings, log_path=out_dir / f"{name}.log")
    report = rep.build_report(cells, {"num_prompts": len(prompts), "max_tokens": max_tokens},
                              {"command": "vllm-redrafter demo"})
    rep.write_reports(report, out_dir)
    return report


def run(args: argparse.Namespace) -> int:
    from vllm_redrafter.demo_target import prepare_demo_target

    target = str(prepare_demo_target())
    drafter = args.drafter or (str(DEFAULT_DRAFTER)
                               if (DEFAULT_DRAFTER / "config.json").is_file() else None)
    if drafter is None:
        _say(f"no demo drafter at {DEFAULT_DRAFTER}: serving the target WITHOUT "
             "speculation (train one with `vllm-redrafter train`)")
    out_dir = Path("bench-results") / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        answer = serve_and_chat(target, drafter, args.question, out_dir / "serve.log")
    except (RuntimeError, OSError) as exc:
        _say(f"error: {exc}; see {out_dir / 'serve.log'}")
        return 1
    print(f"Q: {args.question}\nA: {answer}\n")
    if drafter is None or args.skip_measure:
        return 0
    if not DEFAULT_MT_BENCH.is_file():
        _say(f"{DEFAULT_MT_BENCH} not found: skipping the measurement")
        return 0
    report = measure(target, drafter, args.num_prompts, args.max_tokens, out_dir)
    rows = {r["config"]: r for r in report["results"]}
    red, base = rows.get("redrafter"), rows.get("none")
    if not red or red["status"] != "ok" or not base or base["status"] != "ok":
        _say(f"measurement failed; logs in {out_dir}")
        return 1
    print(f"no speculation: {base['output_tok_per_s']:.1f} tok/s | ReDrafter: "
          f"{red['output_tok_per_s']:.1f} tok/s | speedup {red['speedup_vs_baseline']:.2f}x | "
          f"mean acceptance length τ {red['mean_acceptance_length']:.2f} | identical "
          f"outputs {red['identical_to_baseline']}/{red['compared_to_baseline']}")
    return 0

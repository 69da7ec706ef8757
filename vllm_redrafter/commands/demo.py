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
import sys
from pathlib import Path

from vllm_redrafter.bench.machine import describe_machine, machine_line
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


DEMO_CONFIG = "redrafter-default"
"""The bench config the demo measures: the plugin's default options for the drafter
(load-aware chain, greedy drafting), what the served demo runs."""


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def serve_and_chat(target: str, drafter: str | None, question: str, log_path: Path) -> str:
    """Start ``vllm serve`` (with ReDrafter when ``drafter``), chat once, always stop it."""
    from vllm_redrafter.server import LocalServer, post_json

    # float32: the demo target is a dequantized Q4_1 model whose bf16 greedy answers hit
    # near-ties (e.g. "The" vs "L" differ by 0.26 logits for the France question).
    args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
            "--max-num-seqs", "4", "--served-model-name", "demo"]
    if drafter:
        args += ["--speculative-config", json.dumps({"method": "redrafter", "model": drafter})]
    _say(f"starting: vllm serve {target} {' '.join(args)}  (log: {log_path})")
    with LocalServer(target, args, log_path) as server:
        _say(f"server up on 127.0.0.1:{server.port}; asking: {question}")
        reply = post_json(f"{server.base}/v1/chat/completions", {
            "model": "demo", "temperature": 0, "max_tokens": 160,
            "messages": [{"role": "user", "content": question}]})
    _say("server stopped")
    return reply["choices"][0]["message"]["content"]


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
    specs = config_specs(drafter, options.beam_width, options.beam_length, names=[DEMO_CONFIG])
    cells = []
    for name in ("none", DEMO_CONFIG):
        _say(f"measuring {name} ({len(prompts)} prompts x {max_tokens} tokens, batch 1)...")
        cells += run_config(name, specs[name], settings, log_path=out_dir / f"{name}.log")
    report = rep.build_report(cells, {"num_prompts": len(prompts), "max_tokens": max_tokens},
                              {"command": "vllm-redrafter demo",
                               "machine": describe_machine()})
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
    from vllm_redrafter.server import ServerError

    try:
        answer = serve_and_chat(target, drafter, args.question, out_dir / "serve.log")
    except (ServerError, OSError) as exc:
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
    red, base = rows.get(DEMO_CONFIG), rows.get("none")
    if not red or red["status"] != "ok" or not base or base["status"] != "ok":
        _say(f"measurement failed; logs in {out_dir}")
        return 1
    print(f"no speculation: {base['output_tok_per_s']:.1f} tok/s | ReDrafter: "
          f"{red['output_tok_per_s']:.1f} tok/s | speedup {red['speedup_vs_baseline']:.2f}x | "
          f"mean acceptance length τ {red['mean_acceptance_length']:.2f} | identical "
          f"outputs {red['identical_to_baseline']}/{red['compared_to_baseline']}")
    print(f"measured on: {machine_line(report['machine'])}")
    return 0

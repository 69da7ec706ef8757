# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter verify-cost``: seconds per verification step, tree vs chain, by size.

See :mod:`vllm_redrafter.bench.verify_cost`. Prints a Markdown table (stdout) and writes
``verify_cost.json`` into ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vllm_redrafter.commands.bench import DEFAULT_DRAFTER, DEFAULT_MT_BENCH, _csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None, help="target dir (default: demo target)")
    parser.add_argument("--drafter", default=str(DEFAULT_DRAFTER),
                        help="a drafter checkpoint matching the target (loaded, not used)")
    parser.add_argument("--prompts", default=str(DEFAULT_MT_BENCH))
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sizes", type=_csv(int), default=[0, 4, 8, 16],
                        help="drafted nodes per step (0, 4, 8, 16 = 1, 5, 9, 17 verified)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="directory for verify_cost.json")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # CPU vLLM needs a KV budget
    from vllm import LLM

    from vllm_redrafter.bench.verify_cost import BRANCHES, CLASS_PATH, measure
    from vllm_redrafter.training.data import load_prompts
    from vllm_redrafter.training.generate import render_prompts

    if any(s not in (0, BRANCHES, 2 * BRANCHES, 4 * BRANCHES) for s in args.sizes):
        print(f"vllm-redrafter verify-cost: error: --sizes must be among 0, {BRANCHES}, "
              f"{2 * BRANCHES}, {4 * BRANCHES}", file=sys.stderr)
        return 2
    target = args.target
    if target is None:
        from vllm_redrafter.demo_target import prepare_demo_target

        target = str(prepare_demo_target())
    records = load_prompts(Path(args.prompts), limit=args.num_prompts)
    prompts = [ids for ids in render_prompts(records, target, 1024) if ids is not None]
    has_tokenizer = any((Path(target) / f).is_file()
                        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    llm = LLM(target, dtype=args.dtype, enforce_eager=True, max_model_len=1024,
              max_num_seqs=4, seed=0, disable_log_stats=True,
              skip_tokenizer_init=not has_tokenizer,
              speculative_config={"method": "custom_class", "model": CLASS_PATH,
                                  "num_speculative_tokens": 4 * BRANCHES},
              additional_config={"redrafter": {"model": str(Path(args.drafter).resolve()),
                                               "beam_width": BRANCHES, "beam_length": 5,
                                               "tree": True}})
    shapes = [("chain", 0)] + [(shape, size) for size in args.sizes if size
                               for shape in ("chain", "tree")]
    measure(llm, prompts[:1], [("chain", 4)], 8)  # warm-up
    rows = measure(llm, prompts, shapes, args.max_tokens)
    base = rows[0]["ms_per_step"]
    print("| verified tokens | chain ms/step | tree ms/step | tree / chain | vs 1 token |")
    print("|---|---|---|---|---|")
    print(f"| 1 | {base:.1f} | – | – | 1.00× |")
    for size in [s for s in args.sizes if s]:
        chain = next(r for r in rows if r["shape"] == "chain" and r["verified_tokens"] == size + 1)
        tree = next(r for r in rows if r["shape"] == "tree" and r["verified_tokens"] == size + 1)
        print(f"| {size + 1} | {chain['ms_per_step']:.1f} | {tree['ms_per_step']:.1f} | "
              f"{tree['ms_per_step'] / chain['ms_per_step']:.2f}× | "
              f"{tree['ms_per_step'] / base:.2f}× |")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "verify_cost.json").write_text(json.dumps(
            {"target": target, "dtype": args.dtype, "rows": rows}, indent=1))
    return 0

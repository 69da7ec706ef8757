# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter train``: hidden states (cached, resumable) + drafter distillation.

``--data`` takes directories written by ``vllm-redrafter generate``. Hidden states are cached in
``DIR/hidden``; training checkpoints in ``OUT/checkpoint.pt`` (rerun the same command to resume);
the exported drafter goes to ``OUT/drafter`` (printed last), curves to ``OUT/curves.png``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_redrafter.training.options import add_train_flags

    parser.add_argument("--target", required=True, help="target model directory (HF format)")
    parser.add_argument("--data", required=True, action="append",
                        help="a `generate` output dir (repeatable)")
    parser.add_argument("--eval-data", action="append", default=[], metavar="NAME=DIR",
                        help="extra evaluation set, e.g. mtbench=runs/gen-mtbench (repeatable)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--hidden-only", action="store_true",
                        help="only extract the hidden states, do not train")
    parser.add_argument("--hidden-backend", choices=["vllm", "hf"], default="vllm",
                        help="hidden states via vLLM's prefill (pooling runner) or transformers")
    parser.add_argument("--verifier-name", default=None,
                        help="target name recorded in the drafter's config.json "
                             "(default: the --target path)")
    add_train_flags(parser)  # one flag per TrainConfig field
    g = parser.add_argument_group("run control")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after N optimiser steps of this call (resume later)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    import torch

    from vllm_redrafter.training.pipeline import run_pipeline
    from vllm_redrafter.training.options import config_from_args

    if args.threads:
        torch.set_num_threads(args.threads)
    eval_dirs = {}
    for item in args.eval_data:
        if "=" not in item:
            print(f"vllm-redrafter train: error: --eval-data wants NAME=DIR, got {item!r}",
                  file=sys.stderr)
            return 2
        name, path = item.split("=", 1)
        eval_dirs[name] = path
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"vllm-redrafter train: error: {err}", file=sys.stderr)
        return 2
    summary = run_pipeline(args.target, args.data, args.out, cfg, eval_dirs=eval_dirs,
                           hidden_only=args.hidden_only,
                           hidden_backend=args.hidden_backend,
                           verifier_name=args.verifier_name, stop_after=args.stop_after,
                           progress=not args.no_progress)
    if args.hidden_only or "stopped_at" in summary:
        print(json.dumps(summary))
        return 0
    print(json.dumps({k: summary[k] for k in ("final_eval", "train_seconds",
                                               "hidden_seconds")}))
    print(summary["drafter"])
    return 0

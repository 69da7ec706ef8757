# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter train``: hidden states (cached, resumable) + drafter distillation.

``--data`` takes directories written by ``vllm-redrafter generate``. Hidden states are cached in
``DIR/hidden``; training checkpoints in ``OUT/checkpoint.pt`` (rerun the same command to resume);
the exported drafter goes to ``OUT/drafter`` (printed last), curves to ``OUT/curves.png``.
"""

from __future__ import annotations

import argparse


def _none_or_int(text: str) -> int | None:
    return None if text.lower() in ("none", "full", "0") else int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_redrafter.training.trainer import TrainConfig

    d = TrainConfig()
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
    g = parser.add_argument_group("drafter")
    g.add_argument("--steps", type=int, default=d.num_steps,
                   help="drafter steps trained (= beam length - 1)")
    g.add_argument("--exit-dim", type=int, default=None, help="width E (default 2H)")
    g.add_argument("--layers", type=int, default=d.num_layers, help="ResBlocks")
    g.add_argument("--rnn", action=argparse.BooleanOptionalAction, default=d.rnn)
    g.add_argument("--draft-vocab", type=_none_or_int, default=d.draft_vocab_size,
                   help="draft vocabulary size by token frequency ('full' = target's)")
    g.add_argument("--head", choices=["drafter", "target"], default=d.head,
                   help="output head: the drafter's own Linear(E, Vd), or a learned "
                        "Linear(E, H) in front of the target's frozen head")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--soft-weight", type=float, default=d.soft_weight,
                   help="weight in [0, 1] of the soft-label term (cross-entropy against the "
                        "target's distribution from the cached hidden states)")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=d.schedule)
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--dropout", type=float, default=d.dropout)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--batch-tokens", type=int, default=d.batch_tokens,
                   help="positions per optimiser step")
    g.add_argument("--time-budget", type=float, default=None, metavar="MIN",
                   help="also finish (learning rate annealed by elapsed time) after MIN minutes")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast")
    g.add_argument("--seed", type=int, default=d.seed)
    g = parser.add_argument_group("evaluation / checkpoints")
    g.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--eval-rows", type=int, default=d.eval_rows)
    g.add_argument("--accept-rows", type=int, default=d.accept_rows)
    g.add_argument("--beam-width", type=int, default=d.beam_width,
                   help="beam width of the acceptance estimate (and the exported default)")
    g.add_argument("--topk", type=int, default=d.topk)
    g.add_argument("--save-every", type=int, default=d.save_every)
    g.add_argument("--export-dtype", choices=["bfloat16", "float16", "float32"],
                   default=d.export_dtype)
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after N optimiser steps of this call (resume later)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    import torch

    from vllm_redrafter.training.pipeline import run_pipeline
    from vllm_redrafter.training.trainer import TrainConfig

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
    cfg = TrainConfig(num_steps=args.steps, exit_dim=args.exit_dim, num_layers=args.layers,
                      rnn=args.rnn, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                      warmup_ratio=args.warmup_ratio, schedule=args.schedule,
                      weight_decay=args.weight_decay, dropout=args.dropout,
                      grad_clip=args.grad_clip, epochs=args.epochs,
                      batch_tokens=args.batch_tokens, heldout_fraction=args.heldout_fraction,
                      seed=args.seed, draft_vocab_size=args.draft_vocab,
                      head=args.head, soft_weight=args.soft_weight,
                      eval_every=args.eval_every, eval_rows=args.eval_rows,
                      accept_rows=args.accept_rows, beam_width=args.beam_width, topk=args.topk,
                      save_every=args.save_every, amp=not args.no_amp,
                      export_dtype=args.export_dtype,
                      time_budget_min=args.time_budget)
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

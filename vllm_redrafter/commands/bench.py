# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter bench``: no speculation vs vLLM n-gram vs ReDrafter, side by side.

All configurations of one invocation use the same target, prompts (chat template applied),
max tokens, concurrency levels and temperatures, so the ratios are measured in one run.
Results: ``bench.json`` (stable keys), ``bench.md`` (table) and ``bench.png`` (plot) in
``--out``; the table is also printed on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
from pathlib import Path
from typing import Any

from vllm_redrafter.bench.machine import describe_machine, machine_line

DEFAULT_MT_BENCH = Path("../shared/data/mt_bench_questions.jsonl")
DEFAULT_DRAFTER = Path("examples/drafters/smollm2-135m-instruct")


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s: "
                                             f"{text!r}") from exc
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None,
                        help="target model dir (default: the demo target, converted if needed)")
    parser.add_argument("--drafter", default=None,
                        help=f"ReDrafter checkpoint dir (default: {DEFAULT_DRAFTER} if present)")
    parser.add_argument("--prompts", default=None,
                        help="prompts JSONL (prompt / turns / conversations); default: MT-Bench "
                             f"first turns from {DEFAULT_MT_BENCH} when present")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=_csv(int), default=[1, 4, 16],
                        help="comma-separated concurrency levels (default 1,4,16)")
    parser.add_argument("--temperatures", type=_csv(float), default=[0.0, 0.7],
                        help="comma-separated temperatures (default 0,0.7)")
    parser.add_argument("--configs", type=_csv(str),
                        default=["none", "ngram", "redrafter", "redrafter-tree"],
                        help="configurations to run (default none,ngram,redrafter,"
                             "redrafter-tree); redrafter = chain verification of the best "
                             "beam, redrafter-tree = the deduplicated tree of all beams, "
                             "redrafter-default = every option at the plugin's default; "
                             "none-control = a second engine without speculation, whose "
                             "ratio to none is the run's noise band (A/A); "
                             "redrafter[-tree]@W<w>L<l> sets the beams of one config; plain "
                             "names draft fixed lengths, a +auto suffix (redrafter+auto) "
                             "turns load-aware drafting on (the option's default); +lookup "
                             "adds context look-up branches to a tree config, +lookup<N> "
                             "with N extra tree nodes (redrafter-tree@W1L5+lookup4), "
                             "+skip<N> skips the beam search on trusted look-up matches of "
                             "N tokens (redrafter-tree+lookup+skip3); +int8 / "
                             "+int4 / +noint8 low-bit drafting weights on in 8 or 4 bits / "
                             "off (default: 4 bits, on for bf16 drafting on CPU); +fp32draft / +bf16draft the drafter's "
                             "dtype")
    parser.add_argument("--beam-width", type=int, default=None,
                        help="ReDrafter beam width (default: the checkpoint's)")
    parser.add_argument("--beam-length", type=int, default=None,
                        help="ReDrafter beam length incl. the target token (default: the "
                             "checkpoint's)")
    parser.add_argument("--dtype", default="float32",
                        help="target dtype (float32 makes greedy outputs comparable)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds allowed per configuration with --sequential; by "
                             "default, per engine start and per cell")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every cell this many rounds, each cell against its "
                             "own round's baseline, and report the median and range of "
                             "the ratios (default 1)")
    parser.add_argument("--max-steal", type=float, default=5.0,
                        help="percent of a cell's wall time a virtual machine's "
                             "hypervisor may steal from any one CPU (/proc/stat) before the "
                             "cell is measured again, up to --steal-retries more times, "
                             "keeping the least-stolen attempt (default 5; the report's "
                             "steal column shows what each kept cell lost, and its 'net of "
                             "steal' ratios leave the stolen seconds out)")
    parser.add_argument("--steal-retries", type=int, default=2,
                        help="most extra measurements of a cell for --max-steal (default "
                             "2; 0 measures every cell once)")
    parser.add_argument("--sequential", action="store_true",
                        help="run one configuration at a time (all its cells, a fresh "
                             "engine per round) instead of the default: every "
                             "configuration's engine kept alive and each cell run on all "
                             "of them back to back, in alternating order, so that a "
                             "drifting machine moves both sides of a ratio alike (needs "
                             "the memory of all the engines at once)")
    parser.add_argument("--out", default=None,
                        help="output dir (default: bench-results/<UTC timestamp>)")


def _resolve_drafter(args: argparse.Namespace) -> str | None:
    if args.drafter:
        return args.drafter
    return str(DEFAULT_DRAFTER) if (DEFAULT_DRAFTER / "config.json").is_file() else None


def _beam_defaults(drafter: str | None, args: argparse.Namespace) -> tuple[int, int]:
    width, length = args.beam_width, args.beam_length
    if drafter and (width is None or length is None):
        from vllm_redrafter.checkpoint import load_checkpoint_config

        cfg = load_checkpoint_config(drafter)
        options = cfg.default_options() if hasattr(cfg, "default_options") else None
        if options is not None:
            width = width if width is not None else options.beam_width
            length = length if length is not None else options.beam_length
    return width or 4, length or 4


def run(args: argparse.Namespace) -> int:
    from vllm_redrafter.bench import report as rep
    from vllm_redrafter.bench.runner import BenchSettings, config_specs
    from vllm_redrafter.training.data import load_prompts
    from vllm_redrafter.training.generate import render_prompts

    target = args.target
    if target is None:
        from vllm_redrafter.demo_target import prepare_demo_target

        target = str(prepare_demo_target())
    prompts_path = Path(args.prompts) if args.prompts else DEFAULT_MT_BENCH
    if not prompts_path.is_file():
        print(f"vllm-redrafter bench: error: prompts file {prompts_path} not found; "
              "pass --prompts", file=sys.stderr)
        return 2
    drafter = _resolve_drafter(args)
    if any(c.startswith("redrafter") for c in args.configs) and drafter is None:
        print("vllm-redrafter bench: error: no drafter: pass --drafter DIR (or drop "
              "redrafter from --configs)", file=sys.stderr)
        return 2
    width, length = _beam_defaults(drafter, args)
    records = load_prompts(prompts_path, limit=args.num_prompts)
    token_ids = [ids for ids in render_prompts(records, target, args.max_model_len // 2)
                 if ids is not None]
    settings = BenchSettings(target=target, prompts=token_ids, max_tokens=args.max_tokens,
                             concurrency=args.concurrency, temperatures=args.temperatures,
                             dtype=args.dtype, max_model_len=args.max_model_len,
                             seed=args.seed, timeout_s=args.timeout,
                             max_steal=args.max_steal / 100.0,
                             steal_retries=args.steal_retries)
    specs = config_specs(drafter, width, length, names=args.configs)
    unknown = [c for c in args.configs if c not in specs]
    if unknown:
        print(f"vllm-redrafter bench: error: unknown configs {unknown}; choose from "
              f"{sorted(specs)}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(args.out) if args.out else Path("bench-results") / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.repeats < 1:
        print(f"vllm-redrafter bench: error: --repeats must be >= 1, got {args.repeats}",
              file=sys.stderr)
        return 2
    if args.steal_retries < 0 or not 0.0 <= args.max_steal <= 100.0:
        print("vllm-redrafter bench: error: --max-steal must be a percent in [0, 100] and "
              f"--steal-retries >= 0, got {args.max_steal} and {args.steal_retries}",
              file=sys.stderr)
        return 2
    machine = describe_machine()
    print(f"[bench] machine: {machine_line(machine)}", file=sys.stderr, flush=True)
    if args.sequential:
        cells = _run_sequential(args, specs, settings, out_dir, len(token_ids))
    else:
        from vllm_redrafter.bench.interleave import run_interleaved

        cells = run_interleaved(args.configs, specs, settings, repeats=args.repeats,
                                out_dir=out_dir)
    meta = {"date": stamp, "command": "vllm-redrafter bench " + shlex.join(sys.argv[2:]),
            "machine": machine}
    run_settings = {"target": target, "drafter": drafter, "prompts": str(prompts_path),
                    "num_prompts": len(token_ids), "max_tokens": args.max_tokens,
                    "concurrency": args.concurrency, "temperatures": args.temperatures,
                    "dtype": args.dtype, "beam_width": width, "beam_length": length,
                    "configs": args.configs, "repeats": args.repeats,
                    "max_steal": settings.max_steal, "steal_retries": settings.steal_retries,
                    "order": "sequential" if args.sequential else "interleaved"}
    report = rep.build_report(cells, run_settings, meta)
    paths = rep.write_reports(report, out_dir)
    print(rep.markdown_table(report))
    print(f"[bench] wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0 if all(c.status == "ok" for c in cells) else 1


def _run_sequential(args: argparse.Namespace, specs: dict[str, dict[str, Any] | None],
                    settings: Any, out_dir: Path, num_prompts: int) -> list[Any]:
    """``--sequential``: one configuration at a time, all its cells, one engine per round
    (none, x, none, x, ...)."""
    from vllm_redrafter.bench.runner import run_config

    cells = []
    for round_ in range(args.repeats):
        for name in args.configs:
            tag = f" round {round_ + 1}/{args.repeats}" if args.repeats > 1 else ""
            print(f"[bench] running {name}{tag} ({num_prompts} prompts)...",
                  file=sys.stderr, flush=True)
            log = out_dir / (f"{name}.log" if round_ == 0 else f"{name}.{round_ + 1}.log")
            cells += [dataclasses.replace(cell, repeat=round_)
                      for cell in run_config(name, specs[name], settings, log_path=log)]
    return cells

# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter evaluate``: offline tau of a drafter on the target's own responses.

Replays each response the way decoding walks it (:mod:`vllm_redrafter.evaluate`) and
reports tau and acceptance per depth for chain (beam 0) and tree (any beam)
verification, per prompt category when ``--questions`` maps ids to categories (MT-Bench).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vllm_redrafter.commands.bench import DEFAULT_DRAFTER, DEFAULT_MT_BENCH

DEFAULT_DATA = Path("../shared/data/distill/mtbench-greedy.jsonl.xz")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None, help="target dir (default: demo target)")
    parser.add_argument("--drafter", default=str(DEFAULT_DRAFTER))
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="generations.jsonl(.xz) of the target's greedy responses "
                             "({id, prompt_len, token_ids})")
    parser.add_argument("--questions", default=str(DEFAULT_MT_BENCH),
                        help="JSONL with question_id/category for per-category rows "
                             "(ignored if absent)")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--beam-length", type=int, default=5)
    parser.add_argument("--draft-top-k", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="only the first N response tokens of each record")
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--lookup", action="append", default=[], metavar="SPEC",
                        help="also walk trees with context look-up branches; SPEC is "
                             "'default' or comma-separated key=value of the lookup option "
                             "(max_candidates, min_match, max_match, rank, extra_nodes, "
                             "skip_beams_match, trusted_depth), e.g. "
                             "'rank=0,max_candidates=4'; repeat to compare several")
    parser.add_argument("--draft-int8", action="store_true",
                        help="draft with the int8 weights of the draft_int8 option (every "
                             "product, as a batch-1 engine step on CPU in bfloat16 does)")
    parser.add_argument("--draft-bits", type=int, choices=(8, 4), default=8,
                        help="with --draft-int8: 8-bit weights, or 4-bit where a layer's "
                             "shape allows (the draft_bits option)")
    parser.add_argument("--out", default=None, help="write the report JSON here")


def parse_lookup_spec(spec: str):
    """``"rank=0,max_candidates=4"`` (or ``"default"``) -> validated ``LookupOptions``."""
    from vllm_redrafter.config import LookupOptions

    values = {}
    for item in spec.split(","):
        item = item.strip()
        if not item or item == "default":
            continue
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--lookup {spec!r}: expected key=integer items, got {item!r}")
        values[key.strip()] = int(value)
    return LookupOptions(**values)


def _categories(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r.get("question_id")): r.get("category", "?") for r in rows}


def _row(name: str, chain, tree, hybrids=(), specs=()) -> dict:
    row = {"group": name, "steps_chain": chain.steps, "steps_tree": tree.steps,
           "tau_chain": round(chain.tau or 0.0, 3), "tau_tree": round(tree.tau or 0.0, 3),
           "accept_chain": [round(x, 3) for x in chain.acceptance_per_depth],
           "accept_tree": [round(x, 3) for x in tree.acceptance_per_depth]}
    if hybrids:
        row["lookup"] = [
            {"spec": spec, "tau": round(stats.tau or 0.0, 3), "steps": stats.steps,
             "mean_nodes": round(stats.nodes / max(stats.steps, 1), 2),
             "beams_skipped_share": round(stats.skipped / max(stats.steps, 1), 3),
             "accepted_from": {"drafter": src.drafter, "lookup": src.lookup,
                               "both": src.both}}
            for spec, (stats, src) in zip(specs, hybrids)]
    return row


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_redrafter.checkpoint import load_drafter
    from vllm_redrafter.drafter import resolve_draft_dtype
    from vllm_redrafter.evaluate import (
        WalkStats,
        chain_and_tree,
        draft_response,
        lookup_walk,
    )
    from vllm_redrafter.lookup import SourceCounts

    try:
        lookups = [parse_lookup_spec(spec) for spec in args.lookup]
    except ValueError as exc:
        print(f"vllm-redrafter evaluate: error: {exc}", file=sys.stderr)
        return 2
    budget = args.beam_width * (args.beam_length - 1)  # the drafter-only tree's

    data = Path(args.data)
    if not data.is_file():
        print(f"vllm-redrafter evaluate: error: {data} not found; pass --data",
              file=sys.stderr)
        return 2
    target_dir = args.target
    if target_dir is None:
        from vllm_redrafter.demo_target import prepare_demo_target

        target_dir = str(prepare_demo_target())
    dtype = getattr(torch, args.dtype)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
    drafter = load_drafter(args.drafter).eval()
    # the dtype the engine drafts in (draft_dtype "auto")
    drafter = drafter.to(resolve_draft_dtype("auto", dtype, drafter.dtype,
                                             drafter.config.uses_target_head))
    if drafter.config.uses_target_head:
        drafter.bind_target_head(target.get_output_embeddings().weight)
    if args.draft_int8:
        from vllm_redrafter.quant import quantize_drafter_linears

        # every product in low bits (here all rows of a response are drafted at once)
        quantize_drafter_linears(drafter, max_rows=sys.maxsize, bits=args.draft_bits)
    categories = _categories(Path(args.questions))
    from vllm_redrafter.training.data import iter_generations

    records = list(iter_generations(data))[: args.limit]
    totals: dict[str, tuple[WalkStats, WalkStats]] = {}
    hybrid_totals: dict[str, list[tuple[WalkStats, SourceCounts]]] = {}
    start = time.perf_counter()
    for record in records:
        ids = record["token_ids"]
        prompt_len = int(record["prompt_len"])
        if args.max_tokens is not None:
            ids = ids[: prompt_len + args.max_tokens]
        drafted = draft_response(target, drafter, ids, prompt_len, args.beam_width,
                                 args.beam_length, draft_top_k=args.draft_top_k)
        if drafted is None:
            continue
        chain, tree = chain_and_tree(drafted)
        hybrids = [lookup_walk(drafted, options, budget + options.extra_nodes)
                   for options in lookups]
        for group in ("all", categories.get(str(record.get("id")), None)):
            if group is None:
                continue
            acc = totals.setdefault(group, (WalkStats(), WalkStats()))
            acc[0].merge(chain)
            acc[1].merge(tree)
            hyb = hybrid_totals.setdefault(group, [(WalkStats(), SourceCounts())
                                                   for _ in lookups])
            for (stats, src), (new_stats, new_src) in zip(hyb, hybrids):
                stats.merge(new_stats)
                src.merge(new_src)
    rows = [_row(name, *stats, hybrid_totals.get(name, ()), args.lookup)
            for name, stats in sorted(totals.items(), key=lambda kv: (kv[0] != "all", kv[0]))]
    print("| group | steps | chain τ | tree τ | chain accept/depth | tree accept/depth |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['steps_chain']} | {r['tau_chain']:.2f} | "
              f"{r['tau_tree']:.2f} | {'/'.join(f'{x:.2f}' for x in r['accept_chain'])} | "
              f"{'/'.join(f'{x:.2f}' for x in r['accept_tree'])} |")
    for r in rows:
        for item in r.get("lookup", ()):
            print(f"| {r['group']} | lookup {item['spec']} | τ {item['tau']:.2f} | "
                  f"nodes/step {item['mean_nodes']:.1f} | beams skipped "
                  f"{100 * item['beams_skipped_share']:.0f}% | accepted "
                  f"from drafter/lookup/both {item['accepted_from']['drafter']}/"
                  f"{item['accepted_from']['lookup']}/{item['accepted_from']['both']} |")
    print(f"[evaluate] {len(records)} responses, W={args.beam_width}, L={args.beam_length}, "
          f"{args.dtype}, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"data": str(data), "drafter": args.drafter, "beam_width": args.beam_width,
             "beam_length": args.beam_length, "max_tokens": args.max_tokens,
             "dtype": args.dtype, "draft_int8": args.draft_int8,
             "draft_bits": args.draft_bits, "node_budget": budget, "rows": rows}, indent=1))
    return 0

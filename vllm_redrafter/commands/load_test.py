# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter load-test``: the same bounded load against ``vllm serve`` without and
with ReDrafter (see :mod:`vllm_redrafter.bench.load_test`).

Two servers on 127.0.0.1, one after the other, with the same engine options: plain vLLM,
then ReDrafter. Each gets ``--clients`` concurrent greedy requests at once (mixed
lengths; some disconnect mid-stream, some are aborted). The plain server also answers
every prompt once more after its load, with nothing else running: the reference. Printed and written to ``--out``
(``load_test.json`` / ``.md``): requests/s, output tokens/s, p50/p99 latency, time to
first token, counts by outcome, errors, streams that differ from the reference, and the
servers' state afterwards. Exit status 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from vllm_redrafter.commands.bench import DEFAULT_DRAFTER, DEFAULT_MT_BENCH, _csv

BUNDLED_PROMPTS = Path(__file__).resolve().parents[2] / "tests/data/mt_bench_first_turns.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None, help="target dir (default: demo target)")
    parser.add_argument("--drafter", default=str(DEFAULT_DRAFTER),
                        help="ReDrafter checkpoint matching the target")
    parser.add_argument("--spec", default="{}",
                        help='extra ReDrafter keys as JSON, e.g. \'{"tree": true}\'')
    parser.add_argument("--prompts", default=None,
                        help=f"prompts JSONL (default: {DEFAULT_MT_BENCH} when present, "
                             "else the test suite's MT-Bench first turns)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--lengths", type=_csv(int), default=[8, 24, 48, 96],
                        help="max_tokens cycled over the clients")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="engine batch limit (default: --clients)")
    parser.add_argument("--out", default=None, help="directory for load_test.json / .md")


def _prompts(args: argparse.Namespace, target: str) -> list[list[int]]:
    from vllm_redrafter.training.data import load_prompts
    from vllm_redrafter.training.generate import render_prompts

    path = Path(args.prompts) if args.prompts else (
        DEFAULT_MT_BENCH if DEFAULT_MT_BENCH.is_file() else BUNDLED_PROMPTS)
    records = load_prompts(path, limit=args.num_prompts)
    return [ids for ids in render_prompts(records, target, 512) if ids is not None]


def _serve_args(args: argparse.Namespace, spec: dict[str, Any] | None) -> list[str]:
    out = ["--dtype", args.dtype, "--enforce-eager", "--max-model-len", "1024",
           "--max-num-seqs", str(args.max_num_seqs or args.clients), "--seed", "0",
           "--served-model-name", "target"]
    if spec is not None:
        out += ["--speculative-config", json.dumps(spec)]
    return out


def _one_server(args, target, spec, prompts, logs: Path, reference=None) -> dict[str, Any]:
    from vllm_redrafter.bench import load_test as lt
    from vllm_redrafter.server import LocalServer, server_log_problems

    name = "none" if spec is None else "redrafter"
    plan = lt.plan_requests(prompts, args.clients, args.lengths)
    with LocalServer(target, _serve_args(args, spec), logs / f"{name}.log") as server:
        lt.reference_outputs(server.base, "target", prompts[:1], 4)  # warm-up
        results, wall = lt.run_load(server.base, "target", plan)
        state = lt.server_state(server.base)
        if reference is None:
            reference = lt.reference_outputs(server.base, "target", prompts,
                                             max(args.lengths))
        after = lt.run_one(server.base, "target", plan[0])  # still serving?
        log = server.log_tail(200_000)
    problems = lt.check_streams(results, reference)
    if after.status != "ok":
        problems.append(f"no answer after the load: {after.error}")
    if state["health"] != 200 or state["num_requests_running"] or \
            state["num_requests_waiting"]:
        problems.append(f"server state after the load: {state}")
    problems += [f"server log: {problem}" for problem in server_log_problems(log)]
    row = {"config": name, **lt.summarize(results, wall), "state": state,
           "problems": problems}
    return {"row": row, "reference": reference}


def _markdown(rows: list[dict[str, Any]]) -> str:
    def f(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| config | clients | ok | disconnected | aborted | errors | req/s | out tok/s "
             "| p50 latency s | p99 latency s | p50 TTFT s | stream problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['clients']} | {r['ok']} | {r['disconnected']} | "
                     f"{r['aborted']} | {r['error']} | {f(r['requests_per_s'])} | "
                     f"{f(r['output_tok_per_s'], 1)} | {f(r['latency_p50_s'])} | "
                     f"{f(r['latency_p99_s'])} | {f(r['ttft_p50_s'])} | "
                     f"{len(r['problems'])} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    target = args.target
    if target is None:
        from vllm_redrafter.demo_target import prepare_demo_target

        target = str(prepare_demo_target())
    try:
        extra = json.loads(args.spec)
    except json.JSONDecodeError as err:
        print(f"vllm-redrafter load-test: error: --spec is not JSON: {err}", file=sys.stderr)
        return 2
    spec = {"method": "redrafter", "model": str(Path(args.drafter).resolve()), **extra}
    prompts = _prompts(args, target)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="load-test-"))
    out.mkdir(parents=True, exist_ok=True)
    plain = _one_server(args, target, None, prompts, out)
    redrafter = _one_server(args, target, spec, prompts, out, plain["reference"])
    rows = [plain["row"], redrafter["row"]]
    table = _markdown(rows)
    report = {"target": target, "spec": spec, "clients": args.clients,
              "lengths": args.lengths, "dtype": args.dtype, "rows": rows}
    (out / "load_test.json").write_text(json.dumps(report, indent=2))
    (out / "load_test.md").write_text(table + "\n")
    print(table)
    failed = [p for r in rows for p in [*r["problems"], *r["errors"]]]
    for problem in failed:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"written to {out}", file=sys.stderr)
    return 1 if failed else 0

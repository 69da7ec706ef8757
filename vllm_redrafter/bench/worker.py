# SPDX-License-Identifier: Apache-2.0
"""Benchmark subprocess, in one of two modes.

- ``python -m vllm_redrafter.bench.worker JOB.json RESULT.json``: start one ``vllm.LLM``
  engine for one speculative configuration, measure every (temperature, concurrency) cell
  of the job on the same prompts, write them to ``RESULT.json`` and exit.
- ``python -m vllm_redrafter.bench.worker --serve JOB.json REPLY_FD``: start the engine,
  then measure one cell per command, so that a parent can interleave the cells of several
  live engines (:mod:`vllm_redrafter.bench.interleave`). Commands arrive as JSON lines on
  stdin (``{"op": "cell", "temperature": 0.0, "concurrency": 4}``, ``{"op": "quit"}``);
  replies go as JSON lines to the inherited file descriptor ``REPLY_FD``
  (``{"ready": true}`` once warmed up, then ``{"cell": {...}}`` per command), never to
  stdout, which carries vLLM's logs.

Concurrency ``c`` is enforced exactly: the engine's request queue is refilled as requests
finish, so ``c`` requests are in flight until the prompts run out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from vllm_redrafter.bench.machine import read_steal_seconds, steal_share, stolen_seconds
from vllm_redrafter.bench.report import CellResult, SpecCounters, counters_from_metrics
from vllm_redrafter.bench.runner import cell_to_json


def _drafter_seconds(worker: Any) -> float:
    """Cumulative seconds spent inside the ReDrafter proposer (run on each worker)."""
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    return float(getattr(drafter, "draft_seconds", 0.0) or 0.0)


def _drafter_policy(worker: Any) -> dict[str, float]:
    """The ReDrafter proposer's policy counters on one worker (empty for others)."""
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    stats = getattr(drafter, "policy_stats", None)
    return stats() if callable(stats) else {}


def _policy_counters(llm: Any) -> dict[str, float]:
    try:
        values = llm.collective_rpc(_drafter_policy)
    except Exception:  # optional, like the drafter timing
        return {}
    return values[0] if values else {}


def _draft_seconds(llm: Any) -> float | None:
    try:
        values = llm.collective_rpc(_drafter_seconds)
    except Exception:  # not every executor supports callables; timing is optional
        return None
    return max(values) if values else None


def _run_cell(llm: Any, prompts: list[list[int]], max_tokens: int, concurrency: int,
              temperature: float, tag: str) -> tuple[list[list[int]], float]:
    """Generate every prompt with ``concurrency`` requests in flight; (token ids, wall s)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    outputs: dict[int, list[int]] = {}
    pending = list(range(len(prompts)))
    in_flight = 0
    start = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i = pending.pop(0)
            # No per-request seed: plain vLLM 0.32 on CPU crashes on a seeded request
            # whose prompt is prefilled in chunks (CPU generators have no offset to
            # rewind; ReDrafter engines carry the fix cpu-seeded-discard-rewind, the
            # baseline does not). The engine's own seed keeps runs repeatable.
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                    detokenize=False)
            engine.add_request(f"{tag}-{i}", {"prompt_token_ids": prompts[i]}, params)
            in_flight += 1
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id.rsplit("-", 1)[1])] = list(
                    out.outputs[0].token_ids)
                in_flight -= 1
    wall = time.perf_counter() - start
    return [outputs[i] for i in range(len(prompts))], wall


def _start_engine(s: dict[str, Any], spec: dict[str, Any] | None) -> Any:
    """The job's ``vllm.LLM`` engine, warmed up by one short request so that first-call
    costs stay out of the measurement."""
    from vllm import LLM

    has_tokenizer = any((Path(s["target"]) / f).is_file()
                        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    llm = LLM(s["target"], dtype=s["dtype"], enforce_eager=True,
              max_model_len=s["max_model_len"], max_num_seqs=max(s["concurrency"]),
              seed=s["seed"], speculative_config=spec, disable_log_stats=False,
              skip_tokenizer_init=not has_tokenizer)
    _run_cell(llm, s["prompts"][:1], 8, 1, 0.0, "warmup")
    return llm


def _measure_cell(llm: Any, name: str, spec: dict[str, Any] | None, s: dict[str, Any],
                  temperature: float, concurrency: int, tag: str) -> CellResult:
    """One cell (:func:`_measure_once`), measured again while the hypervisor stole more
    than ``max_steal`` of the wall time from a CPU during it, at most ``steal_retries``
    more times; the least-stolen attempt is kept (its ``attempts`` counts them all)."""
    limit = s.get("max_steal")
    attempts: list[CellResult] = []
    for attempt in range(1 + max(int(s.get("steal_retries", 0)), 0)):
        cell = _measure_once(llm, name, spec, s, temperature, concurrency,
                             tag if attempt == 0 else f"{tag}a{attempt}")
        attempts.append(cell)
        if limit is None or cell.steal_share is None or cell.steal_share <= limit:
            break
        print(f"[bench] {name} c={concurrency} T={temperature}: the hypervisor stole "
              f"{100 * cell.steal_share:.0f}% of a CPU's time (limit "
              f"{100 * limit:.0f}%), measuring it again", file=sys.stderr, flush=True)
    best = min(attempts, key=lambda c: c.steal_share or 0.0)
    return dataclasses.replace(best, attempts=len(attempts))


def _measure_once(llm: Any, name: str, spec: dict[str, Any] | None, s: dict[str, Any],
                  temperature: float, concurrency: int, tag: str) -> CellResult:
    """Run one (temperature, concurrency) cell on every prompt, with its counters and
    the time the hypervisor stole meanwhile from the most-stolen CPU."""
    before = counters_from_metrics(llm.get_metrics())
    draft_before = _draft_seconds(llm)
    policy_before = _policy_counters(llm)
    steal_before = read_steal_seconds()
    token_ids, wall = _run_cell(llm, s["prompts"], s["max_tokens"], concurrency,
                                temperature, tag)
    steal_after = read_steal_seconds()
    draft_after = _draft_seconds(llm)
    policy_after = _policy_counters(llm)
    policy = {k: policy_after[k] - policy_before.get(k, 0.0) for k in policy_after}
    counters = counters_from_metrics(llm.get_metrics()).minus(before)
    draft_s = (draft_after - draft_before
               if draft_before is not None and draft_after is not None else None)
    cell = CellResult(
        config=name, concurrency=concurrency, temperature=temperature,
        num_prompts=len(token_ids), output_tokens=sum(map(len, token_ids)),
        wall_s=wall, draft_s=draft_s if spec else None,
        counters=counters if spec else SpecCounters(), token_ids=token_ids,
        policy=policy or None, steal_share=steal_share(steal_before, steal_after, wall),
        stolen_s=stolen_seconds(steal_before, steal_after))
    print(f"[bench] {name} c={concurrency} T={temperature}: "
          f"{cell.output_tokens / wall:.1f} tok/s", file=sys.stderr, flush=True)
    return cell


def main(job_path: str, result_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    name, spec, s = job["name"], job["spec"], job["settings"]
    llm = _start_engine(s, spec)
    cells = [_measure_cell(llm, name, spec, s, temperature, concurrency,
                           f"c{concurrency}t{temperature}")
             for temperature in s["temperatures"] for concurrency in s["concurrency"]]
    Path(result_path).write_text(json.dumps({"cells": [cell_to_json(c) for c in cells]}))
    return 0


def serve(job_path: str, reply_fd: int) -> int:
    """Answer cell commands from stdin until ``quit`` or end of input (module docstring)."""
    job = json.loads(Path(job_path).read_text())
    name, spec, s = job["name"], job["spec"], job["settings"]
    with os.fdopen(reply_fd, "w", buffering=1) as reply:
        llm = _start_engine(s, spec)
        reply.write(json.dumps({"ready": True}) + "\n")
        for count, line in enumerate(sys.stdin):
            command = json.loads(line)
            if command.get("op") == "quit":
                break
            t, c = float(command["temperature"]), int(command["concurrency"])
            cell = _measure_cell(llm, name, spec, s, t, c, f"n{count}c{c}t{t}")
            reply.write(json.dumps({"cell": cell_to_json(cell)}) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2], int(sys.argv[3])))
    sys.exit(main(sys.argv[1], sys.argv[2]))

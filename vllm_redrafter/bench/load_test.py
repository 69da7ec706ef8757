# SPDX-License-Identifier: Apache-2.0
"""A bounded load test against a running ``vllm serve`` (stdlib HTTP only, no vLLM import).

Many concurrent clients, all started together, each with one greedy ``/v1/completions``
request on token-id prompts (``return_token_ids``, so every streamed token is seen):

- ``complete``: streams to the end;
- ``disconnect``: closes the connection after a few streamed chunks (vLLM aborts it);
- ``abort``: a non-streaming request whose client gives up after a short timeout.

Afterwards the server must still answer (``/health``, one more completion) and have no
request left running or waiting. :func:`check_streams` compares every completed stream
with a reference (the same prompt's greedy output on the plain server, streamed with no
other load): equal
token ids (so nothing duplicated or dropped), the right length, and every disconnected
stream a prefix of the reference.

Example (what ``vllm-redrafter load-test`` does for each server)::

    plan = plan_requests(prompts, clients=64)
    results, wall = run_load(base, model, plan)
    summary = summarize(results, wall)       # requests/s, p50/p99 latency, errors
    problems = check_streams(results, reference)
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import statistics
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

COMPLETE, DISCONNECT, ABORT = "complete", "disconnect", "abort"


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """One client's request."""

    index: int
    prompt_key: int  # index of its prompt in the plan's prompt list
    prompt: tuple[int, ...]  # token ids
    max_tokens: int
    kind: str  # COMPLETE, DISCONNECT or ABORT
    disconnect_after: int = 3  # streamed chunks read before a DISCONNECT closes
    abort_after: float = 0.5  # seconds before an ABORT client gives up


@dataclasses.dataclass
class LoadResult:
    """What one client saw."""

    request: LoadRequest
    status: str  # "ok", "disconnected", "aborted" or "error"
    token_ids: list[int]
    finish_reason: str | None
    latency: float  # seconds from sending to the end of the response (or giving up)
    first_token: float | None  # seconds to the first streamed token
    error: str | None = None


def plan_requests(prompts: Sequence[Sequence[int]], clients: int,
                  lengths: Sequence[int] = (8, 24, 48, 96), disconnect_every: int = 8,
                  abort_every: int = 8) -> list[LoadRequest]:
    """``clients`` requests cycling through ``prompts`` and ``lengths`` (mixed lengths);
    every ``disconnect_every``-th (offset 3) disconnects mid-stream, every
    ``abort_every``-th (offset 7) is aborted; the rest complete.

    Example: 16 clients, 8 prompts: requests 3 and 11 disconnect, 7 and 15 abort."""
    plan = []
    for i in range(clients):
        kind = COMPLETE
        if disconnect_every and i % disconnect_every == 3 % disconnect_every:
            kind = DISCONNECT
        elif abort_every and i % abort_every == 7 % abort_every:
            kind = ABORT
        key = i % len(prompts)
        plan.append(LoadRequest(i, key, tuple(prompts[key]), lengths[i % len(lengths)], kind))
    return plan


def _payload(model: str, req: LoadRequest, stream: bool) -> bytes:
    return json.dumps({"model": model, "prompt": list(req.prompt),
                       "max_tokens": req.max_tokens, "temperature": 0.0, "stream": stream,
                       "return_token_ids": True}).encode()


def _connection(base: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(base)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def _stream(base: str, model: str, req: LoadRequest, timeout: float) -> LoadResult:
    start = time.perf_counter()
    conn = _connection(base, timeout)
    ids: list[int] = []
    first, finish, chunks = None, None, 0
    try:
        conn.request("POST", "/v1/completions", body=_payload(model, req, True),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return LoadResult(req, "error", ids, None, time.perf_counter() - start, None,
                              f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return LoadResult(req, "error", ids, None, time.perf_counter() - start,
                                  first, str(chunk["error"])[:300])
            choice = chunk["choices"][0]
            delta = choice.get("token_ids") or []
            if delta and first is None:
                first = time.perf_counter() - start
            ids.extend(delta)
            finish = choice.get("finish_reason") or finish
            chunks += 1
            if req.kind == DISCONNECT and chunks >= req.disconnect_after:
                return LoadResult(req, "disconnected", ids, None,
                                  time.perf_counter() - start, first)
        return LoadResult(req, "ok", ids, finish, time.perf_counter() - start, first)
    except Exception as exc:  # noqa: BLE001 - reported, never raised from a client
        return LoadResult(req, "error", ids, finish, time.perf_counter() - start, first,
                          f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def _abort(base: str, model: str, req: LoadRequest) -> LoadResult:
    start = time.perf_counter()
    conn = _connection(base, req.abort_after)
    try:
        conn.request("POST", "/v1/completions", body=_payload(model, req, False),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        if resp.status != 200:
            return LoadResult(req, "error", [], None, time.perf_counter() - start, None,
                              f"HTTP {resp.status}: {str(body)[:300]}")
        choice = body["choices"][0]  # finished before the client gave up
        return LoadResult(req, "ok", list(choice.get("token_ids") or []),
                          choice.get("finish_reason"), time.perf_counter() - start, None)
    except TimeoutError:
        return LoadResult(req, "aborted", [], None, time.perf_counter() - start, None)
    except Exception as exc:  # noqa: BLE001
        return LoadResult(req, "error", [], None, time.perf_counter() - start, None,
                          f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def run_one(base: str, model: str, req: LoadRequest, timeout: float = 600) -> LoadResult:
    """Send ``req`` as its kind says and return what the client saw."""
    if req.kind == ABORT:
        return _abort(base, model, req)
    return _stream(base, model, req, timeout)


def run_load(base: str, model: str, plan: Sequence[LoadRequest],
             timeout: float = 600) -> tuple[list[LoadResult], float]:
    """All of ``plan`` at once (one thread per client, released together). Returns the
    results in plan order and the wall time in seconds."""
    results: list[LoadResult | None] = [None] * len(plan)
    barrier = threading.Barrier(len(plan) + 1)

    def client(k: int) -> None:
        barrier.wait()
        results[k] = run_one(base, model, plan[k], timeout)

    threads = [threading.Thread(target=client, args=(k,), daemon=True)
               for k in range(len(plan))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return [r for r in results if r is not None], wall


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(results: Sequence[LoadResult], wall: float) -> dict[str, Any]:
    """Requests/s (completed requests over the wall time), p50/p99 latency and time to
    first token of the completed streams, output tokens/s, and counts by status."""
    done = [r for r in results if r.status == "ok"]
    latencies = [r.latency for r in done]
    ttft = [r.first_token for r in done if r.first_token is not None]
    counts = {s: sum(r.status == s for r in results)
              for s in ("ok", "disconnected", "aborted", "error")}
    return {"clients": len(results), **counts, "wall_s": wall,
            "requests_per_s": len(done) / wall if wall > 0 else None,
            "output_tok_per_s": sum(len(r.token_ids) for r in done) / wall if wall else None,
            "latency_p50_s": _percentile(latencies, 0.5),
            "latency_p99_s": _percentile(latencies, 0.99),
            "ttft_p50_s": statistics.median(ttft) if ttft else None,
            "errors": [f"#{r.request.index}: {r.error}" for r in results
                       if r.status == "error"]}


def check_streams(results: Sequence[LoadResult], reference: dict[int, list[int]]
                  ) -> list[str]:
    """Problems found in ``results`` against ``reference`` (greedy token ids per prompt
    key, generated to at least every request's ``max_tokens``); empty when all is well.

    A completed request must equal the reference cut to its length, and that length must
    be its ``max_tokens`` (finish ``length``) or end where the reference stops (finish
    ``stop``); a disconnected stream must be a prefix of the reference.
    """
    problems = []
    for r in results:
        ref = reference[r.request.prompt_key]
        n = len(r.token_ids)
        if r.status == "ok":
            if r.token_ids != ref[:n]:
                problems.append(f"#{r.request.index}: tokens differ from the reference "
                                f"(first difference at {_first_difference(r.token_ids, ref)})")
            elif r.finish_reason == "length" and n != r.request.max_tokens:
                problems.append(f"#{r.request.index}: {n} tokens, max_tokens "
                                f"{r.request.max_tokens}")
            elif r.finish_reason == "stop" and n != min(len(ref), r.request.max_tokens):
                problems.append(f"#{r.request.index}: stopped after {n} tokens, the "
                                f"reference after {len(ref)}")
            elif r.finish_reason not in ("length", "stop"):
                problems.append(f"#{r.request.index}: finish_reason {r.finish_reason!r}")
        elif r.status == "disconnected" and r.token_ids != ref[:n]:
            problems.append(f"#{r.request.index}: partial stream is not a prefix of the "
                            "reference")
    return problems


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def reference_outputs(base: str, model: str, prompts: Sequence[Sequence[int]],
                      max_tokens: int, timeout: float = 600) -> dict[int, list[int]]:
    """Greedy token ids of every prompt (one streamed request each, all at once, and
    nothing else: the reference :func:`check_streams` compares a load's streams with)."""
    plan = [LoadRequest(k, k, tuple(p), max_tokens, COMPLETE) for k, p in enumerate(prompts)]
    results, _ = run_load(base, model, plan, timeout)
    bad = [r.error for r in results if r.status != "ok"]
    if bad:
        raise RuntimeError(f"reference requests failed: {bad[:3]}")
    return {r.request.prompt_key: r.token_ids for r in results}


def server_state(base: str, wait: float = 60) -> dict[str, Any]:
    """After a load: ``/health`` status, and the running / waiting request gauges from
    ``/metrics`` once both reach 0 (or as last seen after ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    state: dict[str, Any] = {}
    while True:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
            state["health"] = resp.status
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for name in ("num_requests_running", "num_requests_waiting"):
            state[name] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                              if line.startswith(f"vllm:{name}"))
        if (state["num_requests_running"] == 0 and state["num_requests_waiting"] == 0) or \
                time.monotonic() > deadline:
            return state
        time.sleep(1)

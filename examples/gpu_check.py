# SPDX-License-Identifier: Apache-2.0
"""GPU checks of the drafter in plain torch (no vLLM needed), for a lent GPU machine.

    python examples/gpu_check.py --out gpu_check.json          # full size, on CUDA
    python examples/gpu_check.py --quick --out check.json      # reduced, any device (CI)

Measures and checks, for the real ``RecurrentDrafter`` and ``beam_search``:

1. **Peak memory and time** of one beam search (W = 4, L = 5) at B in {1, 16, 256} and
   Vd in {8k, 128k}, eager and (CUDA) replayed from CUDA graphs, against the formula the
   engine reserves (``memory.beam_search_peak_bytes``).
2. **bf16 against fp32**: share of requests whose best beam is the same.
3. **No host synchronisation** inside the search or its graph replay
   (``torch.cuda.set_sync_debug_mode("error")``; CUDA only).
4. **Tree attention maths**: masked scaled-dot-product attention of a real drafted tree
   (context + ancestors + self, depth positions) against a per-node float64 reference.

Writes one JSON report; exit status 1 if a check fails. On CPU the graph and sync checks
are reported as skipped. Needs only torch and this repository (plus pydantic, which the
drafter config uses).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_redrafter.beam_search import beam_search  # noqa: E402
from vllm_redrafter.config import DrafterConfig  # noqa: E402
from vllm_redrafter.drafter import RecurrentDrafter  # noqa: E402
from vllm_redrafter.graphs import CudaGraphBackend, GraphedSearch, batch_buckets  # noqa: E402
from vllm_redrafter.memory import LiveBytes, beam_search_peak_bytes  # noqa: E402
from vllm_redrafter.tree import build_tree  # noqa: E402

WIDTH, LENGTH = 4, 5


def make_drafter(hidden: int, draft_vocab: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[RecurrentDrafter, torch.Tensor]:
    """A random drafter (own head over ``draft_vocab``) and a target embedding table."""
    config = DrafterConfig(hidden_size=hidden, vocab_size=draft_vocab, exit_dim=hidden,
                           num_draft_layers=2, rnn=True)
    generator = torch.Generator().manual_seed(0)
    drafter = RecurrentDrafter(config, generator=generator)
    with torch.no_grad():
        drafter.lm_head.weight.mul_(8.0)  # a peaked draft distribution, like a trained one
    table = torch.randn(draft_vocab, hidden, generator=generator) / hidden**0.5
    return drafter.to(device=device, dtype=dtype).eval(), table.to(device=device, dtype=dtype)


def search_fn(drafter: RecurrentDrafter, table: torch.Tensor):  # noqa: ANN201
    def run(hidden: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        return beam_search(drafter, lambda ids: table[ids], hidden, init, WIDTH, LENGTH).tokens
    return run


def measure(fn, hidden: torch.Tensor, init: torch.Tensor, repeats: int) -> dict:  # noqa: ANN001
    """Peak bytes allocated by one call and mean seconds per call."""
    cuda = hidden.device.type == "cuda"
    with torch.no_grad():
        fn(hidden, init)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(hidden, init)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with LiveBytes() as meter:
                fn(hidden, init)
            peak = meter.peak
        start = time.perf_counter()
        for _ in range(repeats):
            fn(hidden, init)
        if cuda:
            torch.cuda.synchronize()
    return {"peak_bytes": int(peak), "seconds": (time.perf_counter() - start) / repeats}


def check_beam_search(device: torch.device, batches: list[int], vocabs: list[int],
                      hidden_size: int, repeats: int) -> list[dict]:
    rows = []
    for vocab in vocabs:
        for dtype in (torch.float32, torch.bfloat16):
            drafter, table = make_drafter(hidden_size, vocab, dtype, device)
            run = search_fn(drafter, table)
            for batch in batches:
                generator = torch.Generator().manual_seed(batch)
                hidden = torch.randn(batch, hidden_size, generator=generator).to(device, dtype)
                init = torch.randint(0, vocab, (batch,), generator=generator).to(device)
                bound = beam_search_peak_bytes(batch, WIDTH, vocab, hidden_size, dtype)
                row = {"batch": batch, "draft_vocab": vocab, "dtype": str(dtype),
                       "formula_bytes": bound, "eager": measure(run, hidden, init, repeats)}
                row["eager"]["within_formula"] = row["eager"]["peak_bytes"] <= bound
                if device.type == "cuda":
                    graphed = GraphedSearch(run, hidden_size, dtype, device,
                                            batch_buckets(batch), CudaGraphBackend())
                    with torch.no_grad():
                        graphed.capture_all()
                        same = torch.equal(graphed(hidden, init).clone(), run(hidden, init))
                    row["graph"] = measure(graphed, hidden, init, repeats)
                    row["graph"]["equals_eager"] = bool(same)
                    row["graph"]["no_sync"] = no_sync(graphed, run, hidden, init)
                else:
                    row["graph"] = "skipped: CUDA graphs need a GPU"
                rows.append(row)
    return rows


def no_sync(graphed, run, hidden: torch.Tensor, init: torch.Tensor) -> bool:  # noqa: ANN001
    """True if neither the eager search nor the graph replay synchronises with the host."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            run(hidden, init)
            graphed(hidden, init)
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_bf16_agreement(device: torch.device, hidden_size: int, vocab: int, batch: int
                         ) -> dict:
    """Best beam of the same drafter in fp32 and bf16, on the same inputs."""
    fp32, table32 = make_drafter(hidden_size, vocab, torch.float32, device)
    bf16, table16 = make_drafter(hidden_size, vocab, torch.bfloat16, device)
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(batch, hidden_size, generator=generator).to(device)
    init = torch.randint(0, vocab, (batch,), generator=generator).to(device)
    with torch.no_grad():
        a = search_fn(fp32, table32)(hidden, init)[:, 0]  # [B, L]
        b = search_fn(bf16, table16)(hidden.bfloat16(), init)[:, 0]
    first = (a[:, 1] == b[:, 1]).float().mean().item()
    full = (a == b).all(dim=1).float().mean().item()
    return {"batch": batch, "first_token_agreement": first, "best_beam_agreement": full}


def tree_attention_error(device: torch.device, dtype: torch.dtype, context: int = 37,
                         heads: int = 4, head_dim: int = 32) -> dict:
    """Masked SDPA over (context + tree) against a per-node float64 reference."""
    generator = torch.Generator().manual_seed(3)
    beams = torch.tensor([[[5, 1, 2, 3, 4], [5, 1, 2, 7, 8], [5, 1, 9, 3, 4],
                           [5, 6, 2, 3, 4]]])  # [1, W, L], shared prefixes
    tree = build_tree(beams)
    n = int(tree.num_nodes[0])
    parents = tree.parents[0, :n].tolist()
    mask = torch.zeros(n, context + n, dtype=torch.bool)  # [nodes, keys]
    mask[:, :context] = True
    for node in range(n):
        walk = node
        while walk >= 0:
            mask[node, context + walk] = True
            walk = parents[walk]
    q = torch.randn(heads, n, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(heads, context + n, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(heads, context + n, head_dim, generator=generator, dtype=torch.float64)
    reference = torch.empty_like(q)
    for node in range(n):
        keys = mask[node].nonzero().flatten()
        scores = torch.einsum("hd,hkd->hk", q[:, node], k[:, keys]) / head_dim**0.5
        reference[:, node] = torch.einsum("hk,hkd->hd", scores.softmax(-1), v[:, keys])
    got = F.scaled_dot_product_attention(q.to(device, dtype), k.to(device, dtype),
                                         v.to(device, dtype), attn_mask=mask.to(device))
    error = (got.double().cpu() - reference).abs().max().item()
    # negative control: a causal mask (what a chain verifier uses) is wrong for a tree
    causal = torch.ones(n, context + n, dtype=torch.bool).tril(context)
    wrong = F.scaled_dot_product_attention(q.to(device, dtype), k.to(device, dtype),
                                           v.to(device, dtype), attn_mask=causal.to(device))
    control = (wrong.double().cpu() - reference).abs().max().item()
    return {"dtype": str(dtype), "nodes": n, "max_abs_error": error,
            "causal_mask_error": control}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes (CI, CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        batches, vocabs, hidden_size, repeats, agree_batch = [1, 16], [2048], 64, 2, 64
    else:
        batches, vocabs, hidden_size, repeats, agree_batch = [1, 16, 256], [8192, 128256], \
            4096, 20, 256
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "beam_search": check_beam_search(device, batches, vocabs, hidden_size, repeats),
        "bf16_vs_fp32": check_bf16_agreement(device, hidden_size, vocabs[0], agree_batch),
        "tree_attention": [tree_attention_error(device, dtype)
                           for dtype in (torch.float32, torch.bfloat16)],
    }
    failures = [f"B={r['batch']} Vd={r['draft_vocab']} {r['dtype']}: eager peak over formula"
                for r in report["beam_search"] if not r["eager"]["within_formula"]]
    for r in report["beam_search"]:
        if isinstance(r["graph"], dict) and not (r["graph"]["equals_eager"]
                                                 and r["graph"]["no_sync"]):
            failures.append(f"B={r['batch']} Vd={r['draft_vocab']}: graph replay wrong or syncs")
    for r in report["tree_attention"]:
        limit = 1e-4 if r["dtype"] == "torch.float32" else 3e-2
        if r["max_abs_error"] > limit or r["causal_mask_error"] < 10 * limit:
            failures.append(f"tree attention {r['dtype']}: error {r['max_abs_error']:.2e}")
    report["failures"] = failures
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"failures": failures, "out": str(args.out)}))  # noqa: T201 (script)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

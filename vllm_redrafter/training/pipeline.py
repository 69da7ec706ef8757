# SPDX-License-Identifier: Apache-2.0
"""``train`` pipeline glue: hidden states for each generations dir (cached), then training."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vllm_redrafter.logger import get_logger
from vllm_redrafter.training.trainer import RowSet, TrainConfig, train_drafter

logger = get_logger(__name__)


def prepare_rows(target: str | Path, data_dirs: list[str | Path], num_steps: int, *,
                 hidden_dtype: str = "bfloat16", max_batch_tokens: int = 8192,
                 backend: str = "vllm", progress: bool = True) -> tuple[RowSet, float]:
    """Extract (or reuse) hidden states of every ``DIR/generations.jsonl`` into ``DIR/hidden``
    and return the concatenated rows plus the seconds spent extracting."""
    import torch

    from vllm_redrafter.training.hidden import extract_hidden_states, load_hidden_shards

    t0 = time.perf_counter()
    parts = []
    for d in data_dirs:
        d = Path(d)
        gens = d / "generations.jsonl" if d.is_dir() else d
        hdir = gens.parent / "hidden"
        extract_hidden_states(target, gens, hdir, dtype=hidden_dtype,
                              max_batch_tokens=max_batch_tokens, backend=backend,
                              progress=progress)
        parts.append(load_hidden_shards(hdir))
    seconds = time.perf_counter() - t0
    if len(parts) == 1:
        merged = parts[0]
    else:
        base = 0
        offs = [torch.zeros(1, dtype=torch.int64)]
        for p in parts:
            offs.append(p["seq_offsets"][1:] + base)
            base += int(p["seq_offsets"][-1])
        merged = {"hidden": torch.cat([p["hidden"] for p in parts]),
                  "tokens": torch.cat([p["tokens"] for p in parts]),
                  "seq_offsets": torch.cat(offs),
                  "ids": [f"{i}:{x}" for i, p in enumerate(parts) for x in p["ids"]]}
    return RowSet.from_shards(merged, num_steps), seconds


def run_pipeline(target: str | Path, data_dirs: list[str], out_dir: str | Path, cfg: TrainConfig,
                 *, eval_dirs: dict[str, str] | None = None, hidden_only: bool = False,
                 hidden_backend: str = "vllm", verifier_name: str | None = None,
                 stop_after: int | None = None, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, t_hidden = prepare_rows(target, data_dirs, cfg.num_steps, backend=hidden_backend,
                                   progress=progress)
    extra = {}
    for name, d in (eval_dirs or {}).items():
        extra[name], t = prepare_rows(target, [d], cfg.num_steps, backend=hidden_backend,
                                           progress=progress)
        t_hidden += t
    logger.info("train: hidden states ready (%d rows, %.1f s)", rows.hidden.shape[0], t_hidden)
    timing_path = out_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    timing["hidden_seconds_last_call"] = t_hidden
    if t_hidden > 5:  # real extraction work happened in this call
        timing["hidden_seconds"] = timing.get("hidden_seconds", 0.0) + t_hidden
    timing_path.write_text(json.dumps(timing, indent=2))
    if hidden_only:
        return {"rows": int(rows.hidden.shape[0]), "hidden_seconds": t_hidden}
    summary = train_drafter(target, rows, out_dir, cfg, extra_eval=extra,
                            stop_after=stop_after, verifier_name=verifier_name,
                            progress=progress)
    summary["hidden_seconds"] = timing.get("hidden_seconds", t_hidden)
    if "train_seconds" in summary:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

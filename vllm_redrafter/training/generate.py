# SPDX-License-Identifier: Apache-2.0
"""Stage 1 of distillation: the target's own responses to a prompts file, as token ids.

Greedy self-generated responses are exactly the paper's distillation targets: at every position
``t`` of a greedy response, the target's greedy continuation of the prefix ``y_1..t`` *is* the rest
of the response, so teacher-forced training on these sequences matches the target's multi-token
continuation at every position (redrafter-algorithm.md §5.2) without a second pass.

vLLM is imported lazily inside :func:`generate_responses`; callers must run it under an
``if __name__ == "__main__":`` guard (vLLM may spawn worker processes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from vllm_redrafter.logger import get_logger
from vllm_redrafter.training.data import PromptRecord, iter_generations, load_prompts

logger = get_logger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(target: str | Path) -> bool:
    return any((Path(target) / f).is_file() for f in _TOKENIZER_FILES)


def render_prompts(records: list[PromptRecord], target: str | Path,
                   max_prompt_tokens: int) -> list[list[int] | None]:
    """Token ids of each prompt (chat template applied); ``None`` for prompts that are too long."""
    needs_template = any(r.token_ids is None for r in records)
    tok = None
    if needs_template:
        if not has_tokenizer(target):
            raise ValueError(f"{target} has no tokenizer: give prompts as token ids "
                             '({"prompt": [ids]} or {"prompt_token_ids": [ids]})')
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(target))
    out: list[list[int] | None] = []
    for r in records:
        if r.token_ids is not None:
            ids = list(r.token_ids)
        else:
            text = tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append(ids if 0 < len(ids) <= max_prompt_tokens else None)
    return out


def done_ids(out_path: Path) -> set[str]:
    return {str(r["id"]) for r in iter_generations(out_path)}


def _truncate_torn_tail(path: Path) -> None:
    """Drop a partial last line left by a killed run, so appends stay valid JSONL."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(cut)


def generate_responses(target: str | Path, prompts: str | Path, out_dir: str | Path, *,
                       max_tokens: int = 256, temperature: float = 0.0, seed: int = 0,
                       limit: int | None = None, offset: int = 0,
                       shuffle_seed: int | None = None, chunk_size: int = 256,
                       max_num_seqs: int = 128, max_prompt_tokens: int = 768,
                       dtype: str = "auto", max_num_batched_tokens: int | None = None,
                       second_turn_of: str | Path | None = None,
                       progress: bool = True) -> Path:
    """Generate responses for every prompt not yet in ``out_dir/generations.jsonl``.

    With ``second_turn_of`` (a ``generate`` output for the same prompts), each prompt is
    that run's first turn and finished answer plus a follow-up user turn
    (:mod:`~vllm_redrafter.training.followups`); a first answer cut at the length cap is
    closed with the end-of-turn token, as a chat client sending it back would.

    Work is done in chunks of ``chunk_size`` prompts, each appended (and flushed) when complete,
    so an interrupted run resumes where it stopped. Returns the generations file.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / "generations.jsonl"
    _truncate_torn_tail(out_path)
    records = load_prompts(prompts, limit=limit, offset=offset, shuffle_seed=shuffle_seed)
    if second_turn_of is not None:
        from vllm_redrafter.training.followups import load_second_turn_records

        records = load_second_turn_records(records, second_turn_of, target)
    finished = done_ids(out_path)
    todo = [r for r in records if r.id not in finished]
    meta = {"target": str(target), "prompts": str(prompts), "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "limit": limit, "offset": offset,
            "shuffle_seed": shuffle_seed,
            "max_prompt_tokens": max_prompt_tokens, "dtype": dtype,
            "second_turn_of": None if second_turn_of is None else str(second_turn_of)}
    (out_dir / "generate_meta.json").write_text(json.dumps(meta, indent=2))
    logger.info("generate: %d prompts, %d already done, %d to go -> %s",
                len(records), len(records) - len(todo), len(todo), out_path)
    if not todo:
        return out_path

    ids = render_prompts(todo, target, max_prompt_tokens)
    skipped = sum(i is None for i in ids)
    if skipped:
        logger.warning("generate: skipping %d prompts longer than %d tokens", skipped,
                       max_prompt_tokens)
    work = [(r, i) for r, i in zip(todo, ids) if i is not None]

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max_prompt_tokens + max_tokens + 8
    cfg_path = Path(target) / "config.json"
    if cfg_path.is_file():  # never ask for more than the model's context
        limit_len = json.loads(cfg_path.read_text()).get("max_position_embeddings")
        if limit_len:
            max_len = min(max_len, int(limit_len))
    work = [(r, i) for r, i in work if len(i) + max_tokens <= max_len]
    kwargs = dict(model=str(target), enforce_eager=True, dtype=dtype, seed=seed,
                  max_model_len=max_len, max_num_seqs=max_num_seqs,
                  skip_tokenizer_init=not has_tokenizer(target))
    if max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    llm = LLM(**kwargs)
    # No per-request seed: vLLM 0.32 on CPU crashes on seeded requests whose prefill is
    # chunked (the generator rewind in _bookkeeping_sync); the engine's seed (LLM(seed=))
    # makes a run reproducible for the same prompts and batch composition instead.
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens,
                            detokenize=False)

    n_gen = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(work), desc="generate", unit="prompt", file=sys.stderr,
               disable=not progress)
    with open(out_path, "a", encoding="utf-8") as f:
        for start in range(0, len(work), chunk_size):
            chunk = work[start:start + chunk_size]
            outs = llm.generate([TokensPrompt(prompt_token_ids=i) for _, i in chunk], params,
                                use_tqdm=False)
            lines = []
            for (rec, pids), out in zip(chunk, outs):
                comp = out.outputs[0]
                resp = list(comp.token_ids)
                n_gen += len(resp)
                lines.append(json.dumps({"id": rec.id, "prompt_len": len(pids),
                                         "token_ids": list(pids) + resp,
                                         "finished": comp.finish_reason == "stop"}))
            f.write("\n".join(lines) + "\n")
            f.flush()
            bar.update(len(chunk))
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(f"{n_gen / max(elapsed, 1e-9):.0f} tok/s")
    bar.close()
    elapsed = time.perf_counter() - t0
    logger.info("generate: %d responses, %d tokens in %.1f s (%.1f tok/s)", len(work), n_gen,
                elapsed, n_gen / max(elapsed, 1e-9))
    return out_path

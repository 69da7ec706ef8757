# SPDX-License-Identifier: Apache-2.0
"""ReDrafter vs plain vLLM on the demo target (SmolLM2-135M-Instruct, fp32).

10 MT-Bench first turns in the target's chat template, 64 greedy tokens each. Chain mode
with a random drafter (acceptance near zero: the rejection path runs every step), and
tree mode (W=4, L=5) with the **shipped demo drafter** (real acceptance, off-beam-0
paths, KV fix-ups). Three engines, one after the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e import chain_helpers as h

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEMO_HIDDEN, DEMO_VOCAB = 576, 49152
SHIPPED_DRAFTER = Path(__file__).resolve().parents[2] / "examples/drafters/smollm2-135m-instruct"
TREE_TAU_FLOOR = 1.5
"""Mean acceptance length floor of the shipped drafter in tree mode on these prompts."""


@pytest.fixture(scope="module")
def chat_prompts(demo_target_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_target_dir))
    prompts = []
    for turn in h.mt_bench_turns(h.NUM_PROMPTS):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": turn}],
                                            add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    return h.save_random_drafter(tmp_path_factory.mktemp("demo-drafter"), DEMO_HIDDEN,
                                 DEMO_VOCAB, seed=1)


def _greedy(demo_target_dir, prompts, spec=None):
    with h.vllm_engine(model=str(demo_target_dir), max_model_len=1024,
                       speculative_config=spec) as llm:
        ids = h.generate_ids(llm, prompts, h.NEW_TOKENS, temperature=0.0)
        return ids, h.spec_metrics(llm)


@pytest.fixture(scope="module")
def baseline(demo_target_dir, chat_prompts):
    ids, _ = _greedy(demo_target_dir, chat_prompts)
    return ids


def test_demo_target_greedy_parity(demo_target_dir, chat_prompts, drafter_dir, baseline):
    spec = {"method": "redrafter", "model": str(drafter_dir), "beam_width": h.BEAM_WIDTH,
            "beam_length": h.BEAM_LENGTH}
    redrafter, metrics = _greedy(demo_target_dir, chat_prompts, spec)
    assert len(baseline) == h.NUM_PROMPTS
    assert all(len(ids) == h.NEW_TOKENS for ids in baseline)
    assert redrafter == baseline
    assert metrics["num_drafts"] > 0
    assert metrics["num_draft_tokens"] == metrics["num_drafts"] * (h.BEAM_LENGTH - 1)


def test_demo_target_tree_parity_with_the_shipped_drafter(demo_target_dir, chat_prompts,
                                                          baseline):
    spec = {"method": "redrafter", "model": str(SHIPPED_DRAFTER), "beam_width": 4,
            "beam_length": 5, "tree": True}
    redrafter, metrics = _greedy(demo_target_dir, chat_prompts, spec)
    assert redrafter == baseline
    assert metrics["num_drafts"] > 0
    # Trees, deduplicated: more than one beam's drafts, fewer than 4 disjoint beams'.
    mean_tree = metrics["num_draft_tokens"] / metrics["num_drafts"]
    assert 4 < mean_tree <= 16, metrics
    assert metrics["mean_acceptance_length"] >= TREE_TAU_FLOOR, metrics

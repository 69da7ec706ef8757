# SPDX-License-Identifier: Apache-2.0
"""Chain-mode ReDrafter vs plain vLLM on the demo target (SmolLM2-135M-Instruct, fp32).

10 MT-Bench first turns in the target's chat template, 64 greedy tokens each; the drafter
has random weights (acceptance is near zero, which exercises the rejection path on every
step). Two engines, one after the other.
"""

from __future__ import annotations

import pytest

from tests.e2e import chain_helpers as h

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEMO_HIDDEN, DEMO_VOCAB = 576, 49152


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


def test_demo_target_greedy_parity(demo_target_dir, chat_prompts, drafter_dir):
    baseline, _ = _greedy(demo_target_dir, chat_prompts)
    spec = {"method": "redrafter", "model": str(drafter_dir), "beam_width": h.BEAM_WIDTH,
            "beam_length": h.BEAM_LENGTH}
    redrafter, metrics = _greedy(demo_target_dir, chat_prompts, spec)
    assert len(baseline) == h.NUM_PROMPTS
    assert all(len(ids) == h.NEW_TOKENS for ids in baseline)
    assert redrafter == baseline
    assert metrics["num_drafts"] > 0
    assert metrics["num_draft_tokens"] == metrics["num_drafts"] * (h.BEAM_LENGTH - 1)

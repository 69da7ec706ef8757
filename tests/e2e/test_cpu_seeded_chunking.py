# SPDX-License-Identifier: Apache-2.0
"""Seeded sampling with chunked prefill on CPU (tiny random Llama, float32).

vLLM 0.32 rewinds the generator of a request whose sample is discarded (a partial
prefill chunk) by Philox offset, which CPU generators do not have: a plain engine dies
with "CPU Generator does not use offset" (the negative control below). ReDrafter engines
carry the fix ``cpu-seeded-discard-rewind``; there the same requests complete, and the
discarded draws are undone exactly: the seeded outputs equal those of a ReDrafter engine
whose token budget prefills every prompt in one chunk (without the rewind, each discarded
chunk's draw would shift the request's random stream).
"""

from __future__ import annotations

import pytest

from tests.e2e import chain_helpers as h

pytestmark = [pytest.mark.e2e]

CHUNK = dict(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=512,
             enable_chunked_prefill=True)


def _prompts(assets):
    # 4 prompts of 96 tokens: every prompt is prefilled in two or more chunks of <= 64
    return [(p * 2)[:96] for p in assets["prompts"][:4]]


def _seeded(llm, prompts, seed0):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=0.8, max_tokens=12, seed=seed0 + i,
                             ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_plain_vllm_dies_on_seeded_chunked_prefill(assets):
    """Negative control: the vLLM bug the fix is for."""
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       **CHUNK) as llm:
        with pytest.raises(Exception) as info:
            _seeded(llm, _prompts(assets), 0)
    chain = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("offset" in m or "EngineCore" in m or "Engine" in m for m in chain), chain


def test_redrafter_engine_samples_seeded_chunked_prompts(assets):
    spec = {"method": "redrafter", "model": str(assets["overfit_dir"]), "adaptive": False,
            "beam_width": h.BEAM_WIDTH, "beam_length": h.BEAM_LENGTH}
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       speculative_config=spec, **CHUNK) as llm:
        chunked = _seeded(llm, _prompts(assets), 0)
        other = _seeded(llm, _prompts(assets), 100)
        metrics = h.spec_metrics(llm)
    whole = {**CHUNK, "max_num_batched_tokens": 2048}
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       speculative_config=spec, **whole) as llm:
        unchunked = _seeded(llm, _prompts(assets), 0)
    assert all(len(ids) == 12 for ids in chunked)
    assert chunked == unchunked  # the discarded draws were undone exactly
    assert chunked != other  # (the seeds matter)
    assert metrics["num_drafts"] > 0

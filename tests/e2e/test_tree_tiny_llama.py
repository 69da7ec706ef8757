# SPDX-License-Identifier: Apache-2.0
"""Tree verification inside vLLM on a tiny random Llama (CPU, float32).

The oracle proposer (``tests/e2e/tree_oracle.py``) knows the target's greedy
continuations and puts the correct branch in beam 1 or 2, never beam 0: a chain verifier
accepts nothing, the tree must accept the full depth (3 tokens) every step. Negative
controls switch off depth positions, the tree mask and the KV fix-up one at a time
(``VLLM_REDRAFTER_TREE_DISABLE``) and show that each breaks the result.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e import chain_helpers as h
from tests.e2e import tree_oracle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NEGATIVE_PROMPTS = 4
SAMPLES = 400
TEMPERATURE = 0.8
SAMPLED_TOKENS = 4


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory):
    """Plain vLLM greedy outputs, and the oracle's reference file built from them."""
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       max_num_seqs=64) as llm:
        greedy = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        sampled = h.sample_ids(llm, assets["prompts"][2], range(SAMPLES),
                                   TEMPERATURE, SAMPLED_TOKENS)
    refs = [p + g for p, g in zip(assets["prompts"], greedy)]
    refs_file = tmp_path_factory.mktemp("oracle") / "refs.json"
    refs_file.write_text(json.dumps(refs))
    return {"greedy": greedy, "refs_file": str(refs_file), "sampled": sampled}


def _oracle_engine(assets, baseline, tree=True, disable=None, **kwargs):
    num_tokens = tree_oracle.WIDTH * (tree_oracle.LENGTH - 1) if tree else tree_oracle.LENGTH - 1
    h.set_env({tree_oracle.REFS_ENV: baseline["refs_file"],
               "VLLM_REDRAFTER_TREE_DISABLE": disable})
    return h.vllm_engine(
        model=str(assets["target_dir"]), skip_tokenizer_init=True,
        speculative_config={"method": "custom_class", "model": tree_oracle.CLASS_PATH,
                            "num_speculative_tokens": num_tokens},
        additional_config={"redrafter": {
            "model": str(assets["random_dir"]), "adaptive": False,
            "beam_width": tree_oracle.WIDTH,
            "beam_length": tree_oracle.LENGTH, "tree": tree}},
        **kwargs)


def _full_depth_share(metrics):
    """Share of drafts whose token at depth 3 (the last) was accepted."""
    return metrics["accepted_per_pos"][tree_oracle.LENGTH - 2] / max(metrics["num_drafts"], 1)


@pytest.fixture(scope="module")
def oracle_run(assets, baseline):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with _oracle_engine(assets, baseline, max_num_seqs=64) as llm:
        greedy = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        metrics = h.spec_metrics(llm)
        # A batch mixing tree requests and a chain fallback (logprobs) request.
        params = [SamplingParams(max_tokens=h.NEW_TOKENS, ignore_eos=True, temperature=0.0,
                                 logprobs=1 if i == 0 else None)
                  for i in range(len(assets["prompts"]))]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in assets["prompts"]],
                            params, use_tqdm=False)
        mixed = [list(o.outputs[0].token_ids) for o in outs]
        mixed_logprobs = outs[0].outputs[0].logprobs
        mixed_metrics = h.spec_metrics(llm)
        sampled = h.sample_ids(llm, assets["prompts"][2], range(SAMPLES, 2 * SAMPLES),
                                   TEMPERATURE, SAMPLED_TOKENS)
    return {"greedy": greedy, "metrics": metrics, "mixed": mixed,
            "mixed_logprobs": mixed_logprobs, "mixed_metrics": mixed_metrics,
            "sampled": sampled}


def test_tree_accepts_the_full_depth_off_beam_zero(baseline, oracle_run):
    assert oracle_run["greedy"] == baseline["greedy"]
    metrics = oracle_run["metrics"]
    assert metrics["num_drafts"] > 0
    # Every step but a request's last (the oracle runs out of reference) accepts all 3.
    assert _full_depth_share(metrics) > 0.85, metrics
    assert metrics["mean_acceptance_length"] > 3.5, metrics
    # Trees, not chains, were scheduled: 8 nodes = 7 drafts per step.
    assert metrics["num_draft_tokens"] / metrics["num_drafts"] > 6.5, metrics


def test_mixed_tree_and_chain_fallback_batch_keeps_parity(baseline, oracle_run):
    assert oracle_run["mixed"] == baseline["greedy"]
    assert oracle_run["mixed_logprobs"] is not None
    assert len(oracle_run["mixed_logprobs"]) == h.NEW_TOKENS


def test_chain_verifier_accepts_nothing_from_the_oracle(assets, baseline):
    """The same oracle verified as a chain (beam 0 only): the tree is what accepts."""
    prompts = assets["prompts"][:NEGATIVE_PROMPTS]
    with _oracle_engine(assets, baseline, tree=False) as llm:
        out = h.generate_ids(llm, prompts, h.NEW_TOKENS, temperature=0.0)
        metrics = h.spec_metrics(llm)
    assert out == baseline["greedy"][:NEGATIVE_PROMPTS]
    assert metrics["num_drafts"] > 0 and metrics["num_accepted_tokens"] == 0, metrics


@pytest.mark.parametrize("part", ["positions", "mask", "kv_fixup"])
def test_each_tree_part_is_load_bearing(assets, baseline, part):
    prompts = assets["prompts"][:NEGATIVE_PROMPTS]
    try:
        with _oracle_engine(assets, baseline, disable=part) as llm:
            out = h.generate_ids(llm, prompts, h.NEW_TOKENS, temperature=0.0)
            metrics = h.spec_metrics(llm)
    finally:
        h.set_env({"VLLM_REDRAFTER_TREE_DISABLE": None})
    exact = out == baseline["greedy"][:NEGATIVE_PROMPTS]
    full = _full_depth_share(metrics) > 0.85
    assert not (exact and full), (part, metrics)


def test_tree_sampling_matches_the_target_distribution(baseline, oracle_run):
    """Sample-and-descend is lossless: per position 1..4 (T=0.8, top-k 50, top-p 0.95)
    the token distribution equals plain vLLM's (chi-square homogeneity, Bonferroni)."""
    ref, got = baseline["sampled"], oracle_run["sampled"]
    assert len(ref) == len(got) == SAMPLES
    h.assert_same_token_distribution(ref, got, SAMPLED_TOKENS)


def _counter(llm, name):
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def test_preemption_under_a_tiny_kv_cache_keeps_parity(assets, baseline):
    """Ten requests share 12 blocks of 32 tokens: requests are preempted and resumed
    while their trees are registered; outputs stay identical."""
    with _oracle_engine(assets, baseline, block_size=32, num_gpu_blocks_override=12,
                        max_num_seqs=16, max_model_len=256) as llm:
        out = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        metrics = h.spec_metrics(llm)
        preemptions = _counter(llm, "vllm:num_preemptions")
    assert preemptions > 0
    assert out == baseline["greedy"]
    assert _full_depth_share(metrics) > 0.5, metrics

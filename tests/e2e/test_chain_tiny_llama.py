# SPDX-License-Identifier: Apache-2.0
"""Chain-mode ReDrafter vs plain vLLM on a tiny random Llama (CPU, float32).

Three engines run one after another in this module: plain vLLM (the reference), ReDrafter
with a random drafter, and ReDrafter with an overfit drafter (memorised greedy
continuations, so most drafts are accepted). Prompts: the first 48 UTF-8 bytes of 10
MT-Bench first turns as token ids (no tokenizer), 64 generated tokens each.
"""

from __future__ import annotations

import pytest

from tests.e2e import chain_helpers as h

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLES = 400
"""Sampled requests per engine in the distribution test."""

SAMPLING_PROMPT = 2
"""Prompt whose first token has the highest entropy (about 1 nat at T=0.8)."""

TEMPERATURE = 0.8


def _run(assets, drafter_dir=None):
    spec = None
    if drafter_dir is not None:
        spec = {"method": "redrafter", "model": str(drafter_dir),
                "beam_width": h.BEAM_WIDTH, "beam_length": h.BEAM_LENGTH}
    prompt = assets["prompts"][SAMPLING_PROMPT]
    # disjoint seeds: the two samples of the statistical test are independent
    seed0 = 0 if drafter_dir is None else SAMPLES
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       max_num_seqs=64, speculative_config=spec) as llm:
        greedy = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        greedy_metrics = h.spec_metrics(llm)
        sampled = _sample_pairs(llm, prompt, range(seed0, seed0 + SAMPLES))
        total_metrics = h.spec_metrics(llm)
    return {"greedy": greedy, "metrics": greedy_metrics, "sampled": sampled,
            "total_metrics": total_metrics}


def _sample_pairs(llm, prompt, seeds):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=2, seed=s,
                             ignore_eos=True) for s in seeds]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * len(params), params,
                           use_tqdm=False)
    return [tuple(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def baseline(assets):
    return _run(assets)


@pytest.fixture(scope="module")
def random_drafter_run(assets, baseline):
    return _run(assets, assets["random_dir"])


@pytest.fixture(scope="module")
def overfit_drafter_run(assets, baseline):
    return _run(assets, assets["overfit_dir"])


def test_greedy_parity_random_drafter(baseline, random_drafter_run):
    assert len(baseline["greedy"]) == h.NUM_PROMPTS
    assert all(len(ids) == h.NEW_TOKENS for ids in baseline["greedy"])
    assert random_drafter_run["greedy"] == baseline["greedy"]
    metrics = random_drafter_run["metrics"]
    assert metrics["num_drafts"] > 0
    assert metrics["num_draft_tokens"] == metrics["num_drafts"] * (h.BEAM_LENGTH - 1)


def test_greedy_parity_overfit_drafter_with_high_acceptance(assets, baseline,
                                                            overfit_drafter_run):
    assert assets["train_accuracy"] > 0.9
    assert overfit_drafter_run["greedy"] == baseline["greedy"]
    metrics = overfit_drafter_run["metrics"]
    assert metrics["num_drafts"] > 0 and metrics["num_accepted_tokens"] > 0
    # vLLM's own counters: mean acceptance length = 1 + accepted / drafts
    assert metrics["mean_acceptance_length"] >= 2.0, metrics
    assert len(metrics["accepted_per_pos"]) == h.BEAM_LENGTH - 1
    assert all(count > 0 for count in metrics["accepted_per_pos"]), metrics


def test_sampling_distribution_matches_plain_vllm(baseline, overfit_drafter_run):
    """Lossless sampling: the joint law of the first two generated tokens is unchanged.

    Setup: one prompt, temperature 0.8, ``SAMPLES`` = 400 requests per engine, each with
    its own fixed seed (disjoint seed ranges, so the two samples are independent).
    Token 1 comes from the prefill; token 2 is where vLLM's rejection sampler verifies
    the overfit drafter's draft with point-mass acceptance (accept ``d`` with probability
    ``p(d)``, otherwise sample from ``p`` with ``d`` removed).

    Bound: a chi-square homogeneity test on the joint (token 1, token 2) categories
    (categories with a pooled expected count below 5 merged) must give ``p > 0.001``.
    Under the null (same distribution) this fails with probability 0.001. Power: a lossy
    rule that, e.g., always kept an accepted-looking draft would move P(token 2 = draft |
    token 1 = greedy) from ``p(d)`` (about 0.5-0.9 here) to 1, a shift the test detects
    at N=400 with probability > 0.999.
    """
    stat, df, p_value = h.chi_square_homogeneity(baseline["sampled"],
                                                 overfit_drafter_run["sampled"])
    assert p_value > 1e-3, (stat, df, p_value)
    assert df >= 2  # the distribution is not degenerate: the test has power
    # Both branches of the rejection sampler ran while sampling.
    before, after = overfit_drafter_run["metrics"], overfit_drafter_run["total_metrics"]
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    assert 0 < accepted < drafted, (accepted, drafted)


@pytest.fixture(scope="module")
def target_head_run(assets, baseline):
    spec = {"method": "redrafter", "model": str(assets["target_head_dir"]),
            "beam_width": h.BEAM_WIDTH, "beam_length": h.BEAM_LENGTH}
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       max_num_seqs=64, speculative_config=spec) as llm:
        greedy = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        metrics = h.spec_metrics(llm)
    return {"greedy": greedy, "metrics": metrics}


def _offline_top1(assets, bind_embedding: bool) -> float:
    """Teacher-forced step-1 top-1 of the target-head drafter on the greedy sequences,
    bound to the target's lm_head (right) or to its untied input embedding (wrong)."""
    import torch
    from transformers import LlamaForCausalLM

    from vllm_redrafter.beam_search import beam_search
    from vllm_redrafter.checkpoint import load_drafter

    target = LlamaForCausalLM.from_pretrained(str(assets["target_dir"]),
                                              dtype=torch.float32).eval()
    drafter = load_drafter(assets["target_head_dir"], dtype=torch.float32)
    weight = target.get_input_embeddings().weight if bind_embedding else target.lm_head.weight
    drafter.bind_target_head(weight)
    seqs = torch.tensor(assets["prompts"])  # [n, P]
    with torch.no_grad():
        seqs = target.generate(seqs, attention_mask=torch.ones_like(seqs), do_sample=False,
                               max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
        hidden = target.model(input_ids=seqs).last_hidden_state  # [n, S, H]
    rows = torch.arange(h.PROMPT_TOKENS - 1, seqs.shape[1] - 2)  # context rows with 2 targets
    beams = beam_search(drafter, target.get_input_embeddings(), hidden[:, rows].flatten(0, 1),
                        seqs[:, rows + 1].flatten(), 1, 2).tokens  # [n * R, 1, 2]
    wanted = seqs[:, rows + 2].flatten()  # [n * R]
    return float((beams[:, 0, 1] == wanted).float().mean())


def test_target_head_drafter_in_the_engine(assets, baseline, target_head_run):
    """A drafter that scores with the target's own (untied) lm_head through vLLM's
    ``lm_head`` module: outputs identical, drafts accepted like the overfit own-head one.
    Negative control: the same drafter bound to the input embedding instead of the
    output head (what a head wired to the wrong matrix would do) drafts almost nothing
    right, so the acceptance floor discriminates."""
    assert assets["target_head_accuracy"] > 0.9
    assert target_head_run["greedy"] == baseline["greedy"]
    metrics = target_head_run["metrics"]
    assert metrics["mean_acceptance_length"] >= 2.0, metrics
    assert _offline_top1(assets, bind_embedding=False) > 0.8
    assert _offline_top1(assets, bind_embedding=True) < 0.2

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

SAMPLING = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}
"""Per-request sampling of the distribution test (top-k and top-p both active)."""

TEMPERATURE_ONLY = {"temperature": 0.8}
"""The negative control's sampling: without the fix, vLLM's CPU expand kernel hands the
rejection sampler uninitialised top-k values, which crash the engine (an index out of
bounds) rather than bias it; temperature alone is biased silently, the case a
distribution test must catch."""

SAMPLED_TOKENS = h.BEAM_LENGTH
"""Tokens per sampled request: position 1 from the prefill, positions 2..L verified."""


def _spec(drafter_dir):
    return {"method": "redrafter", "model": str(drafter_dir), "adaptive": False,
            "beam_width": h.BEAM_WIDTH, "beam_length": h.BEAM_LENGTH}


def _seeds(run: int) -> range:
    """Disjoint seeds per engine: the samples of the statistical tests are independent."""
    return range(run * SAMPLES, (run + 1) * SAMPLES)


def _run(assets, drafter_dir=None, run=0):
    spec = None if drafter_dir is None else _spec(drafter_dir)
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       max_num_seqs=64, speculative_config=spec) as llm:
        greedy = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        greedy_metrics = h.spec_metrics(llm)
        sampled, mixed_greedy = h.sample_mixed(
            llm, assets["prompts"][SAMPLING_PROMPT], _seeds(run), assets["prompts"],
            SAMPLED_TOKENS, **SAMPLING)
        total_metrics = h.spec_metrics(llm)
        temperature_only, _ = h.sample_mixed(
            llm, assets["prompts"][SAMPLING_PROMPT], _seeds(run + 10), [], SAMPLED_TOKENS,
            **TEMPERATURE_ONLY)
    return {"greedy": greedy, "metrics": greedy_metrics, "sampled": sampled,
            "mixed_greedy": mixed_greedy, "total_metrics": total_metrics,
            "temperature_only": temperature_only}


@pytest.fixture(scope="module")
def baseline(assets):
    return _run(assets)


@pytest.fixture(scope="module")
def random_drafter_run(assets, baseline):
    return _run(assets, assets["random_dir"], run=1)


@pytest.fixture(scope="module")
def overfit_drafter_run(assets, baseline):
    return _run(assets, assets["overfit_dir"], run=2)


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


def test_sampling_distribution_matches_plain_vllm(assets, baseline, overfit_drafter_run):
    """Lossless sampling: per position 1..L the token law is plain vLLM's.

    Setup: one prompt, T=0.8 with top-k 20 and top-p 0.9, ``SAMPLES`` = 400 seeded
    requests per engine (disjoint seeds), in one batch with the 10 greedy requests
    interleaved (steps mix greedy and sampled rows, whose per-request temperature / top-k
    / top-p the rejection sampler expands per draft token). Position 1 comes from the
    prefill; positions 2..L are where vLLM's rejection sampler verifies the overfit
    drafter's chains (point-mass acceptance).

    Bound: chi-square homogeneity per position and on the first two tokens jointly,
    Bonferroni at 1% (:func:`h.assert_same_token_distribution`). Power: computed in
    :func:`test_sampling_test_fails_without_the_cpu_expand_fix` on a real lossy engine.
    """
    h.assert_same_token_distribution(baseline["sampled"], overfit_drafter_run["sampled"],
                                     SAMPLED_TOKENS)
    h.assert_same_token_distribution(baseline["temperature_only"],
                                     overfit_drafter_run["temperature_only"], SAMPLED_TOKENS)
    # the greedy requests of the mixed batch are untouched by their sampled neighbours
    assert overfit_drafter_run["mixed_greedy"] == [g[:SAMPLED_TOKENS]
                                                   for g in baseline["greedy"]]
    # Both branches of the rejection sampler ran while sampling.
    before, after = overfit_drafter_run["metrics"], overfit_drafter_run["total_metrics"]
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    assert 0 < accepted < drafted, (accepted, drafted)


@pytest.mark.time_limit(600)
def test_sampling_test_fails_without_the_cpu_expand_fix(assets, baseline,
                                                        overfit_drafter_run):
    """Negative control and power of the distribution test: the same engine with the
    ``cpu-expand-kernel-fix`` patch left out (``VLLM_REDRAFTER_SKIP_PATCHES``, in a fresh
    interpreter so every vLLM process sees it) verifies drafts against a garbage-tempered
    target distribution (:data:`TEMPERATURE_ONLY`); the test must reject it, and its
    bootstrap power against that alternative at N=400 must be high. Even the greedy
    requests of the mixed batch go wrong then (their rows are verified with garbage
    temperatures too), which the fixed engine's mixed-batch check catches."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    request = {"engine": {"model": str(assets["target_dir"]), "skip_tokenizer_init": True,
                          "max_num_seqs": 64,
                          "speculative_config": _spec(assets["overfit_dir"])},
               "prompt": assets["prompts"][SAMPLING_PROMPT], "seeds": list(_seeds(3)),
               "greedy_prompts": assets["prompts"], "max_tokens": SAMPLED_TOKENS,
               "sampling": TEMPERATURE_ONLY}
    env = {**os.environ, "VLLM_REDRAFTER_SKIP_PATCHES": "cpu-expand-kernel-fix",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH"))
                                         if p)}
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.sampling_script",
                           json.dumps(request)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=540)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, f"rc={proc.returncode}\n{proc.stderr[-4000:]}"
    assert "patch cpu-expand-kernel-fix NOT applied" in proc.stderr
    result = json.loads(lines[-1][len("RESULT "):])
    lossy = [tuple(s) for s in result["samples"]]
    assert result["greedy"] != [g[:SAMPLED_TOKENS] for g in baseline["greedy"]]
    assert result["metrics"]["num_accepted_tokens"] > 0
    reference = baseline["temperature_only"]
    with pytest.raises(AssertionError):
        h.assert_same_token_distribution(reference, lossy, SAMPLED_TOKENS)
    power = h.bootstrap_power(reference, lossy, SAMPLED_TOKENS)
    assert power >= 0.9, power
    # the same check does not reject the fixed engine's sample this often (its size)
    size = h.bootstrap_power(reference, overfit_drafter_run["temperature_only"],
                             SAMPLED_TOKENS)
    assert size < power, (size, power)


@pytest.fixture(scope="module")
def target_head_run(assets, baseline):
    spec = {"method": "redrafter", "model": str(assets["target_head_dir"]), "adaptive": False,
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

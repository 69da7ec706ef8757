# SPDX-License-Identifier: Apache-2.0
"""Context look-up branches in the verified tree, inside vLLM (tiny random Llama, CPU,
float32).

The drafter is :class:`tests.e2e.tree_oracle.WrongBeamsProposer`: its three beams are all
wrong at depth 1, so **every accepted draft token must come from look-up** (the peaked
tiny Llama's greedy continuations repeat, so the request's own tokens predict them).
Checks: greedy parity with look-up on; accepted tokens > 0, all attributed to look-up;
the negative control (same beams, look-up off) accepts nothing; and sampling with
look-up branches in the tree keeps the target's distribution (positions 1..4, T = 0.8,
top-k 50, top-p 0.95, chi-square homogeneity against plain vLLM).
"""

from __future__ import annotations

import json

import pytest

from tests.e2e import chain_helpers as h
from tests.e2e import tree_oracle
from vllm_redrafter.bench.worker import _drafter_policy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLES = 400
TEMPERATURE = 0.8
SAMPLED_TOKENS = 4
NEGATIVE_PROMPTS = 4


def _sampling_prompt(assets):
    """The tree test's sampling prompt (several likely tokens at every position)."""
    return assets["prompts"][2]


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory):
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       max_num_seqs=64) as llm:
        greedy = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        sampled = h.sample_ids(llm, _sampling_prompt(assets), range(SAMPLES),
                                   TEMPERATURE, SAMPLED_TOKENS)
    refs = [p + g for p, g in zip(assets["prompts"], greedy)]
    refs_file = tmp_path_factory.mktemp("lookup-oracle") / "refs.json"
    refs_file.write_text(json.dumps(refs))
    return {"greedy": greedy, "refs_file": str(refs_file), "sampled": sampled}


def _engine(assets, baseline, lookup, **kwargs):
    h.set_env({tree_oracle.REFS_ENV: baseline["refs_file"],
               "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
    return h.vllm_engine(
        model=str(assets["target_dir"]), skip_tokenizer_init=True,
        speculative_config={"method": "custom_class", "model": tree_oracle.WRONG_CLASS_PATH,
                            "num_speculative_tokens":
                                tree_oracle.WIDTH * (tree_oracle.LENGTH - 1)},
        additional_config={"redrafter": {
            "model": str(assets["random_dir"]), "adaptive": False,
            "beam_width": tree_oracle.WIDTH,
            "beam_length": tree_oracle.LENGTH, "tree": True, "lookup": lookup}},
        **kwargs)


def _sources(llm):
    stats = llm.collective_rpc(_drafter_policy)[0]
    return {k: stats.get(f"accepted_{k}", 0.0) for k in ("drafter", "lookup", "both")}


@pytest.fixture(scope="module")
def lookup_run(assets, baseline):
    with _engine(assets, baseline, {"max_candidates": 2}, max_num_seqs=64) as llm:
        greedy = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        metrics = h.spec_metrics(llm)
        sources = _sources(llm)
        sampled = h.sample_ids(llm, _sampling_prompt(assets), range(SAMPLES, 2 * SAMPLES),
                                   TEMPERATURE, SAMPLED_TOKENS)
        sampled_metrics = h.spec_metrics(llm)
    return {"greedy": greedy, "metrics": metrics, "sources": sources, "sampled": sampled,
            "sampled_metrics": sampled_metrics}


def test_lookup_branches_keep_greedy_parity_and_are_accepted(baseline, lookup_run):
    assert lookup_run["greedy"] == baseline["greedy"]
    metrics, sources = lookup_run["metrics"], lookup_run["sources"]
    assert metrics["num_accepted_tokens"] > 0.3 * metrics["num_drafts"], metrics
    # the beams are wrong at depth 1: every accepted token is look-up's alone
    assert sources["lookup"] == metrics["num_accepted_tokens"], (sources, metrics)
    assert sources["drafter"] == 0 and sources["both"] == 0, sources


def test_without_lookup_the_same_beams_accept_nothing(assets, baseline):
    prompts = assets["prompts"][:NEGATIVE_PROMPTS]
    with _engine(assets, baseline, None) as llm:
        out = h.generate_ids(llm, prompts, h.NEW_TOKENS, temperature=0.0)
        metrics = h.spec_metrics(llm)
    assert out == baseline["greedy"][:NEGATIVE_PROMPTS]
    assert metrics["num_drafts"] > 0 and metrics["num_accepted_tokens"] == 0, metrics


def _chain_trees(worker) -> int:
    from vllm_redrafter.integration.runner import chain_tree_count

    return chain_tree_count()


def test_single_path_lookup_trees_go_through_the_chain_verifier(assets, baseline):
    """One look-up branch and the beams skipped on a trusted match: the tree is a single
    path, verified by vLLM's chain path; parity holds and the accepted tokens are still
    attributed to look-up (the path's last node is its accepted count)."""
    prompts = assets["prompts"][:NEGATIVE_PROMPTS]
    lookup = {"max_candidates": 1, "skip_beams_match": 2}
    with _engine(assets, baseline, lookup) as llm:
        # one request at a time: a step skips the beams only when all its requests may
        out = [h.generate_ids(llm, [p], h.NEW_TOKENS, temperature=0.0)[0] for p in prompts]
        metrics = h.spec_metrics(llm)
        sources = _sources(llm)
        chained = llm.collective_rpc(_chain_trees)[0]
        skipped = llm.collective_rpc(_drafter_policy)[0]["beams_skipped"]
    assert out == baseline["greedy"][:NEGATIVE_PROMPTS]
    assert skipped > 0 and chained > 0, (skipped, chained)
    assert metrics["num_accepted_tokens"] > 0, metrics
    assert sources["lookup"] == metrics["num_accepted_tokens"], (sources, metrics)


def test_sampling_with_lookup_matches_the_target_distribution(baseline, lookup_run):
    ref, got = baseline["sampled"], lookup_run["sampled"]
    assert len(ref) == len(got) == SAMPLES
    h.assert_same_token_distribution(ref, got, SAMPLED_TOKENS)
    # look-up branches were in the sampled trees and some were accepted
    before, after = lookup_run["metrics"], lookup_run["sampled_metrics"]
    assert after["num_accepted_tokens"] > before["num_accepted_tokens"], (before, after)

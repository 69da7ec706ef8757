# SPDX-License-Identifier: Apache-2.0
"""Load-aware drafting in a real engine: under forced high load (a verification cost that
drafting cannot repay) the policy turns drafting off after its warm-up, and greedy
outputs stay identical to plain vLLM; the same proposer with the policy pinned
(``adaptive: false``) keeps drafting (negative control: the policy is what stopped it).
Tiny peaked Llama with the overfit drafter, float32, 10 prompts x 64 tokens."""

from __future__ import annotations

import pytest

from tests.e2e import chain_helpers as h
from tests.e2e import forced_load

pytestmark = [pytest.mark.e2e]


def _run(assets, adaptive: bool | None):
    kwargs = {}
    if adaptive is not None:
        kwargs = dict(
            speculative_config={"method": "custom_class", "model": forced_load.CLASS_PATH,
                                "num_speculative_tokens": h.BEAM_LENGTH - 1},
            additional_config={"redrafter": {
                "model": str(assets["overfit_dir"]), "beam_width": h.BEAM_WIDTH,
                "beam_length": h.BEAM_LENGTH, "adaptive": adaptive}})
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       **kwargs) as llm:
        ids = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        return ids, (h.spec_metrics(llm) if adaptive is not None else None)


@pytest.fixture(scope="module")
def runs(assets):
    return {"plain": _run(assets, None), "adaptive": _run(assets, True),
            "pinned": _run(assets, False)}


def test_forced_load_turns_drafting_off_and_outputs_stay_identical(runs):
    plain, _ = runs["plain"]
    ids, metrics = runs["adaptive"]
    assert ids == plain
    _, pinned = runs["pinned"]
    # warm-up drafts until acceptance is measured, then (almost) never again
    print(f"adaptive: {metrics['num_drafts']} drafted steps, pinned: "  # noqa: T201
          f"{pinned['num_drafts']}")
    assert 0 < metrics["num_drafts"] < 0.5 * pinned["num_drafts"], (metrics, pinned)


def test_pinned_policy_keeps_drafting(runs):
    plain, _ = runs["plain"]
    ids, metrics = runs["pinned"]
    assert ids == plain
    decoded = sum(map(len, ids)) - len(ids)  # the first token of each comes from prefill
    # a draft on every decode step; a step emits at most L tokens
    assert metrics["num_drafts"] >= decoded / h.BEAM_LENGTH
    assert metrics["mean_acceptance_length"] > 1.5

# SPDX-License-Identifier: Apache-2.0
"""ReDrafter vs plain vLLM on the demo target (SmolLM2-135M-Instruct, fp32).

10 MT-Bench first turns in the target's chat template, 64 greedy tokens each. Chain mode
with a random drafter (acceptance near zero: the rejection path runs every step), and
tree mode (W=4, L=5) with the **shipped demo drafter** (real acceptance, off-beam-0
paths, KV fix-ups). Three engines, one after the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e import chain_helpers as h

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEMO_HIDDEN, DEMO_VOCAB = 576, 49152
SHIPPED_DRAFTER = Path(__file__).resolve().parents[2] / "examples/drafters/smollm2-135m-instruct"
GROUNDED = Path(__file__).resolve().parents[2] / "examples/prompts/grounded.jsonl"
GROUNDED_PROMPTS = 2
TREE_TAU_FLOOR = 1.5
"""Mean acceptance length floor of the shipped drafter in tree mode on these prompts."""
LOOKUP_TAU_GAIN = 0.15
"""Least tau that look-up branches add to the shipped drafter's tree on these prompts."""


def _chat(demo_target_dir, turns):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_target_dir))
    prompts = []
    for turn in turns:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": turn}],
                                            add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


@pytest.fixture(scope="module")
def chat_prompts(demo_target_dir):
    return _chat(demo_target_dir, h.mt_bench_turns(h.NUM_PROMPTS))


@pytest.fixture(scope="module")
def grounded_prompts(demo_target_dir):
    """Two of the bench's input-grounded prompts (summarise / extract a given text)."""
    lines = GROUNDED.read_text().splitlines()[:GROUNDED_PROMPTS]
    return _chat(demo_target_dir, [json.loads(line)["prompt"] for line in lines])


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    return h.save_random_drafter(tmp_path_factory.mktemp("demo-drafter"), DEMO_HIDDEN,
                                 DEMO_VOCAB, seed=1)


SHORT_ANSWERS = ["What is the capital of France? Answer in one word.",
                 "Name three primary colours.", "What is 7 times 8?",
                 "Say hello in Spanish."]
"""Short questions: the demo target ends its answer to the first with its EOS
(``<|im_end|>``) after a few tokens, the tokenizer's EOS path (not a stop token id)."""
STOPS = [["."], [" the", "\n"], ["ing"], [","]]
"""Stop strings per MT-Bench prompt (the first four): text cut inside accepted spans."""


def _edge_outputs(llm, prompts, short_prompts):
    """EOS and stop strings: ``(token ids, text, finish_reason, stop_reason)``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests = [(p, SamplingParams(temperature=0.0, max_tokens=48)) for p in short_prompts]
    requests += [(p, SamplingParams(temperature=0.0, max_tokens=h.NEW_TOKENS, stop=stop))
                 for p, stop in zip(prompts, STOPS)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests],
                        [params for _, params in requests], use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason,
             o.outputs[0].stop_reason) for o in outs]


def _greedy(demo_target_dir, prompts, spec=None, edges=None):
    with h.vllm_engine(model=str(demo_target_dir), max_model_len=1024,
                       speculative_config=spec) as llm:
        ids = h.generate_ids(llm, prompts, h.NEW_TOKENS, temperature=0.0)
        metrics = h.spec_metrics(llm)
        if edges is not None:
            return ids, metrics, _edge_outputs(llm, *edges)
        return ids, metrics


@pytest.fixture(scope="module")
def short_prompts(demo_target_dir):
    return _chat(demo_target_dir, SHORT_ANSWERS)


@pytest.fixture(scope="module")
def plain_run(demo_target_dir, chat_prompts, grounded_prompts, short_prompts):
    """Plain vLLM on the MT-Bench prompts, then the grounded ones (one engine), then the
    EOS and stop-string requests."""
    return _greedy(demo_target_dir, chat_prompts + grounded_prompts,
                   edges=(chat_prompts, short_prompts))


@pytest.fixture(scope="module")
def plain(plain_run):
    return plain_run[0]


@pytest.fixture(scope="module")
def baseline(plain, chat_prompts):
    return plain[: len(chat_prompts)]


@pytest.fixture(scope="module")
def grounded_baseline(plain, chat_prompts):
    return plain[len(chat_prompts):]


def test_demo_target_greedy_parity(demo_target_dir, chat_prompts, drafter_dir, baseline):
    spec = {"method": "redrafter", "model": str(drafter_dir), "adaptive": False,
            "beam_width": h.BEAM_WIDTH,
            "beam_length": h.BEAM_LENGTH}
    redrafter, metrics = _greedy(demo_target_dir, chat_prompts, spec)
    assert len(baseline) == h.NUM_PROMPTS
    assert all(len(ids) == h.NEW_TOKENS for ids in baseline)
    assert redrafter == baseline
    assert metrics["num_drafts"] > 0
    assert metrics["num_draft_tokens"] == metrics["num_drafts"] * (h.BEAM_LENGTH - 1)


def _low_bit_state(worker) -> tuple[list[int], int]:
    """The proposer's low-bit weights on one worker: (their widths, products computed)."""
    from vllm_redrafter.quant import LowBitRows, low_bit_calls

    core = worker.model_runner.drafter.drafter
    return sorted({m.bits for m in core.modules() if isinstance(m, LowBitRows)}), \
        low_bit_calls(core)


INT4_PROMPTS = 4


def test_demo_target_chain_drafts_in_int4_with_parity(demo_target_dir, chat_prompts,
                                                      baseline):
    """``draft_int8`` on with the default ``draft_bits`` (4): every weight of the shipped
    drafter is held in int4 (all its shapes fit), drafting steps of one or two requests
    use them (two sequences at a time: at most 2 rows per product), and the output
    stays identical to plain vLLM."""
    spec = {"method": "redrafter", "model": str(SHIPPED_DRAFTER), "adaptive": False,
            "draft_int8": True}
    old = h.set_env({"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
    try:
        with h.vllm_engine(model=str(demo_target_dir), max_model_len=1024, max_num_seqs=2,
                           speculative_config=spec) as llm:
            ids = h.generate_ids(llm, chat_prompts[:INT4_PROMPTS], h.NEW_TOKENS,
                                 temperature=0.0)
            metrics = h.spec_metrics(llm)
            bits, calls = llm.collective_rpc(_low_bit_state)[0]
    finally:
        h.set_env(old)
    assert ids == baseline[:INT4_PROMPTS]
    assert bits == [4] and calls > 0
    assert metrics["num_accepted_tokens"] > 0, metrics


@pytest.fixture(scope="module")
def tree_run(demo_target_dir, chat_prompts, short_prompts):
    spec = {"method": "redrafter", "model": str(SHIPPED_DRAFTER), "adaptive": False,
            "beam_width": 4,
            "beam_length": 5, "tree": True}
    return _greedy(demo_target_dir, chat_prompts, spec, edges=(chat_prompts, short_prompts))


def test_eos_and_stop_strings_inside_accepted_drafts(plain_run, tree_run):
    """The tokenizer's EOS and stop strings ending a request inside a tree's accepted
    path: token ids, text, finish and stop reasons identical to plain vLLM; the
    reference shows each edge was reached (EOS before max_tokens, each stop string
    hit)."""
    reference, got = plain_run[2], tree_run[2]
    assert got == reference
    eos = reference[: len(SHORT_ANSWERS)]
    # the target ends "Paris." with EOS within 48 tokens; the others run on (compared all
    # the same)
    assert sum(r[2] == "stop" and r[3] is None and len(r[0]) < 48 for r in eos) >= 1, eos
    stops = reference[len(SHORT_ANSWERS):]
    assert all(r[2] == "stop" and r[3] in stop for r, stop in zip(stops, STOPS)), stops


def test_demo_target_tree_parity_with_the_shipped_drafter(tree_run, baseline):
    redrafter, metrics = tree_run[:2]
    assert redrafter == baseline
    assert metrics["num_drafts"] > 0
    # Trees, deduplicated: more than one beam's drafts, fewer than 4 disjoint beams'.
    mean_tree = metrics["num_draft_tokens"] / metrics["num_drafts"]
    assert 4 < mean_tree <= 16, metrics
    assert metrics["mean_acceptance_length"] >= TREE_TAU_FLOOR, metrics


def test_demo_target_tree_with_lookup_keeps_parity_and_accepts_more(
        demo_target_dir, chat_prompts, grounded_prompts, baseline, grounded_baseline,
        tree_run):
    """Look-up branches (defaults, plus trusted continuations after 3-token matches up
    to 12 tokens deep) in the shipped drafter's trees: identical output, a higher tau
    than the drafter-only tree at the same node budget (measured here with the defaults
    alone: 1.67 -> 1.94; offline over the whole responses of all 80 MT-Bench first
    turns: +0.87), and on the grounded prompts (run one at a time, so that trusted steps
    skip the beams and verify a single deep path on vLLM's chain path) tokens accepted
    past the tree's depth 4, which only a trusted continuation reaches."""
    spec = {"method": "redrafter", "model": str(SHIPPED_DRAFTER), "adaptive": False,
            "beam_width": 4, "beam_length": 5, "tree": True,
            "lookup": {"skip_beams_match": 3, "trusted_depth": 12}}
    with h.vllm_engine(model=str(demo_target_dir), max_model_len=1024,
                       speculative_config=spec) as llm:
        redrafter = h.generate_ids(llm, chat_prompts, h.NEW_TOKENS, temperature=0.0)
        metrics = h.spec_metrics(llm)
        grounded = [h.generate_ids(llm, [p], h.NEW_TOKENS, temperature=0.0)[0]
                    for p in grounded_prompts]
        after = h.spec_metrics(llm)
    assert redrafter == baseline
    assert grounded == grounded_baseline
    assert metrics["num_draft_tokens"] <= 16 * metrics["num_drafts"], metrics
    tree_tau = tree_run[1]["mean_acceptance_length"]  # metrics of the MT-Bench prompts
    assert metrics["mean_acceptance_length"] >= tree_tau + LOOKUP_TAU_GAIN, (metrics, tree_tau)
    deeper = [b - a for a, b in zip(metrics["accepted_per_pos"],
                                    after["accepted_per_pos"])]
    assert sum(deeper[4:]) > 0, after  # grounded: accepted at depth 5 and below

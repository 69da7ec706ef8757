# SPDX-License-Identifier: Apache-2.0
"""Correct at the edges: greedy output identical to plain vLLM (tiny Llama, float32)
when a request ends or is cut *inside* a multi-token accepted span.

Every case runs on plain vLLM (the reference) and on two ReDrafter engines with the
overfit drafter (most drafts accepted, so most stops fall inside an accepted span):

- ``chain``: chain mode, prefix caching on, a token budget of 32 per step (prompts of 88
  tokens are prefilled in chunks; drafts compete with prefills for the budget);
- ``tree``: tree mode, prefix caching off.

``max_model_len`` is 112 = 48 prompt + 64 generated tokens for all three engines.

Cases: stop token ids, ``max_tokens`` from 1 to 13, prompts ending 1..4 tokens before
``max_model_len`` (drafts must not run past it), ``n = 2``, the same prompts twice (prefix
cache hits), long chunked prompts, and requests aborted mid-generation beside requests that
run on. Stop strings and the tokenizer's EOS need a tokenizer: the demo-target module has
them (``test_chain_demo_target.py``).

All three engines run with vLLM's engine-core and worker processes (the topology users
get, where aborts arrive over IPC).
"""

from __future__ import annotations

import pytest

from tests.e2e import chain_helpers as h

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_MODEL_LEN = h.PROMPT_TOKENS + h.NEW_TOKENS
ENGINES = {
    "plain": {},
    "chain": {"enable_prefix_caching": True, "max_num_batched_tokens": 32},
    "tree": {"enable_prefix_caching": False},
}
ABORTED = (1, 4, 7)
"""Prompts whose requests are aborted after a few engine steps."""


def _spec(assets, name):
    if name == "plain":
        return None
    return {"method": "redrafter", "model": str(assets["overfit_dir"]), "adaptive": False,
            "beam_width": h.BEAM_WIDTH, "beam_length": h.BEAM_LENGTH, "tree": name == "tree"}


def _generate(llm, prompts, params):
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [[(list(c.token_ids), c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in outs]


def _cases(assets, greedy):
    """``{case: (prompts, [SamplingParams])}``, built from the reference continuations
    ``greedy`` (so stop tokens and near-limit prompts sit where drafts are accepted)."""
    from vllm import SamplingParams

    prompts = assets["prompts"]
    cases = {}
    cases["stop_token_ids"] = (prompts, [
        SamplingParams(temperature=0.0, max_tokens=h.NEW_TOKENS, stop_token_ids=[g[5 + i]])
        for i, g in enumerate(greedy)])
    cases["max_tokens"] = (prompts, [
        SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
        for m in (1, 2, 3, 4, 5, 6, 7, 9, 11, 13)])
    near = [p + g[: h.NEW_TOKENS - 1 - i % 4] for i, (p, g) in enumerate(zip(prompts, greedy))]
    cases["near_max_model_len"] = (near, [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)] * len(near))
    # vLLM refuses n > 1 with greedy sampling: top_k=1 at T=0.8 is argmax through the
    # random-sampling path (rejection sampler included), so it must equal greedy
    cases["n2"] = (prompts[:4], [
        SamplingParams(temperature=0.8, top_k=1, max_tokens=16, n=2, seed=i, ignore_eos=True)
        for i in range(4)])
    repeat = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    cases["prefix_cache_first"] = (prompts, [repeat] * len(prompts))
    cases["prefix_cache_again"] = (prompts, [repeat] * len(prompts))
    long = [p + g[:40] for p, g in zip(prompts, greedy)]
    cases["long_chunked"] = (long, [repeat] * len(long))
    return cases


def _run_with_aborts(llm, prompts):
    """All prompts as requests on the engine directly; after 3 steps the requests of
    :data:`ABORTED` are aborted; the others run to the end. Returns the finished outputs
    by prompt index and whether the engine is idle afterwards."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"edge-{i}", TokensPrompt(prompt_token_ids=prompt), params)
    finished: dict[int, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[int(out.request_id.split("-")[1])] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 3:
            engine.abort_request([f"edge-{i}" for i in ABORTED])
    return finished, not engine.has_unfinished_requests()


def _engine_outputs(assets, name, greedy):
    spec = _spec(assets, name)
    with h.vllm_engine(model=str(assets["target_dir"]), skip_tokenizer_init=True,
                       max_model_len=MAX_MODEL_LEN, speculative_config=spec,
                       in_process=False, **ENGINES[name]) as llm:
        if greedy is None:
            greedy = h.generate_ids(llm, assets["prompts"], h.NEW_TOKENS, temperature=0.0)
        out = {case: _generate(llm, prompts, params)
               for case, (prompts, params) in _cases(assets, greedy).items()}
        out["aborts"] = _run_with_aborts(llm, assets["prompts"])
        metrics = h.spec_metrics(llm)
    return greedy, out, metrics


@pytest.fixture(scope="module")
def plain(assets):
    greedy, out, _ = _engine_outputs(assets, "plain", None)
    return {"greedy": greedy, "out": out}


@pytest.fixture(scope="module", params=["chain", "tree"])
def redrafter(request, assets, plain):
    _, out, metrics = _engine_outputs(assets, request.param, plain["greedy"])
    return {"name": request.param, "out": out, "metrics": metrics}


CASES = ["stop_token_ids", "max_tokens", "near_max_model_len", "n2", "prefix_cache_first",
         "prefix_cache_again", "long_chunked"]


@pytest.mark.parametrize("case", CASES)
def test_identical_to_plain_vllm(plain, redrafter, case):
    assert redrafter["out"][case] == plain["out"][case], (redrafter["name"], case)


def test_the_cases_reach_their_edges(plain, redrafter):
    """The reference outputs show each edge was reached (a case that never stopped on
    its stop token or never reached max_model_len would test nothing); the ReDrafter
    engines accepted drafts."""
    out = plain["out"]
    assert all(c[0][1] == "stop" and c[0][0][-1] == c[0][2] for c in out["stop_token_ids"])
    assert [len(c[0][0]) for c in out["max_tokens"]] == [1, 2, 3, 4, 5, 6, 7, 9, 11, 13]
    near = out["near_max_model_len"]
    assert all(c[0][1] == "length" and len(c[0][0]) == 1 + i % 4 for i, c in enumerate(near))
    assert all(len(o) == 2 and o[0][0] == o[1][0] == plain["greedy"][i][:16]
               for i, o in enumerate(out["n2"]))
    assert out["prefix_cache_again"] == out["prefix_cache_first"]
    metrics = redrafter["metrics"]
    assert metrics["mean_acceptance_length"] >= 2.0, metrics


def test_aborted_requests_leave_the_others_identical(plain, redrafter):
    finished, idle = redrafter["out"]["aborts"]
    reference, _ = plain["out"]["aborts"]
    assert idle
    assert set(finished) == set(range(h.NUM_PROMPTS)) - set(ABORTED)
    assert finished == reference
    assert all(ids == plain["greedy"][i][:32] for i, ids in finished.items())

# SPDX-License-Identifier: Apache-2.0
"""`vllm serve` with ReDrafter: both CLI forms, chat completions, structured output.

One server per form (module-scoped, one after the other), serving the demo target
(SmolLM2-135M-Instruct, fp32):

* ``vllm serve <target> --speculative-model redrafter:<dir>`` (the design card's shorthand),
  with a random drafter (nothing accepted: the rejection path runs every step);
* ``vllm serve <target> --speculative-config '{"method": "redrafter", ...}'`` with the
  shipped demo drafter (real acceptance, also inside a grammar).

Each serves non-streaming and streaming chat completions and a JSON-schema request whose
texts must equal plain vLLM's (an in-process engine run once before the servers), fills
vLLM's spec-decode Prometheus counters and prints its "SpecDecoding metrics" log line.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e import chain_helpers as h
from vllm_redrafter.server import LocalServer, ServerError, post_json

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEMO_HIDDEN, DEMO_VOCAB = 576, 49152
SHIPPED_DRAFTER = Path(__file__).resolve().parents[2] / "examples/drafters/smollm2-135m-instruct"
MODEL_NAME = "demo"
JSON_QUESTION = "Name one large city and the country it is in. Answer in JSON."
STRUCTURED = {"backend": "xgrammar", "disable_any_whitespace": True}
STARTUP_TIMEOUT_S = 600
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}


def _stream(url: str, payload: dict, timeout: float = 300) -> list[dict]:
    body = json.dumps({**payload, "stream": True}).encode()
    request = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return chunks


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    return h.save_random_drafter(tmp_path_factory.mktemp("serve-drafter"), DEMO_HIDDEN,
                                 DEMO_VOCAB, seed=2)


@pytest.fixture(scope="module")
def plain_reference(demo_target_dir):
    """Plain vLLM's greedy texts for the chat and JSON-schema requests (no speculation),
    computed before any server starts."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    with h.vllm_engine(model=str(demo_target_dir), max_model_len=1024,
                       structured_outputs_config=STRUCTURED) as llm:
        chat = llm.chat([{"role": "user", "content": h.mt_bench_turns(1)[0]}],
                        SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
        schema = llm.chat([{"role": "user", "content": JSON_QUESTION}],
                          SamplingParams(max_tokens=64, temperature=0.0,
                                         structured_outputs=StructuredOutputsParams(
                                             json=SCHEMA)), use_tqdm=False)
    return {"chat": chat[0].outputs[0].text, "json": schema[0].outputs[0].text}


@pytest.fixture(scope="module", params=["speculative-model", "speculative-config"])
def server(request, demo_target_dir, drafter_dir, plain_reference, tmp_path_factory):
    if request.param == "speculative-model":
        spec_args = ["--speculative-model", f"redrafter:{drafter_dir}",
                     "--speculative-config", json.dumps({"adaptive": False})]
    else:
        spec_args = ["--speculative-config", json.dumps({
            "method": "redrafter", "model": str(SHIPPED_DRAFTER), "adaptive": False,
            "beam_width": 4, "beam_length": 5})]
    args = [*spec_args, "--served-model-name", MODEL_NAME, "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "4",
            "--structured-outputs-config", json.dumps(STRUCTURED)]
    log_path = tmp_path_factory.mktemp("serve-log") / f"{request.param}.log"
    env = {"VLLM_LOG_STATS_INTERVAL": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    try:
        server = LocalServer(str(demo_target_dir), args, log_path, env=env,
                             startup_timeout=STARTUP_TIMEOUT_S).__enter__()
    except ServerError as exc:
        pytest.fail(str(exc))
    base = server.base
    try:
        yield {"base": base, "log": log_path, "form": request.param,
               "reference": plain_reference}
    finally:
        server.stop()


def _chat(content: str, **extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}],
            "max_tokens": 24, "temperature": 0.0, **extra}


def test_chat_completion_non_streaming_and_streaming(server):
    url = f"{server['base']}/v1/chat/completions"
    payload = _chat(h.mt_bench_turns(1)[0])
    reply = post_json(url, payload)
    text = reply["choices"][0]["message"]["content"]
    assert text and reply["usage"]["completion_tokens"] == 24
    assert text == server["reference"]["chat"]  # greedy, fp32: plain vLLM's text
    chunks = _stream(url, payload)
    streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c.get("choices"))
    assert len(chunks) > 2
    assert streamed == text  # greedy: same tokens streamed or not


def _counter(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(values)


def test_structured_output_json_schema(server):
    url = f"{server['base']}/v1/chat/completions"
    payload = _chat(JSON_QUESTION, max_tokens=64,
                    response_format={"type": "json_schema", "json_schema": {
                        "name": "city", "schema": SCHEMA}})
    accepted = "vllm:spec_decode_num_accepted_tokens_total"
    before = _counter(server["base"], accepted)
    reply = post_json(url, payload)
    text = reply["choices"][0]["message"]["content"]
    data = json.loads(text)
    assert set(data) == {"city", "country"}
    assert all(isinstance(v, str) for v in data.values())
    assert text == server["reference"]["json"]  # the grammar and the drafts agree
    if server["form"] == "speculative-config":  # the shipped drafter: drafts accepted
        assert _counter(server["base"], accepted) > before


def test_spec_decode_metrics_and_log_line(server):
    """This test's own request moves the counters; the log line is waited for (the stats
    logger prints every VLLM_LOG_STATS_INTERVAL = 1 s), not slept for."""
    drafts_name = "vllm:spec_decode_num_drafts_total"
    before = _counter(server["base"], drafts_name)
    post_json(f"{server['base']}/v1/chat/completions", _chat("Say hello.", max_tokens=8))
    assert _counter(server["base"], drafts_name) > before
    with urllib.request.urlopen(f"{server['base']}/metrics", timeout=30) as response:
        assert "vllm:spec_decode_num_accepted_tokens_per_pos" in response.read().decode()
    deadline = time.monotonic() + 30
    log = ""
    while time.monotonic() < deadline:
        log = server["log"].read_text()
        if "SpecDecoding metrics: Mean acceptance length" in log:
            break
        time.sleep(0.5)
    assert "SpecDecoding metrics: Mean acceptance length" in log
    assert "ReDrafter speculative decoding: drafter" in log

# SPDX-License-Identifier: Apache-2.0
"""`vllm serve` with ReDrafter: both CLI forms, chat completions, structured output.

One server per form (module-scoped, one after the other), serving the demo target
(SmolLM2-135M-Instruct, fp32) with a random drafter:

* ``vllm serve <target> --speculative-model redrafter:<dir>`` (the design card's shorthand);
* ``vllm serve <target> --speculative-config '{"method": "redrafter", ...}'``.

Each serves non-streaming and streaming chat completions and a JSON-schema request, fills
vLLM's spec-decode Prometheus counters and prints its "SpecDecoding metrics" log line.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.e2e import chain_helpers as h
from vllm_redrafter.server import LocalServer, ServerError, post_json

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEMO_HIDDEN, DEMO_VOCAB = 576, 49152
MODEL_NAME = "demo"
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


@pytest.fixture(scope="module", params=["speculative-model", "speculative-config"])
def server(request, demo_target_dir, drafter_dir, tmp_path_factory):
    if request.param == "speculative-model":
        spec_args = ["--speculative-model", f"redrafter:{drafter_dir}"]
    else:
        spec_args = ["--speculative-config", json.dumps({
            "method": "redrafter", "model": str(drafter_dir),
            "beam_width": h.BEAM_WIDTH, "beam_length": h.BEAM_LENGTH})]
    args = [*spec_args, "--served-model-name", MODEL_NAME, "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "4",
            "--structured-outputs-config",
            '{"backend": "xgrammar", "disable_any_whitespace": true}']
    log_path = tmp_path_factory.mktemp("serve-log") / f"{request.param}.log"
    env = {"VLLM_LOG_STATS_INTERVAL": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    try:
        server = LocalServer(str(demo_target_dir), args, log_path, env=env,
                             startup_timeout=STARTUP_TIMEOUT_S).__enter__()
    except ServerError as exc:
        pytest.fail(str(exc))
    base = server.base
    try:
        yield {"base": base, "log": log_path, "form": request.param}
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
    chunks = _stream(url, payload)
    streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c.get("choices"))
    assert len(chunks) > 2
    assert streamed == text  # greedy: same tokens streamed or not


def test_structured_output_json_schema(server):
    url = f"{server['base']}/v1/chat/completions"
    payload = _chat("Name one large city and the country it is in. Answer in JSON.",
                    max_tokens=64,
                    response_format={"type": "json_schema", "json_schema": {
                        "name": "city", "schema": SCHEMA}})
    reply = post_json(url, payload)
    data = json.loads(reply["choices"][0]["message"]["content"])
    assert set(data) == {"city", "country"}
    assert all(isinstance(v, str) for v in data.values())


def test_spec_decode_metrics_and_log_line(server):
    with urllib.request.urlopen(f"{server['base']}/metrics", timeout=30) as response:
        text = response.read().decode()
    drafts = [line for line in text.splitlines()
              if line.startswith("vllm:spec_decode_num_drafts_total")]
    assert drafts and float(drafts[0].rsplit(" ", 1)[1]) > 0, drafts
    assert "vllm:spec_decode_num_accepted_tokens_per_pos" in text
    time.sleep(3)  # the stats logger prints every VLLM_LOG_STATS_INTERVAL=1 s
    log = server["log"].read_text()
    assert "SpecDecoding metrics: Mean acceptance length" in log
    assert "ReDrafter speculative decoding: drafter" in log

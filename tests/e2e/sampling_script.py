# SPDX-License-Identifier: Apache-2.0
"""Subprocess helper: a fresh interpreter (so ``VLLM_REDRAFTER_SKIP_PATCHES`` in its
environment reaches every vLLM process it starts) runs :func:`chain_helpers.sample_mixed`
on one engine and prints ``RESULT {"samples": [...], "greedy": [...], "metrics": {...}}``.

Usage: ``python -m tests.e2e.sampling_script '<json>'`` with keys ``engine`` (``LLM``
keyword arguments), ``prompt``, ``seeds``, ``greedy_prompts``, ``max_tokens``,
``sampling``.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

if __name__ == "__main__":
    from tests.e2e import chain_helpers as h

    request = json.loads(sys.argv[1])
    with h.vllm_engine(**request["engine"]) as llm:
        samples, greedy = h.sample_mixed(llm, request["prompt"], request["seeds"],
                                         request["greedy_prompts"], request["max_tokens"],
                                         **request["sampling"])
        metrics = h.spec_metrics(llm)
    print("RESULT " + json.dumps({"samples": samples, "greedy": greedy,
                                 "metrics": metrics}), flush=True)

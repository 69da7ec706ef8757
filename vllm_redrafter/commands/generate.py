# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter generate``: the target's own responses to a prompts file, as token ids.

Writes ``OUT/generations.jsonl`` (one ``{"id", "prompt_len", "token_ids", "finished"}`` per
line); rerunning the same command skips prompts already done. Prints the file path last.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="target model directory (HF format)")
    parser.add_argument("--prompts", required=True,
                        help="JSONL prompts: {prompt}, {turns}, {conversations} or {messages}")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-tokens", type=int, default=256, help="response length cap")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (the paper's distillation targets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use at most N prompts")
    parser.add_argument("--offset", type=int, default=0, help="skip the first N prompts")
    parser.add_argument("--shuffle-seed", type=int, default=None,
                        help="take --offset/--limit from a fixed random order of the file")
    parser.add_argument("--chunk-size", type=int, default=512,
                        help="prompts per resumable chunk (written when complete)")
    parser.add_argument("--max-num-seqs", type=int, default=128,
                        help="vLLM concurrent sequences")
    parser.add_argument("--max-prompt-tokens", type=int, default=768,
                        help="skip prompts longer than this (after the chat template)")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto, bfloat16, float32)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="vLLM token budget per step (longer prefills are chunked)")
    parser.add_argument("--second-turn-of", default=None, metavar="DIR",
                        help="second turns: continue each prompt's first answer "
                             "in DIR (a generate output for the same prompts) with a "
                             "follow-up (the record's second turn, else a built-in one)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from vllm_redrafter.training.generate import generate_responses

    path = generate_responses(
        args.target, args.prompts, args.out, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed, limit=args.limit, offset=args.offset,
        shuffle_seed=args.shuffle_seed, chunk_size=args.chunk_size,
        max_num_seqs=args.max_num_seqs, max_prompt_tokens=args.max_prompt_tokens,
        dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
        second_turn_of=args.second_turn_of,
        progress=not args.no_progress)
    print(path)
    return 0

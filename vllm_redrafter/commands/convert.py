# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter convert SRC DST``: Apple / TRT-LLM drafter dir → our format."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="drafter directory (Apple `recurrent_drafting_drafter` "
                                    "format, TRT-LLM key spellings, or ours)")
    parser.add_argument("dst", help="output directory (config.json + model.safetensors)")
    parser.add_argument("--verifier", default=None,
                        help="name or path of the target model, recorded in config.json")


def run(args: argparse.Namespace) -> int:
    from vllm_redrafter.checkpoint import convert_checkpoint

    try:
        convert_checkpoint(args.src, args.dst, verifier=args.verifier)
    except (OSError, ValueError) as exc:
        print(f"vllm-redrafter convert: error: {exc}", file=sys.stderr)
        return 2
    print(args.dst)
    return 0

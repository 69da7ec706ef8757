# SPDX-License-Identifier: Apache-2.0
"""``vllm-redrafter demo-target [--out DIR] [--force]``: prints the checkpoint dir last."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None,
                        help="output directory (default: ~/.cache/vllm-redrafter/"
                             "smollm2-135m-instruct, or $VLLM_REDRAFTER_CACHE)")
    parser.add_argument("--force", action="store_true",
                        help="convert again even if a valid conversion exists")


def run(args: argparse.Namespace) -> int:
    from vllm_redrafter.demo_target import DemoTargetError, prepare_demo_target

    try:
        out = prepare_demo_target(args.out, force=args.force)
    except DemoTargetError as exc:
        print(f"vllm-redrafter demo-target: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0

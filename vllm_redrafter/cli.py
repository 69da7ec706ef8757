# SPDX-License-Identifier: Apache-2.0
"""The ``vllm-redrafter`` console script.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports (torch, vLLM) happen inside ``run`` so ``--help`` is fast.
Results go to stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# (subcommand, module, one-line help)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("demo-target", "vllm_redrafter.commands.demo_target",
     "convert the bundled SmolLM2-135M-Instruct GGUF into an HF checkpoint; prints its dir"),
    ("convert", "vllm_redrafter.commands.convert",
     "convert an Apple / TensorRT-LLM ReDrafter checkpoint into this project's format"),
    ("generate", "vllm_redrafter.commands.generate",
     "distillation data: the target's own responses to a prompts file (token ids)"),
    ("train", "vllm_redrafter.commands.train",
     "train a drafter by knowledge distillation from the target"),
    ("bench", "vllm_redrafter.commands.bench",
     "side-by-side speed benchmark: no speculation, n-gram, ReDrafter"),
    ("evaluate", "vllm_redrafter.commands.evaluate",
     "offline tau (chain and tree) of a drafter on the target's own greedy responses"),
    ("verify-cost", "vllm_redrafter.commands.verify_cost",
     "seconds per verification step by verified tokens, tree vs chain (demo target)"),
    ("load-test", "vllm_redrafter.commands.load_test",
     "the same bounded load against vllm serve without and with ReDrafter (streams "
     "checked against a plain reference, disconnects, aborts)"),
    ("demo", "vllm_redrafter.commands.demo",
     "serve the demo target with the demo drafter, chat once, and show the speedup"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-redrafter",
        description="ReDrafter speculative decoding for vLLM: tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in SUBCOMMANDS:
        if importlib.util.find_spec(module) is None:  # subcommand not built yet
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _configure_logging() -> None:
    """Send our ``vllm.redrafter.*`` INFO lines to stderr when vLLM is not configuring logs."""
    log = logging.getLogger("vllm.redrafter")
    if not log.handlers and not logging.getLogger("vllm").handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

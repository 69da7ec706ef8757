# SPDX-License-Identifier: Apache-2.0
"""Render ``docs/patches.md`` from the patch ledger.

Usage: ``python -m vllm_redrafter.integration.ledger_doc [output path]`` (default:
``docs/patches.md`` next to the package). ``tests/integration/test_patches.py`` fails when
the file is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vllm_redrafter.integration.patches import ledger_markdown

HEADER = """# Patch ledger

Every change vllm-redrafter makes to vLLM's own objects, generated from
`vllm_redrafter.integration.patches.LEDGER` (do not edit the table by hand; run
`python -m vllm_redrafter.integration.ledger_doc`).

Each patch checks the vLLM version (`>=0.32.0,<0.33.0`) and the exact parameter list of
the function it wraps before touching it, raises `PatchError` on any mismatch, and is
idempotent (a wrapper is marked and never wrapped twice). *Applied*: `plugin` = by the
`vllm.general_plugins` entry point in every vLLM process; `proposer` = lazily, when
`ReDrafterProposer` is built inside a model runner (so API-server processes never import
the runner module); `refused` = only when the plugin refuses the installed vLLM version.
*Skippable* patches (fixes of vLLM bugs, never the hooks ReDrafter runs on) can be left out
for diagnosis with `VLLM_REDRAFTER_SKIP_PATCHES=name[,name]` (logged as a warning in every
process); the tests use it as the negative control of each fix.

"""


def render() -> str:
    """The full Markdown document."""
    return HEADER + ledger_markdown() + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    default = Path(__file__).resolve().parents[2] / "docs" / "patches.md"
    out = Path(args[0]) if args else default
    out.write_text(render())


if __name__ == "__main__":
    main()

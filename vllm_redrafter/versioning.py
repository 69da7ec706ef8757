# SPDX-License-Identifier: Apache-2.0
"""vLLM version logic and the patch error, below both ``plugin`` and ``integration``.

``plugin.py`` (the entry point) and ``integration/`` (the patches) both need to know which
vLLM versions are supported and both raise or catch :class:`PatchError`; keeping these in
one vLLM-free module under both removes the import circle between them.
"""

from __future__ import annotations

import re

from vllm_redrafter import SUPPORTED_VLLM_RANGE


class PatchError(RuntimeError):
    """A patch target no longer looks like what the patch was written for."""


def version_tuple(version: str) -> tuple[int, ...]:
    """Release segment of a version string.

    Examples: ``"0.32.0+cpu"`` -> ``(0, 32, 0)``; ``"0.32.1rc1"`` -> ``(0, 32, 1)``.
    """
    parts: list[int] = []
    for piece in version.split("+", 1)[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):  # pre/post/dev suffix ends the release segment
            break
    return tuple(parts)


def vllm_version_supported(version: str) -> bool:
    """True if ``version`` lies in :data:`SUPPORTED_VLLM_RANGE` (lower inclusive)."""
    low, high = (version_tuple(v) for v in SUPPORTED_VLLM_RANGE)
    return low <= version_tuple(version) < high

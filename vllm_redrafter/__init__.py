# SPDX-License-Identifier: Apache-2.0
"""ReDrafter (Recurrent Drafter) speculative decoding for vLLM.

The package root and its pure modules (config, drafter, beam search, tree, acceptance,
checkpoint, training maths) never import vLLM; the vLLM glue lives in
``vllm_redrafter.integration``, ``vllm_redrafter.proposers`` and ``vllm_redrafter.scorers``.
"""

__version__ = "0.1.0"

SUPPORTED_VLLM_RANGE = ("0.32.0", "0.33.0")
"""Supported vLLM versions: ``lower <= version < upper`` (the 0.32.x series)."""

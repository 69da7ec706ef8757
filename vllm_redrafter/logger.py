# SPDX-License-Identifier: Apache-2.0
"""Loggers under the ``vllm.`` namespace, so vLLM's logging config applies to them.

A logger named ``vllm_redrafter.x`` would not be a child of ``vllm`` and its INFO lines would
vanish under vLLM's default configuration; ``vllm.redrafter.x`` inherits vLLM's handlers and
respects ``VLLM_LOGGING_LEVEL``. This module does not import vLLM.
"""

import logging


def get_logger(name: str) -> logging.Logger:
    """Return the logger ``vllm.redrafter.<last part of name>``.

    Example: ``get_logger("vllm_redrafter.plugin").name == "vllm.redrafter.plugin"``.
    """
    short = name.rsplit(".", 1)[-1]
    return logging.getLogger(f"vllm.redrafter.{short}")

# SPDX-License-Identifier: Apache-2.0
"""Subcommands of the ``vllm-redrafter`` console script (see :mod:`vllm_redrafter.cli`)."""

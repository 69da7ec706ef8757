# SPDX-License-Identifier: Apache-2.0
"""Verification adaptors for ReDrafter (installed as ``vllm_redrafter.scorers``)."""

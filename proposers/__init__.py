# SPDX-License-Identifier: Apache-2.0
"""vLLM proposers for ReDrafter (installed as ``vllm_redrafter.proposers``)."""

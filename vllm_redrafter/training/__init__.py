# SPDX-License-Identifier: Apache-2.0
"""Knowledge-distillation pipeline for the drafter: generate -> hidden states -> train.

Nothing here imports vLLM at module level; only :mod:`.generate` imports it, inside functions.
"""

# SPDX-License-Identifier: Apache-2.0
"""Side-by-side speed benchmark (``vllm-redrafter bench``); ``report`` is pure."""

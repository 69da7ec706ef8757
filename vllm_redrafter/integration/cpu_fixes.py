# SPDX-License-Identifier: Apache-2.0
"""Fixes of vLLM 0.32 CPU-backend bugs met by speculative decoding.

1. ``cpu-expand-kernel-fix`` (every process): speculative *sampling* is lossy, below.
2. ``cpu-seeded-discard-rewind`` (ReDrafter engines): a seeded sampled request whose
   prompt is prefilled in chunks crashes the engine (``RuntimeError: CPU Generator does
   not use offset``): after sampling, ``_bookkeeping_sync`` rewinds the generator of every
   request whose sample is discarded (a partial prefill) by Philox offset, which CPU
   generators do not have. Speculative decoding makes chunking common under load (drafts
   take scheduler token budget), e.g. the bench at concurrency 64, temperature 0.7. The
   fix keeps those generators' states before sampling, hides them from the rewind and
   restores the states after: the discarded draws are undone exactly.

The expand-kernel bug:

On CPU, vLLM replaces its Triton kernels by C++ fallbacks
(``CpuPlatform.register_triton_kernel_overrides``). The fallback of the rejection
sampler's ``expand_kernel`` (``vllm/utils/cpu_triton_utils.py:_expand_kernel_impl``)
converts its *output* tensor to int64 before the C++ call and never copies the result
back, and truncates float inputs to integers. ``expand_batch_to_tokens`` therefore
returns uninitialised memory for every float32/int32 tensor it expands: the per-draft
**temperature**, top-p and top-k that ``apply_sampling_constraints`` applies to the target
logits before acceptance. Greedy requests are unaffected (argmax), but random sampling
with any speculative method on CPU verifies drafts against a garbage-tempered target
distribution; with ReDrafter's high acceptance this shows up as a strongly biased output
distribution (``tests/e2e/test_chain_tiny_llama.py``).

The fix replaces that one fallback by a plain-torch implementation with the kernel's
semantics (``out[cu[i-1]:cu[i]] = input[i]``, with ``replace_from -> replace_to``),
before the platform registers it (vLLM loads general plugins first in
``WorkerWrapperBase.init_worker``), and re-registers it if the overrides were already
installed in this process.
"""

from __future__ import annotations

import torch

import functools
import inspect
from typing import Any

from vllm_redrafter.integration import compat
from vllm_redrafter.integration import runner as runner_state
from vllm_redrafter.integration.patches import (
    Patch,
    is_patched,
    mark_patched,
    register_patch,
    wrap_runner_method,
)

CPU_EXPAND_FIX = "cpu-expand-kernel-fix"
EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
EXPAND_PARAMETERS = (
    "output",
    "input_val",
    "cu_num_tokens",
    "replace_from",
    "replace_to",
    "MAX_NUM_TOKENS",
)
def expand_kernel_cpu(
    output: torch.Tensor,
    input_val: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from: float,
    replace_to: float,
    MAX_NUM_TOKENS: int | None = None,  # noqa: N803 - the Triton kernel's name
) -> None:
    """Expand per-request values to per-token values, in place and dtype-preserving.

    Args:
        output: ``[num_tokens]`` destination (float32, int32 or int64).
        input_val: ``[B]`` per-request values.
        cu_num_tokens: ``[B]`` inclusive cumulative token counts.
        replace_from, replace_to: values equal to ``replace_from`` become
            ``replace_to`` (e.g. greedy temperature 0 -> 1).
        MAX_NUM_TOKENS: unused (a Triton block size).

    Example: ``input_val = [0.8, 0.0]``, ``cu_num_tokens = [2, 3]``, ``0 -> 1`` gives
    ``output[:3] = [0.8, 0.8, 1.0]``.
    """
    del MAX_NUM_TOKENS
    cu = cu_num_tokens.to(torch.int64)  # [B]
    if cu.numel() == 0:
        return
    counts = torch.diff(cu, prepend=cu.new_zeros(1))  # [B]
    values = torch.where(
        input_val == replace_from,
        torch.full_like(input_val, replace_to),
        input_val,
    )  # [B]
    total = int(cu[-1])
    expanded = torch.repeat_interleave(values, counts, output_size=total)  # [total]
    output[:total].copy_(expanded.to(output.dtype))


mark_patched(expand_kernel_cpu, CPU_EXPAND_FIX)


def _apply_cpu_expand_fix() -> None:
    compat.require_vllm_version(CPU_EXPAND_FIX)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # the Triton kernel itself is correct
    from vllm.utils import cpu_triton_utils

    current = compat.require_attribute(
        CPU_EXPAND_FIX, cpu_triton_utils, "_expand_kernel_impl"
    )
    if is_patched(current, CPU_EXPAND_FIX):
        return
    compat.require_parameters(CPU_EXPAND_FIX, current, EXPAND_PARAMETERS)
    cpu_triton_utils._expand_kernel_impl = expand_kernel_cpu
    from vllm.triton_utils import dispatcher

    registered = getattr(dispatcher, "_registry", {}).get(EXPAND_KERNEL)
    if registered is not None and registered[1] is current:
        # The platform already installed the buggy fallback in this process.
        dispatcher.register_kernels({EXPAND_KERNEL: expand_kernel_cpu})


register_patch(
    Patch(
        name=CPU_EXPAND_FIX,
        target="vllm.utils.cpu_triton_utils._expand_kernel_impl",
        why="vLLM 0.32's CPU fallback of the rejection sampler's expand_kernel drops its "
        "result for float32/int32 tensors, so per-draft temperature/top-k/top-p are "
        "uninitialised memory and random-sampling speculative decoding on CPU is not "
        "lossless (any method; greedy is unaffected).",
        how="On the CPU platform only, replace the fallback by a plain-torch "
        "repeat_interleave with the Triton kernel's semantics, before the platform "
        "registers its overrides (re-registering if it already did).",
        remove_when="vLLM's CPU _expand_kernel_impl writes its result back into "
        "non-int64 outputs (upstream fix of vllm/utils/cpu_triton_utils.py).",
        apply=_apply_cpu_expand_fix,
        skippable=True,
    )
)


CPU_REWIND_FIX = "cpu-seeded-discard-rewind"
SAMPLE_TOKENS_PARAMETERS = ("self", "grammar_output")
BOOKKEEPING_PARAMETERS = ("self", "scheduler_output", "sampler_output", "logits",
                          "hidden_states", "num_scheduled_tokens")


def _apply_cpu_rewind_fix() -> None:
    compat.require_vllm_version(CPU_REWIND_FIX)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # CUDA generators have offsets

    def wrap_sample_tokens(original: Any, _: inspect.Signature) -> Any:
        @functools.wraps(original)
        def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
            runner_state.note_sampling_start(self)
            try:
                return original(self, *args, **kwargs)
            finally:
                runner_state.note_sampling_end()

        return sample_tokens

    def wrap_bookkeeping(original: Any, _: inspect.Signature) -> Any:
        @functools.wraps(original)
        def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
            with runner_state.rewound_cpu_generators(self):
                return original(self, *args, **kwargs)

        return _bookkeeping_sync

    wrap_runner_method(CPU_REWIND_FIX, "sample_tokens", SAMPLE_TOKENS_PARAMETERS,
                       wrap_sample_tokens)
    wrap_runner_method(CPU_REWIND_FIX, "_bookkeeping_sync", BOOKKEEPING_PARAMETERS,
                       wrap_bookkeeping)


register_patch(
    Patch(
        name=CPU_REWIND_FIX,
        target="vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens and "
        "._bookkeeping_sync",
        why="vLLM 0.32 rewinds the generator of a request whose sample is discarded (a "
        "partial prefill) with set_offset(get_offset() - 4); CPU generators have no "
        "offset, so a seeded sampled request prefilled in chunks kills the engine "
        "(RuntimeError: CPU Generator does not use offset). Drafts take scheduler "
        "budget, so with speculation chunking happens under ordinary load.",
        how="On the CPU platform, in runners whose drafter is ReDrafter (other engines "
        "in the process keep vLLM's behaviour): sample_tokens keeps the states of the discarded "
        "requests' CPU generators before sampling (integration/runner.py); "
        "_bookkeeping_sync runs with those generators removed from "
        "input_batch.generators, then restores their states and puts them back (the "
        "discarded draws undone exactly).",
        remove_when="vLLM's bookkeeping handles CPU generators (no set_offset on CPU).",
        apply=_apply_cpu_rewind_fix,
        stage="proposer",
        skippable=True,
    )
)

# SPDX-License-Identifier: Apache-2.0
"""The guarded vLLM hooks of ReDrafter's tree mode; each registers itself in the ledger.

==============================  ==================================================  =========
patch                           target                                               applied
==============================  ==================================================  =========
runner-tree-prepare-inputs      ``GPUModelRunner._prepare_inputs``                   proposer
runner-tree-sample              ``GPUModelRunner._sample``                           proposer
cpu-tree-attention-backend      ``AttentionBackendEnum.CPU_ATTN`` (registry)         proposer
==============================  ==================================================  =========

All three are applied only when a ReDrafter proposer with ``tree=true`` is built in a
model runner, and their wrappers do nothing unless a tree was registered for a request
of the step (:mod:`vllm_redrafter.integration.runner` holds that state).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from vllm_redrafter.integration import compat
from vllm_redrafter.integration import runner as runner_state
from vllm_redrafter.integration.patches import Patch, register_patch, wrap_runner_method
from vllm_redrafter.logger import get_logger
from vllm_redrafter.versioning import PatchError

logger = get_logger(__name__)

PREPARE_HOOK = "runner-tree-prepare-inputs"
SAMPLE_HOOK = "runner-tree-sample"
BACKEND_HOOK = "cpu-tree-attention-backend"
PREPARE_PARAMETERS = ("self", "scheduler_output", "num_scheduled_tokens")
SAMPLE_PARAMETERS = ("self", "logits", "spec_decode_metadata")


def _apply_prepare_hook() -> None:
    def wrap(original: Any, _: inspect.Signature) -> Any:
        @functools.wraps(original)
        def _prepare_inputs(self: Any, scheduler_output: Any,
                            num_scheduled_tokens: Any) -> Any:
            result = original(self, scheduler_output, num_scheduled_tokens)
            if not isinstance(result, tuple) or len(result) != 3:
                raise PatchError(f"patch {PREPARE_HOOK}: _prepare_inputs returned "
                                 f"{type(result).__name__}, expected a 3-tuple")
            runner_state.after_prepare_inputs(self, scheduler_output, result)
            return result

        return _prepare_inputs

    wrap_runner_method(PREPARE_HOOK, "_prepare_inputs", PREPARE_PARAMETERS, wrap)


def _apply_sample_hook() -> None:
    def wrap(original: Any, _: inspect.Signature) -> Any:
        @functools.wraps(original)
        def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
            return runner_state.sample_with_trees(self, original, logits,
                                                  spec_decode_metadata)

        return _sample

    wrap_runner_method(SAMPLE_HOOK, "_sample", SAMPLE_PARAMETERS, wrap)


def _apply_backend_hook() -> None:
    compat.require_vllm_version(BACKEND_HOOK)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise PatchError(
            f"patch {BACKEND_HOOK}: ReDrafter tree verification is implemented for vLLM's "
            f"CPU attention backend only (platform: {current_platform.device_name}); use "
            "tree=false (chain verification) on this platform"
        )
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_redrafter.integration.tree_attention import BACKEND_PATH

    if AttentionBackendEnum.CPU_ATTN.get_path() == BACKEND_PATH:
        return
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    cached = compat.require_attribute(BACKEND_HOOK, selector, "_cached_get_attn_backend")
    cached.cache_clear()  # a selection cached before the override must not win


register_patch(Patch(
    name=PREPARE_HOOK,
    target="vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs",
    why="A tree's nodes must use RoPE position committed_length + depth, while vLLM "
    "computes linear positions (and slots) for draft tokens; the verify step also needs "
    "to know, before the forward, which requests carry a tree.",
    how="After the original returns (slot mapping already computed from the linear "
    "positions, so each node keeps its own KV slot), requests whose scheduled drafts "
    "equal the tree registered for them by request id become this step's tree "
    "requests, and their node rows of runner.positions are rewritten to base + depth; "
    "a tree that is a single path as scheduled is left to vLLM's chain verification.",
    remove_when="vLLM supports tree-shaped drafts for custom proposers (per-request "
    "draft parents/depths in the scheduler output or a proposer position hook).",
    apply=_apply_prepare_hook,
    stage="proposer",
))
register_patch(Patch(
    name=SAMPLE_HOOK,
    target="vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample",
    why="vLLM's rejection sampler verifies drafts as a chain; a tree needs a walk from "
    "the root (greedy or lossless sample-and-descend) and the accepted path's KV moved "
    "to the slots of its linear positions.",
    how="Takes the tree requests' logits rows, calls the original for the whole batch, "
    "then replaces each tree request's row of sampled_token_ids with the accepted path "
    "+ one token (-1 padded; vLLM's bookkeeping and scheduler rollback then work "
    "unchanged), re-writes the accepted nodes' K/V with the backend's own writer, and "
    "records the last accepted node for the next draft. Under TP the output rank's "
    "verdicts are broadcast so every rank moves the same KV.",
    remove_when="vLLM gains a tree rejection sampler with KV compaction (closed PR "
    "#22752 sketched one).",
    apply=_apply_sample_hook,
    stage="proposer",
))
register_patch(Patch(
    name=BACKEND_HOOK,
    target="vllm.v1.attention.backends.registry.AttentionBackendEnum.CPU_ATTN",
    why="vLLM's CPU attention kernel only supports causal masks; tree nodes must see "
    "only the committed context and their ancestors.",
    how="register_backend(CPU_ATTN, TreeCPUAttentionBackend): a subclass whose forward "
    "runs the C++ kernel, then recomputes the drafted nodes' rows in torch over the "
    "context (read through a cache-layout map learnt from the backend's own writer) and "
    "the nodes' ancestors; identical to the parent when no tree is in flight. Clears "
    "vLLM's cached backend selection; CPU platform only.",
    remove_when="vLLM's CPU attention accepts a custom mask or returns the log-sum-exp "
    "(so the tree part can be merged), or vLLM supports tree attention natively.",
    apply=_apply_backend_hook,
    stage="proposer",
))

TREE_PATCHES = (BACKEND_HOOK, PREPARE_HOOK, SAMPLE_HOOK)

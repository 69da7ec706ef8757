# SPDX-License-Identifier: Apache-2.0
"""The drafter's working memory: the formula the engine reserves, and a CPU meter.

A drafting step's memory is dominated by the drafter's logits, ``[B, W, Vd]`` in the
model dtype. :func:`vllm_redrafter.beam_search.beam_search` never makes a float32 copy
of them: per step it holds the logits, one same-sized temporary for the row
log-sum-exp (plus a bool mask when ``draft_top_k`` is set), and small ``[B, W, H]``
tensors. :func:`beam_search_peak_bytes` is that arithmetic; vLLM's memory profiling
measures the real peak when the proposer warms up at ``max_num_seqs`` inside it (GPU),
and :class:`LiveBytes` measures it on any device by watching tensor storages (tests).

Example: ``B = 256`` requests, ``W = 4``, ``Vd = 128_256``, bfloat16:
``2 * 256 * 4 * 128_256 * 2 B = 0.49 GiB`` for the logits and their temporary, where the
float32 log-softmax path needed about ``(2 + 3 * 4) * 256 * 4 * 128_256 B = 1.7 GiB``.

Glossary: ``B`` requests, ``W`` beam width, ``Vd`` draft vocabulary, ``H`` target
hidden size, ``E`` drafter exit_dim.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SMALL_TENSORS_PER_ROW = 16
"""Upper bound on the ``[B, W, max(H, E)]``-sized tensors alive at once in a step
(embeddings, RNN state and its two linear maps, features ``2H``, ResBlock in/out, ...)."""


def beam_search_peak_bytes(
    batch: int,
    beam_width: int,
    draft_vocab: int,
    width: int,
    dtype: torch.dtype,
    *,
    draft_top_k: int | None = None,
    extra_columns: int = 0,
) -> int:
    """Upper bound of the bytes one beam search allocates at its peak (inputs and
    weights excluded).

    Args:
        batch: ``B`` requests drafted at once (``max_num_seqs`` for the reservation).
        beam_width: ``W``.
        draft_vocab: ``Vd``.
        width: ``max(H, E)``, the widest per-row feature.
        dtype: the drafter's (model) dtype.
        draft_top_k: the ``draft_top_k`` option (adds a ``[B, W, Vd]`` bool mask).
        extra_columns: further model-dtype logit columns alive beside the ``Vd`` ones
            (a vocab-sharded head: this rank's shard ``Vd / tp`` before the
            all-gather; a ``head="target"`` drafter under TP: the gathered ``V`` and the
            shard ``V / tp`` before its ``Vd`` columns are copied out).

    Returns:
        Bytes. Example: ``B = 16, W = 4, Vd = 8192, width = 576``, float32, no mask:
        ``16*4*8192*(4 + 4) + 16*16*4*576*4 = 4,194,304 + 2,359,296 = 6,553,600``.
    """
    rows = batch * beam_width
    item = torch.empty((), dtype=dtype).element_size()
    per_entry = 2 * item + (1 if draft_top_k is not None and draft_top_k < draft_vocab else 0)
    vocab_bytes = rows * draft_vocab * per_entry
    vocab_bytes += rows * extra_columns * item
    return vocab_bytes + SMALL_TENSORS_PER_ROW * rows * width * item


class LiveBytes(TorchDispatchMode):
    """Meter of the tensor storage bytes allocated inside the ``with`` block.

    Every op's output storage that is new (not one of its inputs' storages, as views
    and in-place results are) is counted until the storage is freed (a
    finalizer on the storage, which torch keeps alive exactly as long as any tensor
    uses it). ``peak`` is the largest total alive at once. Inputs, weights and any
    allocation made outside the block are not counted. Device-independent, so it
    measures the CPU run of the same code that runs on a GPU.

    Example::

        with LiveBytes() as meter:
            y = torch.ones(1000).exp()   # ones: 4000 B, exp: 4000 B -> peak 8000
        meter.peak  # 8000
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {leaf.untyped_storage().data_ptr()
                  for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                storage = leaf.untyped_storage()
                if storage.data_ptr() not in inputs:  # views and in-place ops alias
                    self._track(storage)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        size = storage.nbytes()
        if size == 0 or key in self._tracked:
            return
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size

# SPDX-License-Identifier: Apache-2.0
"""Drafting replayed from CUDA graphs: one graph per padded batch size.

A beam search step is dozens of small kernels (RNN update, ResBlocks, head, top-k,
gathers) whose shapes depend only on the batch size, so on a GPU its launch overhead
dominates at small batches. :class:`GraphedSearch` captures ``search(hidden, init)`` once
per batch-size bucket on static input buffers and replays it: a step is then two small
copies in and one graph launch. Requests beyond the real batch (padding up to the bucket)
get zero hidden states and token 0; their rows are computed and ignored.

Example: buckets ``(1, 2, 4, 8, 16, 24, 32)``, a step with 5 requests: the inputs are
copied into rows 0-4 of the 8-row buffers, rows 5-7 are zeroed, the 8-row graph is
replayed, and rows 0-4 of its output are returned.

The capture backend is injectable: :class:`CudaGraphBackend` on a GPU; tests on CPU use
an eager stand-in that runs the function on the same static buffers, so the bucketing,
padding and buffer reuse are tested without a GPU.

Glossary: ``B`` requests this step, ``Bp`` the padded bucket size, ``H`` hidden size.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

SearchFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(hidden [Bp, H], init [Bp] int64) -> out [Bp, ...]`` on the device, static shapes."""


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Padded batch sizes to capture: 1, 2, 4, 8, then every multiple of 8, up to and
    including ``max_batch``. Example: ``batch_buckets(20) == (1, 2, 4, 8, 16, 20)``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    sizes += list(range(8, max_batch, 8))
    return tuple(sorted(set(sizes + [max_batch])))


class Replay(Protocol):
    """A captured computation: ``replay()`` recomputes its output in place."""

    def replay(self) -> None: ...


class CaptureBackend(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        """Capture ``fn`` (reads the static inputs) -> (replayable, static output)."""
        ...


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` capture, all graphs sharing one memory pool.

    Warm-up runs on a side stream before each capture, as torch requires."""

    def __init__(self, warmup_runs: int = 2) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.warmup_runs = warmup_runs

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Replay, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out


class GraphedSearch:
    """``search`` replayed per padded batch size (see the module docstring).

    Args:
        search: the static-shape search to capture.
        hidden_size: ``H``.
        dtype: dtype of ``hidden``.
        device: where the buffers live.
        buckets: padded batch sizes (:func:`batch_buckets`); the largest bounds ``B``.
        backend: capture backend (:class:`CudaGraphBackend` on a GPU).
    """

    def __init__(self, search: SearchFn, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, buckets: Sequence[int],
                 backend: CaptureBackend) -> None:
        self.search = search
        self.buckets = tuple(sorted(buckets))
        self.backend = backend
        largest = self.buckets[-1]
        self.hidden = torch.zeros(largest, hidden_size, dtype=dtype, device=device)  # [Bmax, H]
        self.init = torch.zeros(largest, dtype=torch.int64, device=device)  # [Bmax]
        self.graphs: dict[int, tuple[Replay, torch.Tensor]] = {}

    def bucket(self, batch: int) -> int:
        """Smallest captured size ``>= batch``. Raises ValueError past the largest."""
        index = bisect.bisect_left(self.buckets, batch)
        if batch < 1 or index == len(self.buckets):
            raise ValueError(f"batch {batch} outside the captured sizes 1..{self.buckets[-1]}")
        return self.buckets[index]

    def capture_all(self) -> None:
        """Capture every bucket, largest first (smaller graphs reuse its pool memory)."""
        for size in reversed(self.buckets):
            self._capture(size)

    def _capture(self, size: int) -> tuple[Replay, torch.Tensor]:
        if size not in self.graphs:
            hidden, init = self.hidden[:size], self.init[:size]  # static views
            self.graphs[size] = self.backend.capture(lambda: self.search(hidden, init))
        return self.graphs[size]

    def __call__(self, hidden: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        """``hidden [B, H]``, ``init [B]`` -> ``out[:B]`` of the bucket's graph (a view of
        its static output: read it before the next call)."""
        batch = hidden.shape[0]
        size = self.bucket(batch)
        graph, out = self._capture(size)
        self.hidden[:batch].copy_(hidden)
        self.hidden[batch:size].zero_()
        self.init[:batch].copy_(init)
        self.init[batch:size].zero_()
        graph.replay()
        return out[:batch]

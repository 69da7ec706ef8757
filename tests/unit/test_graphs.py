# SPDX-License-Identifier: Apache-2.0
"""Graph-replayed drafting without a GPU: bucketing, padding and static-buffer reuse of
``GraphedSearch`` with an eager capture backend (the CUDA backend itself is checked by
``examples/gpu_check.py`` when a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

from vllm_redrafter.beam_search import beam_search
from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.graphs import GraphedSearch, batch_buckets

H, V, W, L = 16, 50, 3, 4


class EagerReplay:
    """Stand-in for a CUDA graph: replay recomputes ``fn`` into the static output."""

    def __init__(self, fn):  # noqa: ANN001
        self.fn = fn
        self.out = fn()

    def replay(self) -> None:
        self.out.copy_(self.fn())


class EagerBackend:
    def __init__(self) -> None:
        self.captured = 0

    def capture(self, fn):  # noqa: ANN001, ANN201
        self.captured += 1
        graph = EagerReplay(fn)
        return graph, graph.out


def test_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    with pytest.raises(ValueError):
        batch_buckets(0)


@pytest.fixture(scope="module")
def search():
    config = DrafterConfig(hidden_size=H, vocab_size=V, exit_dim=24, num_draft_layers=1)
    drafter = RecurrentDrafter(config, generator=torch.Generator().manual_seed(0)).eval()
    table = torch.randn(V, H, generator=torch.Generator().manual_seed(1))

    def run(hidden: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        return beam_search(drafter, lambda ids: table[ids], hidden, init, W, L).tokens

    return run


def test_replayed_rows_equal_the_eager_search(search):
    backend = EagerBackend()
    graphed = GraphedSearch(search, H, torch.float32, torch.device("cpu"),
                            batch_buckets(12), backend)
    generator = torch.Generator().manual_seed(2)
    for batch in (5, 12, 1, 5, 8):
        hidden = torch.randn(batch, H, generator=generator)
        init = torch.randint(0, V, (batch,), generator=generator)
        out = graphed(hidden, init)
        assert out.shape == (batch, W, L)
        assert torch.equal(out, search(hidden, init))
        size = graphed.bucket(batch)
        assert torch.count_nonzero(graphed.hidden[batch:size]) == 0  # padding zeroed
    assert backend.captured == 3  # buckets 8, 12, 1: each captured once, then replayed
    assert set(graphed.graphs) == {1, 8, 12}


def test_capture_all_and_limits(search):
    backend = EagerBackend()
    graphed = GraphedSearch(search, H, torch.float32, torch.device("cpu"),
                            batch_buckets(10), backend)
    graphed.capture_all()
    assert backend.captured == len(batch_buckets(10))
    with pytest.raises(ValueError, match="outside the captured sizes 1..10"):
        graphed(torch.zeros(11, H), torch.zeros(11, dtype=torch.int64))

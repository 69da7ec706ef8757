# SPDX-License-Identifier: Apache-2.0
"""``draft_int8: "auto"`` at start-up: the low-bit copy of the drafter's head that the
timing built is the one the proposer keeps (the head is not quantized, and in int4
packed, a second time)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.proposers import redrafter as proposer_module
from vllm_redrafter.proposers.redrafter import ReDrafterProposer
from vllm_redrafter.quant import Int4Rows, low_bit_rows

pytestmark = pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no CPU int4 product")


def _proposer(bits: int = 4) -> ReDrafterProposer:
    proposer = object.__new__(ReDrafterProposer)  # no vLLM config: built by hand
    proposer.options = SimpleNamespace(draft_bits=bits)
    proposer.draft_dtype = torch.bfloat16
    return proposer


def _core(exit_dim: int, draft_vocab: int) -> RecurrentDrafter:
    config = DrafterConfig(hidden_size=32, vocab_size=96, exit_dim=exit_dim,
                           num_draft_layers=1, draft_vocab=list(range(draft_vocab)))
    generator = torch.Generator().manual_seed(0)
    return RecurrentDrafter(config, generator=generator).to(torch.bfloat16)


@pytest.fixture
def timings(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Single TP rank; the timing says the low-bit product wins and records what it
    timed (the decision itself is tested in ``tests/unit/test_quant.py``)."""
    timed: list[object] = []

    def pays(weight: torch.Tensor, bits: int, low: object = None) -> tuple[bool, float, float]:
        timed.append(low)
        return True, 2.0, 0.5

    monkeypatch.setattr(proposer_module, "low_bit_pays", pays)
    monkeypatch.setattr("vllm.distributed.get_tensor_model_parallel_world_size", lambda: 1)
    return timed


def test_the_timed_head_copy_is_returned_for_reuse(timings: list[object]) -> None:
    core = _core(exit_dim=64, draft_vocab=96)  # the head [96, 64] is the largest weight
    keep, copy = _proposer()._low_bit_measured(core)
    assert keep and isinstance(copy, Int4Rows)
    assert timings == [copy]  # the very object that was timed
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    fresh = low_bit_rows(core.lm_head.weight, 4)
    assert torch.equal(copy(x), fresh(x))  # built from the head, in draft_bits


def test_no_copy_when_the_timed_weight_is_not_the_head(timings: list[object]) -> None:
    core = _core(exit_dim=64, draft_vocab=16)  # the ResBlock's [64, 64] is the largest
    keep, copy = _proposer()._low_bit_measured(core)
    assert keep and copy is None and len(timings) == 1


def test_no_copy_when_low_bits_do_not_pay(monkeypatch: pytest.MonkeyPatch,
                                          timings: list[object]) -> None:
    monkeypatch.setattr(proposer_module, "low_bit_pays",
                        lambda weight, bits, low=None: (False, 0.5, 2.0))
    keep, copy = _proposer()._low_bit_measured(_core(exit_dim=64, draft_vocab=96))
    assert not keep and copy is None


def test_nothing_to_time_without_own_linear_layers() -> None:
    core = nn.Module()
    core.lm_head = nn.Identity()
    assert _proposer()._low_bit_measured(core) == (False, None)  # type: ignore[arg-type]

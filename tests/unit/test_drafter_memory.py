# SPDX-License-Identifier: Apache-2.0
"""The beam search's peak working memory, measured on CPU against the formula the engine
reserves (``memory.beam_search_peak_bytes``); the meter itself; and a negative control:
the float32 log-softmax path that the low-memory candidates replaced breaks the bound."""

from __future__ import annotations

import pytest
import torch

from vllm_redrafter import beam_search as beam_search_mod
from vllm_redrafter.beam_search import beam_search
from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.memory import LiveBytes, beam_search_peak_bytes

HIDDEN, EXIT, DRAFT_VOCAB, VOCAB = 64, 96, 8192, 9000
BATCH, WIDTH, LENGTH = 16, 4, 5


def test_meter_counts_new_storages_not_views_or_inputs() -> None:
    x = torch.zeros(1000)
    with LiveBytes() as meter:
        a = torch.ones(1000)  # +4000
        b = a.exp()  # +4000 -> 8000 alive
        del a, b  # both freed
        view = x[None].expand(4, 1000)  # a view of an input: nothing new
        x.add_(1.0)  # in place: nothing new
        c = torch.ones(500, dtype=torch.float64)  # +4000
    assert meter.peak == 8000
    assert meter.live == 4000
    del c, view
    assert meter.live == 0


def _drafter(dtype: torch.dtype, draft_top_k_vocab: int = DRAFT_VOCAB) -> RecurrentDrafter:
    config = DrafterConfig(
        hidden_size=HIDDEN, vocab_size=VOCAB, exit_dim=EXIT, num_draft_layers=2,
        rnn=True, draft_vocab=list(range(0, VOCAB))[:draft_top_k_vocab])
    generator = torch.Generator().manual_seed(0)
    return RecurrentDrafter(config, generator=generator).to(dtype).eval()


def _measure(drafter: RecurrentDrafter, dtype: torch.dtype, top_k: int | None) -> int:
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(VOCAB, HIDDEN, generator=generator).to(dtype)  # [V, H]
    hidden = torch.randn(BATCH, HIDDEN, generator=generator).to(dtype)  # [B, H]
    init = torch.randint(0, VOCAB, (BATCH,), generator=generator)  # [B]

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    with torch.no_grad(), LiveBytes() as meter:
        beam_search(drafter, embed, hidden, init, WIDTH, LENGTH, draft_top_k=top_k)
    return meter.peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [None, 32])
def test_peak_is_within_the_reserved_formula(dtype: torch.dtype, top_k: int | None) -> None:
    measured = _measure(_drafter(dtype), dtype, top_k)
    bound = beam_search_peak_bytes(BATCH, WIDTH, DRAFT_VOCAB, max(HIDDEN, EXIT), dtype,
                                   draft_top_k=top_k)
    logits_bytes = BATCH * WIDTH * DRAFT_VOCAB * dtype.itemsize
    # The logits and the one same-sized temporary are really alive at once ...
    assert measured >= 2 * logits_bytes
    # ... and nothing else of vocabulary size: the formula bounds it, not loosely.
    assert measured <= bound < 1.6 * measured, (measured, bound)


def test_float32_log_softmax_path_breaks_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: with the full float32 log-softmax per step (what the search did
    before the low-memory candidates), the measured peak exceeds the reserved formula."""

    def float32_candidates(drafter, context, state, beam_width, top_k):  # noqa: ANN001,ANN202
        logits = drafter.logits(context, state)
        return beam_search_mod._draft_log_probs(logits, top_k), None

    monkeypatch.setattr(beam_search_mod, "_step_candidates", float32_candidates)
    dtype = torch.bfloat16
    measured = _measure(_drafter(dtype), dtype, None)
    bound = beam_search_peak_bytes(BATCH, WIDTH, DRAFT_VOCAB, max(HIDDEN, EXIT), dtype)
    assert measured > 1.5 * bound, (measured, bound)


def test_formula_worked_example() -> None:
    assert beam_search_peak_bytes(16, 4, 8192, 576, torch.float32) == 6_553_600
    with_mask = beam_search_peak_bytes(16, 4, 8192, 576, torch.float32, draft_top_k=8)
    assert with_mask - 6_553_600 == 16 * 4 * 8192
    gathered = beam_search_peak_bytes(16, 4, 8192, 576, torch.float32, extra_columns=49152)
    assert gathered - 6_553_600 == 16 * 4 * 49152 * 4

# SPDX-License-Identifier: Apache-2.0
"""Vocab-sharded candidates: every shard's top-W and partial log-sum-exp, merged, equal
the unsharded ``top_candidates`` (what TP ranks all-gather instead of the full logits)."""

from __future__ import annotations

import pytest
import torch

from vllm_redrafter.beam_search import merge_shard_candidates, shard_candidates, top_candidates


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("top_k", [None, 3, 9])
def test_merged_shards_equal_the_full_row(tp: int, top_k: int | None) -> None:
    vocab, k, rows = 50, 4, 6
    per_shard = -(-vocab // tp) + 1  # padded like a vocab-parallel head
    logits = torch.randn(rows, per_shard * tp, generator=torch.Generator().manual_seed(tp))
    packed = torch.stack([
        shard_candidates(logits[:, r * per_shard:(r + 1) * per_shard], r * per_shard, vocab,
                         k, top_k) for r in range(tp)], dim=1)  # [N, tp, 2m+1]
    got_lp, got_ids = merge_shard_candidates(packed, k, top_k)
    want_lp, want_ids = top_candidates(logits[:, :vocab], k, top_k)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-5)
    assert int(got_ids.max()) < vocab  # padding columns never chosen


def test_padding_is_never_a_candidate() -> None:
    logits = torch.tensor([[1.0, 4.0, 9.0]])  # global columns 3, 4, 5; vocab 5
    packed = shard_candidates(logits, offset=3, vocab=5, k=1)
    expected = torch.tensor([[4.0, 4.0, torch.tensor([1.0, 4.0]).logsumexp(0).item()]])
    torch.testing.assert_close(packed, expected)

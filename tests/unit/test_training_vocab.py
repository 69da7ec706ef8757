# SPDX-License-Identifier: Apache-2.0
"""Draft vocabulary: choice by frequency, coverage, and the target <-> draft id mapping."""

from __future__ import annotations

import torch

from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.training.loss import IGNORE
from vllm_redrafter.training.trainer import draft_labels
from vllm_redrafter.training.vocab import (choose_draft_vocab, coverage, target_to_draft,
                                           token_counts)


def test_choose_by_frequency_sorted_with_always():
    tokens = torch.tensor([5, 5, 5, 3, 3, 9, 9, 9, 9, 1])
    counts = token_counts(tokens, 12)  # [12]
    assert choose_draft_vocab(counts, 2) == [5, 9]
    # EOS (id 11, never seen) is forced in; ties broken by the smaller id
    assert choose_draft_vocab(counts, 3, always=(11,)) == [5, 9, 11]
    assert choose_draft_vocab(counts, 4) == [1, 3, 5, 9]
    assert choose_draft_vocab(counts, 12) is None
    assert choose_draft_vocab(counts, None) is None


def test_coverage():
    counts = token_counts(torch.tensor([0, 0, 0, 1]), 4)
    assert coverage(counts, [0]) == 0.75
    assert coverage(counts, None) == 1.0


def test_mapping_matches_drafter_and_labels():
    vocab = [2, 5, 7]
    t2d = target_to_draft(vocab, 8)
    assert t2d.tolist() == [-1, -1, 0, -1, -1, 1, -1, 2]
    cfg = DrafterConfig(hidden_size=4, vocab_size=8, exit_dim=8, num_draft_layers=0,
                        draft_vocab=vocab)
    drafter = RecurrentDrafter(cfg)
    assert torch.equal(drafter.target_to_draft_map(), t2d)
    # round trip through the drafter's own mapping
    assert drafter.to_target_ids(t2d[torch.tensor(vocab)]).tolist() == vocab
    # labels: out-of-vocabulary -> ignored by the loss, a miss for accuracy; past end -> ignored
    windows = torch.tensor([[2, 5, 3, -1]])  # x_{t+1}=2, labels 5, 3 (OOV), end
    loss_lab, acc_lab = draft_labels(windows, t2d, 3)
    assert loss_lab.tolist() == [[1, IGNORE, IGNORE]]
    assert acc_lab.tolist() == [[1, -1, IGNORE]]

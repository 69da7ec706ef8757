# SPDX-License-Identifier: Apache-2.0
"""Offline acceptance walk (vllm_redrafter.evaluate): the maths on literal sequences."""

from __future__ import annotations

import torch

from vllm_redrafter.evaluate import WalkStats, match_lengths, walk


def test_match_lengths_compare_drafts_after_the_init_token():
    sequence = torch.tensor([5, 6, 7, 8, 9])
    # context row 0: init = sequence[1] = 6, drafts should be 7, 8
    beams = torch.tensor([[[6, 7, 9], [6, 7, 8]],    # row 0: beam 0 accepts 1, beam 1 2
                          [[7, 8, 9], [7, 1, 1]],    # row 1: beam 0 accepts 2
                          [[8, 9, 3], [8, 3, 3]]])   # row 2: 9 then the end
    assert match_lengths(beams, sequence, 0).tolist() == [[1, 2], [2, 0], [1, 0]]


def test_walk_jumps_over_accepted_tokens():
    stats = walk([2, 0, 0, 1, 0], start=0, end=4, depth=3)
    assert (stats.steps, stats.accepted, stats.per_depth) == (2, 3, [2, 1, 0])
    assert stats.tau == 2.5 and stats.acceptance_per_depth == [1.0, 0.5, 0.0]
    nothing = walk([0, 0, 0], start=3, end=5, depth=2)
    assert (nothing.steps, nothing.tau) == (3, 1.0)


def test_tree_walk_is_never_below_chain():
    lengths = torch.tensor([[0, 2], [1, 0], [0, 0], [3, 1], [0, 1]])
    chain = walk(lengths[:, 0].tolist(), 0, 4, 3)
    tree = walk(lengths.max(dim=1).values.tolist(), 0, 4, 3)
    assert tree.tau >= chain.tau
    merged = WalkStats()
    merged.merge(chain)
    merged.merge(tree)
    assert merged.steps == chain.steps + tree.steps

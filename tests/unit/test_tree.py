# SPDX-License-Identifier: Apache-2.0
"""Prefix-tree packing: literal tables (Apple's worked example), padding, properties,
and a brute-force check that tree attention over packed nodes equals per-beam causal
attention over the unpacked beams."""

from __future__ import annotations

import pytest
import torch

from vllm_redrafter.tree import PAD, build_tree, pack, prefix_tree_of, unpack

A, B, C, D, E, F, G = 10, 11, 12, 13, 14, 15, 16

BEAMS = [[A, B, C, D], [A, B, E, F], [A, B, G, D]]
PREFIX_TREE = [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 2, 2]]
PACKED_TOKENS = [A, B, C, D, E, F, G, D]
PACKED_INDEX = [0, 1, 2, 3, 6, 7, 10, 11]
UNPACKER = [[0, 1, 2, 3], [0, 1, 4, 5], [0, 1, 6, 7]]
DEPTH = [0, 1, 2, 3, 2, 3, 2, 3]
PARENTS = [-1, 0, 1, 2, 1, 4, 1, 6]
# Row p = what node p sees (ancestors and itself).
MASK = """
    T . . . . . . .
    T T . . . . . .
    T T T . . . . .
    T T T T . . . .
    T T . . T . . .
    T T . . T T . .
    T T . . . . T .
    T T . . . . T T
"""


def mask_from_text(text: str) -> torch.Tensor:
    """``"T ."`` rows -> bool matrix."""
    rows = [line.split() for line in text.strip().splitlines()]
    return torch.tensor([[cell == "T" for cell in row] for row in rows])


def test_worked_example_tables() -> None:
    tree = build_tree(torch.tensor([BEAMS]))
    assert tree.prefix_tree.tolist() == [PREFIX_TREE]
    assert tree.num_nodes.tolist() == [8]
    assert tree.packed_tokens.tolist() == [PACKED_TOKENS]
    assert tree.packed_index.tolist() == [PACKED_INDEX]
    assert tree.unpacker.tolist() == [UNPACKER]
    assert tree.depth.tolist() == [DEPTH]
    assert tree.parents.tolist() == [PARENTS]
    assert torch.equal(tree.attn_mask[0], mask_from_text(MASK))
    assert (tree.beam_width, tree.beam_length, tree.max_nodes) == (3, 4, 8)


def test_identical_and_duplicate_beams() -> None:
    # Beams 1 and 3 repeat beam 0 entirely; beam 2 branches right after the root.
    beams = torch.tensor([[[A, B, C], [A, B, C], [A, D, E], [A, B, C]]])
    tree = build_tree(beams)
    assert tree.prefix_tree.tolist() == [[[0, 0, 0], [0, 0, 0], [0, 2, 2], [0, 0, 0]]]
    assert tree.num_nodes.tolist() == [5]
    assert tree.packed_tokens.tolist() == [[A, B, C, D, E]]
    assert tree.packed_index.tolist() == [[0, 1, 2, 7, 8]]
    assert tree.unpacker.tolist() == [[[0, 1, 2], [0, 1, 2], [0, 3, 4], [0, 1, 2]]]
    assert tree.parents.tolist() == [[-1, 0, 1, 0, 3]]
    assert tree.depth.tolist() == [[0, 1, 2, 1, 2]]


def test_all_beams_identical_is_a_chain() -> None:
    beams = torch.tensor([[[A, B, C, D]] * 5])
    tree = build_tree(beams)
    assert tree.num_nodes.tolist() == [4]
    assert tree.unpacker.tolist() == [[[0, 1, 2, 3]] * 5]
    expected = mask_from_text("T . . .\nT T . .\nT T T .\nT T T T")
    assert torch.equal(tree.attn_mask[0], expected)


def test_single_beam_and_length_one() -> None:
    chain = build_tree(torch.tensor([[[A, B, C]]]))
    assert chain.parents.tolist() == [[-1, 0, 1]]
    roots = build_tree(torch.tensor([[[A], [A], [A]], [[B], [B], [B]]]))
    assert roots.num_nodes.tolist() == [1, 1]
    assert roots.packed_tokens.tolist() == [[A], [B]]
    assert roots.unpacker.tolist() == [[[0], [0], [0]], [[0], [0], [0]]]
    assert roots.attn_mask.tolist() == [[[True]], [[True]]]


def test_batch_of_two_pads_the_smaller_tree() -> None:
    beams = torch.tensor([BEAMS, [[A, B, C, D]] * 3])
    tree = build_tree(beams)
    assert tree.num_nodes.tolist() == [8, 4]
    assert tree.packed_tokens.tolist() == [PACKED_TOKENS, [A, B, C, D] + [PAD] * 4]
    assert tree.packed_index.tolist() == [PACKED_INDEX, [0, 1, 2, 3] + [PAD] * 4]
    assert tree.depth.tolist() == [DEPTH, [0, 1, 2, 3] + [PAD] * 4]
    assert tree.parents.tolist() == [PARENTS, [-1, 0, 1, 2] + [PAD] * 4]
    assert tree.unpacker.tolist() == [UNPACKER, [[0, 1, 2, 3]] * 3]
    assert tree.valid.tolist() == [[True] * 8, [True] * 4 + [False] * 4]
    expected_second = mask_from_text(
        """
        T . . . . . . .
        T T . . . . . .
        T T T . . . . .
        T T T T . . . .
        . . . . T . . .
        . . . . . T . .
        . . . . . . T .
        . . . . . . . T
        """
    )
    assert torch.equal(tree.attn_mask[0], mask_from_text(MASK))
    assert torch.equal(tree.attn_mask[1], expected_second)


def test_pack_and_unpack_helpers() -> None:
    beams = torch.tensor([BEAMS, [[A, B, C, D]] * 3])
    tree = build_tree(beams)
    assert torch.equal(unpack(tree.packed_tokens, tree), beams)
    assert torch.equal(pack(beams, tree, fill=PAD), tree.packed_tokens)
    features = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)  # [B, N, 3]
    unpacked = unpack(features, tree)  # [B, W, L, 3]
    assert unpacked.shape == (2, 3, 4, 3)
    assert torch.equal(unpacked[0, 2, 3], features[0, 7])  # D' of beam 2 is node 7
    assert torch.equal(unpacked[1, 2, 1], features[1, 1])  # beam 2 of row 1 -> beam 0
    with pytest.raises(ValueError, match="values must be"):
        unpack(features[:1], tree)


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 4), torch.zeros(1, 0, 4, dtype=torch.long)]
)
def test_rejects_bad_input(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="tokens must be"):
        build_tree(bad)


def test_rejects_float_tokens() -> None:
    with pytest.raises(ValueError, match="integer"):
        build_tree(torch.zeros(1, 2, 3))


# ------------------------------------------------------------------ random properties


def random_beams(
    generator: torch.Generator, batch: int, width: int, length: int, vocab: int
) -> torch.Tensor:
    """``[B, W, L]`` beams with one init token per row and many shared prefixes."""
    beams = torch.randint(vocab, (batch, width, length), generator=generator)
    beams[:, :, 0] = beams[:, :1, 0]
    return beams


def python_prefix_tree(beams: list[list[int]]) -> list[list[int]]:
    return [
        [
            min(j for j, other in enumerate(beams) if other[: k + 1] == beam[: k + 1])
            for k in range(len(beam))
        ]
        for beam in beams
    ]


def python_ancestors(parents: list[int], node: int) -> set[int]:
    seen = {node}
    while parents[node] >= 0:
        node = parents[node]
        seen.add(node)
    return seen


@pytest.mark.parametrize(
    "shape", [(3, 4, 3, 2), (4, 6, 5, 3), (2, 1, 4, 5), (5, 8, 2, 2)]
)
def test_random_tree_properties(
    generator: torch.Generator, shape: tuple[int, int, int, int]
) -> None:
    batch, width, length, vocab = shape
    beams = random_beams(generator, batch, width, length, vocab)
    tree = build_tree(beams)
    assert torch.equal(unpack(tree.packed_tokens, tree), beams)
    assert torch.equal(pack(beams, tree, fill=PAD), tree.packed_tokens)
    for b in range(batch):
        rows = beams[b].tolist()
        assert tree.prefix_tree[b].tolist() == python_prefix_tree(rows)
        prefixes = {tuple(row[: k + 1]) for row in rows for k in range(length)}
        n = int(tree.num_nodes[b])
        assert n == len(prefixes)
        index = tree.packed_index[b, :n].tolist()
        assert index == sorted(index)  # row-major (beam, depth) order
        assert all(v == PAD for v in tree.packed_index[b, n:].tolist())
        parents = tree.parents[b, :n].tolist()
        tokens = tree.packed_tokens[b, :n].tolist()
        depth = tree.depth[b, :n].tolist()
        for p in range(n):
            assert depth[p] == index[p] % length
            if depth[p] == 0:
                assert parents[p] == -1
            else:
                assert parents[p] < p and depth[parents[p]] == depth[p] - 1
        # Dedup: siblings never carry the same token.
        siblings = [(parents[p], tokens[p]) for p in range(n)]
        assert len(set(siblings)) == n
        mask = tree.attn_mask[b]
        for p in range(n):
            visible = {q for q in range(n) if mask[p, q]}
            assert visible == python_ancestors(parents, p)
        assert not mask[:n, n:].any() and not mask[n:, :n].any()


# ------------------------------------------------------ brute-force attention check


def prefix_features(
    beams: torch.Tensor, vocab: int, dim: int, generator: torch.Generator
) -> torch.Tensor:
    """``[B, W, L, dim]`` features that depend only on each token's prefix.

    A small recurrence over the beam, so equal prefixes give equal features and
    different prefixes (almost surely) different ones.
    """
    table = torch.randn(vocab, dim, generator=generator, dtype=torch.float64)  # [V, d]
    mix = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    state = torch.zeros(*beams.shape[:2], dim, dtype=torch.float64)  # [B, W, d]
    out = []
    for k in range(beams.shape[2]):
        state = torch.tanh(state @ mix + table[beams[:, :, k]])  # [B, W, d]
        out.append(state)
    return torch.stack(out, dim=2)  # [B, W, L, d]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Plain masked softmax attention over the second-to-last dim."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [..., n, n]
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v  # [..., n, d]


@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 7, 5, 2)])
def test_tree_attention_equals_per_beam_causal_attention(
    generator: torch.Generator, shape: tuple[int, int, int, int]
) -> None:
    batch, width, length, vocab = shape
    dim = 8
    beams = random_beams(generator, batch, width, length, vocab)
    features = prefix_features(beams, vocab, dim, generator)  # [B, W, L, d]
    wq, wk, wv = (
        torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        for _ in range(3)
    )
    # Reference: each beam on its own with a causal mask.
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # [L, L]
    expected = attention(features @ wq, features @ wk, features @ wv, causal)
    # expected: [B, W, L, d]

    tree = build_tree(beams)
    packed = pack(features, tree)  # [B, Nmax, d] (zeros on padding)
    out = attention(packed @ wq, packed @ wk, packed @ wv, tree.attn_mask)
    # out: [B, Nmax, d]
    assert not torch.isnan(out).any()  # padding rows stay finite
    torch.testing.assert_close(unpack(out, tree), expected, rtol=1e-12, atol=1e-12)
    assert int(tree.num_nodes.min()) < width * length  # the check did exercise dedup


def test_prefix_tree_of_matches_python(generator: torch.Generator) -> None:
    beams = random_beams(generator, 6, 5, 4, 2)
    tree = prefix_tree_of(beams)
    for b in range(beams.shape[0]):
        assert tree[b].tolist() == python_prefix_tree(beams[b].tolist())

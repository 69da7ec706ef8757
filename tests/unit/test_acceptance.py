# SPDX-License-Identifier: Apache-2.0
"""Acceptance rules: greedy exact cases, greedy == sequential greedy decoding, tree ==
beams, logits warping against a naive reference, and the statistical losslessness of
sample-and-descend (with a negative control proving the test has power)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_redrafter.acceptance import (
    greedy_accept_beams,
    greedy_accept_tree,
    greedy_accept_tree_batched,
    sample_and_descend,
    sample_and_descend_batched,
    warp_logits,
)
from vllm_redrafter.tree import BeamTree, build_tree, pack

a, b, c, d, e, x, y, z = range(8)

# ------------------------------------------------------------- greedy, exact cases


def accept(tokens: list, argmax: list) -> list[list[int]]:
    """greedy_accept_beams on nested lists; returns [num, best, next] per request."""
    result = greedy_accept_beams(torch.tensor(tokens), torch.tensor(argmax))
    return torch.stack(result, dim=1).tolist()


def test_greedy_perfect_match() -> None:
    # argmax after [a] is b, after [a b] is c, after [a b c] is d: all accepted.
    assert accept([[[a, b, c]]], [[[b, c, d]]]) == [[2, 0, d]]


def test_greedy_early_mismatch() -> None:
    assert accept([[[a, b, c]]], [[[x, y, z]]]) == [[0, 0, x]]
    assert accept([[[a, b, c]]], [[[b, y, z]]]) == [[1, 0, y]]


def test_greedy_later_match_after_mismatch_does_not_count() -> None:
    # Draft 1 fails, draft 2 "matches" its argmax: only the leading run counts.
    assert accept([[[a, x, c]]], [[[b, c, d]]]) == [[0, 0, b]]


def test_greedy_picks_longest_beam() -> None:
    tokens = [[[a, x, y], [a, x, z]]]
    argmax = [[[x, z, e], [x, z, c]]]
    assert accept(tokens, argmax) == [[2, 1, c]]


def test_greedy_ties_go_to_smallest_beam() -> None:
    tokens = [[[a, x, y], [a, b, c], [a, b, d]]]
    argmax = [[[b, e, e], [b, e, e], [b, e, e]]]
    assert accept(tokens, argmax) == [[1, 1, e]]
    # Identical beams (e.g. beam-search fillers) tie too.
    assert accept([[[a, b]] * 3], [[[b, c]] * 3]) == [[1, 0, c]]


def test_greedy_multi_request() -> None:
    tokens = [
        [[a, b, c], [a, x, y]],  # beam 1 wins fully
        [[a, b, c], [a, b, d]],  # both fail at depth 1 -> beam 0, 1 accepted
        [[e, x, y], [e, z, y]],  # nothing accepted
    ]
    argmax = [
        [[x, z, e], [x, y, z]],
        [[b, e, e], [b, e, e]],
        [[a, a, a], [a, a, a]],
    ]
    assert accept(tokens, argmax) == [[2, 1, z], [1, 0, e], [0, 0, a]]


def test_greedy_no_draft() -> None:
    # L = 1: only the init token; the bonus is the argmax after it.
    assert accept([[[a]], [[c]]], [[[x]], [[y]]]) == [[0, 0, x], [0, 0, y]]


def test_greedy_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="target_argmax"):
        greedy_accept_beams(
            torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 2)
        )


def test_greedy_tree_worked_example() -> None:
    # Tree of tree.py's docstring: A B C D / E F / G D'.
    tokens = [10, 11, 12, 13, 14, 15, 16, 13]
    parents = [-1, 0, 1, 2, 1, 4, 1, 6]
    argmax = [11, 14, 99, 99, 15, 42, 99, 99]
    assert greedy_accept_tree(tokens, parents, argmax) == ([0, 1, 4, 5], 42)
    assert greedy_accept_tree(tokens, parents, [7] * 8) == ([0], 7)
    # Tensor inputs, padding and a non-deduplicated tree (two children carry 11).
    path, bonus = greedy_accept_tree(
        torch.tensor([10, 11, 11, 12, -1]),
        torch.tensor([-1, 0, 0, 2, -1]),
        torch.tensor([11, 5, 6, 7, 0]),
    )
    assert (path, bonus) == ([0, 1], 5)


# ------------------------------------------------ greedy vs sequential decoding


def toy_next_table(generator: torch.Generator, vocab: int) -> torch.Tensor:
    """``[V, V]`` deterministic greedy target: next token given the last two tokens."""
    return torch.randint(vocab, (vocab, vocab), generator=generator)


def greedy_continuation(
    table: torch.Tensor, before: int, root: int, steps: int
) -> list[int]:
    """Greedy decoding of the toy target after ``[..., before, root]``."""
    context, out = [before, root], []
    for _ in range(steps):
        out.append(int(table[context[-2], context[-1]]))
        context.append(out[-1])
    return out


def noisy_beams(
    generator: torch.Generator,
    table: torch.Tensor,
    before: int,
    root: int,
    width: int,
    length: int,
    error_rate: float,
) -> list[list[int]]:
    """Beams that follow the greedy target but go off-track with some probability."""
    vocab = table.shape[0]
    beams = []
    for _ in range(width):
        context = [before, root]
        for _ in range(length - 1):
            token = int(table[context[-2], context[-1]])
            if torch.rand((), generator=generator) < error_rate:
                token = int(torch.randint(vocab, (), generator=generator))
            context.append(token)
        beams.append(context[1:])
    return beams


def argmax_along_beams(
    table: torch.Tensor, before: int, beams: list[list[int]]
) -> list[list[int]]:
    """``argmax[i][k]`` = greedy next token after ``[before] + beams[i][:k+1]``."""
    out = []
    for beam in beams:
        context = [before] + beam
        out.append([int(table[context[k], context[k + 1]]) for k in range(len(beam))])
    return out


def test_greedy_equals_sequential_greedy_decoding(generator: torch.Generator) -> None:
    vocab, width, length, batch = 4, 4, 5, 64
    table = toy_next_table(generator, vocab)
    befores = torch.randint(vocab, (batch,), generator=generator).tolist()
    roots = torch.randint(vocab, (batch,), generator=generator).tolist()
    all_beams, all_argmax = [], []
    for before, root in zip(befores, roots, strict=True):
        beams = noisy_beams(generator, table, before, root, width, length, 0.3)
        all_beams.append(beams)
        all_argmax.append(argmax_along_beams(table, before, beams))
    tokens, argmax = torch.tensor(all_beams), torch.tensor(all_argmax)  # [B, W, L] x2
    num, best, bonus = greedy_accept_beams(tokens, argmax)
    tree = build_tree(tokens)
    tree_result = greedy_accept_tree_batched(tree, pack(argmax, tree))
    assert torch.equal(torch.stack(tree_result), torch.stack([num, best, bonus]))

    seen_lengths = set()
    for r in range(batch):
        truth = greedy_continuation(table, befores[r], roots[r], length)
        runs = [
            next((k for k in range(length - 1) if beam[k + 1] != truth[k]), length - 1)
            for beam in all_beams[r]
        ]
        n_star = max(runs)
        assert int(num[r]) == n_star
        assert int(best[r]) == runs.index(n_star)
        emitted = all_beams[r][int(best[r])][1 : n_star + 1] + [int(bonus[r])]
        assert emitted == truth[: n_star + 1]  # identical to greedy decoding
        seen_lengths.add(n_star)
        # The single-request tree walk agrees.
        n = int(tree.num_nodes[r])
        path, tree_bonus = greedy_accept_tree(
            tree.packed_tokens[r, :n], tree.parents[r, :n], pack(argmax, tree)[r, :n]
        )
        assert len(path) - 1 == n_star and tree_bonus == int(bonus[r])
        assert path == tree.unpacker[r, int(best[r]), : n_star + 1].tolist()
    assert len(seen_lengths) >= 3  # the data exercised several acceptance lengths


# --------------------------------------------------------------------- warping


def naive_warp(
    row: list[float], temperature: float, top_k: int | None, top_p: float | None
) -> list[float]:
    """Python re-statement of vLLM's temperature -> top-k -> top-p order."""
    vocab = len(row)
    if temperature < 1e-5:
        best = row.index(max(row))
        return [1.0 if i == best else 0.0 for i in range(vocab)]
    logits = [v / temperature for v in row]

    def softmax(values: list[float]) -> list[float]:
        top = max(values)
        weights = [math.exp(v - top) for v in values]
        return [w / sum(weights) for w in weights]

    if top_k is not None and 0 < top_k < vocab:
        kth = sorted(logits, reverse=True)[top_k - 1]
        logits = [v if v >= kth else -math.inf for v in logits]
    probs = softmax(logits)
    if top_p is not None and top_p < 1.0:
        keep, mass = set(), 0.0
        for i in sorted(range(vocab), key=lambda i: (-probs[i], i)):
            if keep and mass >= top_p:
                break
            keep.add(i)
            mass += probs[i]
        probs = softmax([v if i in keep else -math.inf for i, v in enumerate(logits)])
    return probs


def test_warp_worked_example() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    torch.testing.assert_close(
        warp_logits(logits, 1.0, top_k=3), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    )
    torch.testing.assert_close(
        warp_logits(logits, 1.0, top_k=3, top_p=0.8), torch.tensor([0.625, 0.375, 0, 0])
    )
    torch.testing.assert_close(
        warp_logits(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05])
    )
    # top-p keeps the smallest set reaching p; the most likely token always survives.
    torch.testing.assert_close(
        warp_logits(logits, 1.0, top_p=0.5), torch.tensor([1.0, 0, 0, 0])
    )
    torch.testing.assert_close(
        warp_logits(logits, 1.0, top_p=0.51), torch.tensor([0.625, 0.375, 0, 0])
    )


def test_warp_temperature_and_greedy() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.0, -1.0, 5.0, 4.0]])
    torch.testing.assert_close(warp_logits(logits, 0.5), (logits / 0.5).softmax(-1))
    greedy = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # first max
    for temperature in (0.0, -1.0, 1e-7):
        assert torch.equal(warp_logits(logits, temperature, top_k=2, top_p=0.3), greedy)
    # top-k keeps every logit tied with the k-th value.
    torch.testing.assert_close(
        warp_logits(logits[:1], 1.0, top_k=1), torch.tensor([[0.0, 0.5, 0.0, 0.5]])
    )
    # Disabled values.
    base = warp_logits(logits, 1.0)
    for kwargs in ({"top_k": 0}, {"top_k": -1}, {"top_k": 4}, {"top_p": 1.0}):
        torch.testing.assert_close(warp_logits(logits, 1.0, **kwargs), base)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.6), (0.9, 4, 0.8), (2.0, 2, 0.3)],
)
def test_warp_matches_naive(
    generator: torch.Generator,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    logits = torch.randn(64, 7, generator=generator) * 2
    logits[:8] = torch.randint(3, (8, 7), generator=generator).float()  # ties
    probs = warp_logits(logits.view(8, 8, 7), temperature, top_k, top_p).view(64, 7)
    expected = torch.tensor(
        [naive_warp(row, temperature, top_k, top_p) for row in logits.tolist()]
    )
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")],
)
def test_warp_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        warp_logits(torch.zeros(3), 1.0, **kwargs)


# ------------------------------------------------------- sample-and-descend basics


WORKED_TOKENS = torch.tensor([10, 11, 12, 13, 14, 15, 16, 13])
WORKED_PARENTS = torch.tensor([-1, 0, 1, 2, 1, 4, 1, 6])


def one_hot_rows(tokens: list[int], vocab: int = 20) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float()


def test_sample_and_descend_point_masses(generator: torch.Generator) -> None:
    # Point masses make the draws deterministic: B at 0, G at 1, 5 at node 6.
    probs = one_hot_rows([11, 16, 0, 0, 0, 0, 5, 0])
    path, emitted = sample_and_descend(WORKED_TOKENS, WORKED_PARENTS, probs, generator)
    assert (path, emitted) == ([0, 1, 6], [11, 16, 5])
    # Full depth: B, E, F, then the bonus after the leaf F.
    probs = one_hot_rows([11, 14, 0, 0, 15, 3, 0, 0])
    path, emitted = sample_and_descend(WORKED_TOKENS, WORKED_PARENTS, probs, generator)
    assert (path, emitted) == ([0, 1, 4, 5], [11, 14, 15, 3])
    # Immediate rejection at the root.
    probs = one_hot_rows([7] * 8)
    result = sample_and_descend(WORKED_TOKENS, WORKED_PARENTS, probs, generator)
    assert result == ([0], [7])


def test_sample_and_descend_never_draws_zero_probability(
    generator: torch.Generator,
) -> None:
    probs = torch.zeros(8, 20)
    probs[:, [11, 14, 15, 3]] = torch.tensor([0.4, 0.3, 0.2, 0.1])
    for _ in range(200):
        path, emitted = sample_and_descend(
            WORKED_TOKENS, WORKED_PARENTS, probs, generator
        )
        assert set(emitted) <= {11, 14, 15, 3}
        assert emitted[:-1] == WORKED_TOKENS[path[1:]].tolist()


def test_sample_and_descend_with_greedy_probs_equals_greedy_tree(
    generator: torch.Generator,
) -> None:
    vocab, width, length, batch = 4, 4, 5, 32
    table = toy_next_table(generator, vocab)
    for _ in range(batch):
        before, root = torch.randint(vocab, (2,), generator=generator).tolist()
        beams = noisy_beams(generator, table, before, root, width, length, 0.3)
        tree = build_tree(torch.tensor([beams]))
        argmax = pack(torch.tensor([argmax_along_beams(table, before, beams)]), tree)[0]
        probs = warp_logits(torch.nn.functional.one_hot(argmax, vocab).float(), 0.0)
        path, emitted = sample_and_descend(
            tree.packed_tokens[0], tree.parents[0], probs, generator
        )
        greedy_path, bonus = greedy_accept_tree(
            tree.packed_tokens[0], tree.parents[0], argmax
        )
        assert path == greedy_path
        assert emitted == tree.packed_tokens[0, path[1:]].tolist() + [bonus]


def test_sample_and_descend_seeded_and_batched_rows_agree(seed: int) -> None:
    tree = build_tree(torch.tensor([[[0, 1, 2], [0, 1, 3], [0, 2, 2]]]))
    probs = torch.full((1, tree.max_nodes, 4), 0.25)
    tokens, parents = tree.packed_tokens[0], tree.parents[0]  # [N] each
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(seed)
        draws = [sample_and_descend(tokens, parents, probs[0], gen) for _ in range(50)]
        runs.append(draws)
    assert runs[0] == runs[1]
    # Single-request results are row 0 of the batched function with the same RNG.
    gen_single, gen_batched = (torch.Generator().manual_seed(seed) for _ in range(2))
    for _ in range(50):
        single = sample_and_descend(tokens, parents, probs[0], gen_single)
        path, emitted, num = sample_and_descend_batched(
            tree.packed_tokens, tree.parents, probs, gen_batched
        )
        n = int(num[0])
        assert single == (path[0, :n].tolist(), emitted[0, :n].tolist())
        assert (path[0, n:] == -1).all() and (emitted[0, n:] == -1).all()


def test_sample_and_descend_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="parents"):
        sample_and_descend(WORKED_TOKENS, WORKED_PARENTS[:3], torch.ones(8, 20))
    with pytest.raises(ValueError, match="target_probs"):
        sample_and_descend_batched(
            WORKED_TOKENS[None], WORKED_PARENTS[None], torch.ones(1, 7, 20)
        )


# ------------------------------------------- sample-and-descend is lossless (stats)

VOCAB = 4
WIDTH, LENGTH = 3, 4
PROMPT = (0, 1)
NUM_EMITTED_CHECKED = 3
NUM_DRAWS = 20_000


def toy_target_logits(generator: torch.Generator) -> torch.Tensor:
    """``[V, V, V]`` target logits of the next token given the last two tokens."""
    return torch.randn(VOCAB, VOCAB, VOCAB, generator=generator) * 1.5


def draft_table(generator: torch.Generator, probs: torch.Tensor) -> torch.Tensor:
    """``[V, V, W, L-1]`` fixed drafts per context (sampled once from the target, so the
    tree often matches; the tree never depends on the draws of the run itself)."""
    drafts = torch.empty(VOCAB, VOCAB, WIDTH, LENGTH - 1, dtype=torch.int64)
    for before in range(VOCAB):
        for last in range(VOCAB):
            for beam in range(WIDTH):
                context = [before, last]
                for step in range(LENGTH - 1):
                    row = probs[context[-2], context[-1]]
                    token = int(torch.multinomial(row, 1, generator=generator))
                    drafts[before, last, beam, step] = token
                    context.append(token)
    return drafts


def simulate_generation(
    probs: torch.Tensor,
    drafts: torch.Tensor,
    generator: torch.Generator,
    tilt: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """Speculative generation of ``NUM_DRAWS`` independent requests, vectorised.

    Every step drafts a tree from the context, runs sample-and-descend on it and appends
    the emitted tokens, until every request holds ``NUM_EMITTED_CHECKED`` tokens. With
    ``tilt > 0`` the per-node distributions are biased towards the node's first child
    (a deliberately wrong sampler for the negative control).

    Returns:
        (``[NUM_DRAWS, NUM_EMITTED_CHECKED]`` first emitted tokens, mean tokens emitted
        by the first step).
    """
    batch = NUM_DRAWS
    trees, node_probs_by_context = context_trees(probs, drafts, tilt)
    before = torch.full((batch,), PROMPT[0])  # [B]
    last = torch.full((batch,), PROMPT[1])  # [B]
    out = torch.full((batch, NUM_EMITTED_CHECKED + LENGTH), -1)  # [B, 3 + L]
    count = torch.zeros(batch, dtype=torch.int64)  # [B]
    first_step_mean: float | None = None
    while int(count.min()) < NUM_EMITTED_CHECKED:
        context = before * VOCAB + last  # [B] index of the (before, last) context
        packed_tokens = trees.packed_tokens[context]  # [B, N]
        parents = trees.parents[context]  # [B, N]
        node_probs = node_probs_by_context[context]  # [B, N, V]
        _, emitted, num = sample_and_descend_batched(
            packed_tokens, parents, node_probs, generator
        )
        if first_step_mean is None:
            first_step_mean = num.float().mean().item()
        for col in range(emitted.shape[1]):
            write = (col < num) & (count + col < out.shape[1])
            rows = write.nonzero().squeeze(1)
            out[rows, (count + col)[rows]] = emitted[rows, col]
        last_two = emitted.gather(1, torch.stack([num - 2, num - 1], 1).clamp(min=0))
        before = torch.where(num >= 2, last_two[:, 0], last)
        last = last_two[:, 1]
        count = count + num
    assert first_step_mean is not None
    return out[:, :NUM_EMITTED_CHECKED], first_step_mean


def context_trees(
    probs: torch.Tensor, drafts: torch.Tensor, tilt: float
) -> tuple[BeamTree, torch.Tensor]:
    """Draft tree and per-node target distributions of each of the ``V * V`` contexts.

    Returns:
        (trees of the ``[V*V, W, L]`` beams, ``[V*V, N, V]`` distributions after each
        node's prefix; index ``before * V + last``).
    """
    before = torch.arange(VOCAB).repeat_interleave(VOCAB)  # [V*V]
    last = torch.arange(VOCAB).repeat(VOCAB)  # [V*V]
    roots = last[:, None, None].expand(VOCAB * VOCAB, WIDTH, 1)  # [V*V, W, 1]
    tree = build_tree(torch.cat([roots, drafts[before, last]], dim=2))  # [V*V, W, L]
    tokens = tree.packed_tokens.clamp(min=0)  # [V*V, N]
    parent_token = tokens.gather(1, tree.parents.clamp(min=0))  # [V*V, N]
    prev = torch.where(tree.parents >= 0, parent_token, before[:, None])  # [V*V, N]
    node_probs = probs[prev, tokens]  # [V*V, N, V]
    if tilt:
        node_probs = tilt_towards_first_child(node_probs, tree, tilt)
    return tree, node_probs


def tilt_towards_first_child(
    node_probs: torch.Tensor, tree: BeamTree, tilt: float
) -> torch.Tensor:
    """Move ``tilt`` of each node's mass onto its first child's token (biased)."""
    batch, nodes, vocab = node_probs.shape
    node_ids = torch.arange(nodes)[None, :, None]  # [1, N, 1]
    is_child = tree.parents[:, None, :] == node_ids  # [B, N, N]: child q of node p
    has_child = is_child.any(-1)  # [B, N]
    first_child = is_child.to(torch.uint8).argmax(-1)  # [B, N]
    child_token = tree.packed_tokens.gather(1, first_child).clamp(min=0)  # [B, N]
    bump = torch.nn.functional.one_hot(child_token, vocab).float()  # [B, N, V]
    tilted = (1 - tilt) * node_probs + tilt * bump
    return torch.where(has_child[..., None], tilted, node_probs)


def autoregressive_distribution(probs: torch.Tensor) -> torch.Tensor:
    """``[V, V, V]`` exact law of the first three sampled tokens after ``PROMPT``."""
    p1 = probs[PROMPT[0], PROMPT[1]]  # [V]
    p2 = probs[PROMPT[1]]  # [V(x1), V(x2)]
    p3 = probs  # [V(x1), V(x2), V(x3)]
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_rejects(samples: torch.Tensor, expected_probs: torch.Tensor) -> bool:
    """Pearson chi-square goodness of fit at level 1e-3 (small cells pooled).

    Any sample in a zero-probability cell is an immediate rejection.
    """
    cells = samples[:, 0] * VOCAB**2 + samples[:, 1] * VOCAB + samples[:, 2]
    observed = torch.bincount(cells, minlength=VOCAB**3).double()  # [V^3]
    expected = expected_probs.flatten().double() * samples.shape[0]  # [V^3]
    if observed[expected == 0].sum() > 0:
        return True
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    statistic = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    z = 3.09  # one-sided normal quantile of 1 - 1e-3; Wilson-Hilferty approximation
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return statistic > critical


def naive_warp_table(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    flat = logits.view(-1, VOCAB).tolist()
    rows = [naive_warp(r, temperature, top_k, top_p) for r in flat]
    return torch.tensor(rows, dtype=torch.float64).view(logits.shape)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, None, None),
        (0.6, None, None),
        (1.4, 2, None),
        (1.0, None, 0.7),
        (0.8, 3, 0.85),
    ],
)
def test_sample_and_descend_is_lossless(
    generator: torch.Generator,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> None:
    logits = toy_target_logits(generator)
    probs = warp_logits(logits, temperature, top_k, top_p)  # [V, V, V]
    drafts = draft_table(generator, probs)
    samples, first_step_mean = simulate_generation(probs, drafts, generator)
    assert first_step_mean > 1.3  # the trees were really descended into
    reference_probs = naive_warp_table(logits, temperature, top_k, top_p)  # [V, V, V]
    reference = autoregressive_distribution(reference_probs)
    assert not chi_square_rejects(samples, reference)


def test_lossless_check_detects_a_biased_sampler(generator: torch.Generator) -> None:
    """Negative control: a sampler tilted by 10% towards the draft must be rejected."""
    probs = warp_logits(toy_target_logits(generator), 1.0)
    drafts = draft_table(generator, probs)
    samples, _ = simulate_generation(probs, drafts, generator, tilt=0.1)
    assert chi_square_rejects(samples, autoregressive_distribution(probs))


def test_sample_and_descend_greedy_probs_reproduce_greedy_decoding(
    generator: torch.Generator,
) -> None:
    logits = toy_target_logits(generator)
    probs = warp_logits(logits, 0.0)
    drafts = draft_table(generator, warp_logits(logits, 1.0))
    samples, _ = simulate_generation(probs, drafts, generator)
    context = list(PROMPT)
    for _ in range(NUM_EMITTED_CHECKED):
        context.append(int(logits[context[-2], context[-1]].argmax()))
    assert (samples == torch.tensor(context[2:])).all()

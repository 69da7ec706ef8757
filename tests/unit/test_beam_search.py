# SPDX-License-Identifier: Apache-2.0
"""Drafter beam search: a naive Python-loop reference, exhaustive enumeration on tiny
vocabularies, fewer-candidates-than-beams fillers, history semantics, draft vocab
mapping and the real RecurrentDrafter."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vllm_redrafter import beam_search as beam_search_module
from vllm_redrafter.beam_search import Beams, _wide_search, beam_search
from vllm_redrafter.tree import build_tree

HIDDEN = 6


class TableDrafter:
    """Deterministic toy drafter with the RecurrentDrafter inference interface.

    ``s_t = tanh(e_t @ w + s_{t-1} @ u)``, ``logits = concat([h, s]) @ head``, all in
    float64 (so batched and one-at-a-time evaluations agree to the last float32 bit).
    Optionally a draft vocabulary maps draft ids to target ids.
    """

    def __init__(
        self,
        generator: torch.Generator,
        draft_vocab_size: int,
        *,
        draft_vocab: list[int] | None = None,
        sharpness: float = 2.0,
    ) -> None:
        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        self.w = rand(HIDDEN, HIDDEN) / HIDDEN**0.5
        self.u = rand(HIDDEN, HIDDEN) / HIDDEN**0.5
        self.head = rand(2 * HIDDEN, draft_vocab_size) * sharpness / HIDDEN**0.5
        self.draft_vocab = None if draft_vocab is None else torch.tensor(draft_vocab)
        self.calls = 0

    def initial_state(
        self, shape_prefix: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.zeros(*shape_prefix, HIDDEN, dtype=dtype, device=device)

    def update_state(
        self, state: torch.Tensor, token_embeds: torch.Tensor
    ) -> torch.Tensor:
        return torch.tanh(token_embeds @ self.w + state @ self.u)

    def logits(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([hidden.expand_as(state), state], dim=-1) @ self.head

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        if self.draft_vocab is None:
            return draft_ids
        return self.draft_vocab[draft_ids]


def make_embed(generator: torch.Generator, vocab: int):  # noqa: ANN201
    table = torch.randn(vocab, HIDDEN, generator=generator, dtype=torch.float64)

    def embed(target_ids: torch.Tensor) -> torch.Tensor:
        assert int(target_ids.min()) >= 0 and int(target_ids.max()) < vocab
        return table[target_ids]

    return embed


def prefix_log_probs(
    drafter: TableDrafter,
    embed,  # noqa: ANN001
    hidden: torch.Tensor,
    prefix: list[int],
    top_k: int | None,
) -> torch.Tensor:
    """``[Vd]`` float32 drafter log-probs after ``prefix`` (target ids), unbatched."""
    state = drafter.initial_state((1,), torch.float64, hidden.device)  # [1, H]
    for token in prefix:
        state = drafter.update_state(state, embed(torch.tensor([token])))
    logits = drafter.logits(hidden[None], state)[0].float()  # [Vd]
    if top_k is not None and top_k < logits.numel():
        kth = sorted(logits.tolist(), reverse=True)[top_k - 1]
        logits = torch.where(logits >= kth, logits, torch.tensor(float("-inf")))
    return logits.log_softmax(dim=-1)


def to_target(drafter: TableDrafter, draft_id: int) -> int:
    if drafter.draft_vocab is None:
        return draft_id
    return int(drafter.draft_vocab[draft_id])


def naive_beam_search(
    drafter: TableDrafter,
    embed,  # noqa: ANN001
    hidden: torch.Tensor,
    init: int,
    width: int,
    length: int,
    top_k: int | None = None,
) -> tuple[list[list[int]], list[float]]:
    """Textbook beam search with Python lists, for one request.

    Extensions with a finite score are ranked by (score desc, parent, token); missing
    beams are filled with copies of the best one at ``-inf``.
    """
    beams: list[tuple[list[int], torch.Tensor]] = [([init], torch.tensor(0.0))]
    for _ in range(length - 1):
        candidates = []
        for parent, (seq, score) in enumerate(beams):
            if math.isinf(score.item()):
                continue
            log_q = prefix_log_probs(drafter, embed, hidden, seq, top_k)  # [Vd]
            for draft_id, lq in enumerate(log_q):
                if not math.isinf(lq.item()):
                    candidates.append((score + lq, parent, draft_id))
        candidates.sort(key=lambda c: (-c[0].item(), c[1], c[2]))
        beams = [
            (beams[parent][0] + [to_target(drafter, draft_id)], score)
            for score, parent, draft_id in candidates[:width]
        ]
        while len(beams) < width:
            beams.append((list(beams[0][0]), torch.tensor(float("-inf"))))
    return [seq for seq, _ in beams], [score.item() for _, score in beams]


def exhaustive(
    drafter: TableDrafter,
    embed,  # noqa: ANN001
    hidden: torch.Tensor,
    init: int,
    length: int,
    vocab: int,
) -> list[tuple[float, list[int]]]:
    """All draft sequences of ``length - 1`` tokens with joint log-probs, best first."""
    scored = []
    for draft in itertools.product(range(vocab), repeat=length - 1):
        seq, total = [init], torch.tensor(0.0)
        for draft_id in draft:
            log_q = prefix_log_probs(drafter, embed, hidden, seq, None)  # [Vd]
            total = total + log_q[draft_id]
            seq = seq + [to_target(drafter, draft_id)]
        scored.append((total.item(), seq))
    scored.sort(key=lambda item: -item[0])
    return scored


def setup_problem(
    generator: torch.Generator, batch: int, vocab: int, **drafter_kwargs: object
) -> tuple[TableDrafter, object, torch.Tensor, torch.Tensor]:
    target_vocab = max(vocab, 1 + max(drafter_kwargs.get("draft_vocab") or [0]))
    drafter = TableDrafter(generator, vocab, **drafter_kwargs)  # type: ignore[arg-type]
    embed = make_embed(generator, target_vocab)
    hidden = torch.randn(batch, HIDDEN, generator=generator, dtype=torch.float64)
    init = torch.randint(target_vocab, (batch,), generator=generator)
    return drafter, embed, hidden, init


def assert_matches_naive(
    beams: Beams,
    drafter: TableDrafter,
    embed,  # noqa: ANN001
    hidden: torch.Tensor,
    init: torch.Tensor,
    top_k: int | None = None,
) -> None:
    width, length = beams.beam_width, beams.beam_length
    for b in range(hidden.shape[0]):
        seqs, scores = naive_beam_search(
            drafter, embed, hidden[b], int(init[b]), width, length, top_k
        )
        assert beams.tokens[b].tolist() == seqs
        torch.testing.assert_close(
            beams.scores[b], torch.tensor(scores), rtol=0, atol=1e-5
        )


# ------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("vocab", "width", "length"),
    [(6, 3, 4), (5, 2, 4), (4, 3, 3), (6, 1, 4), (3, 3, 2), (2, 3, 4)],
)
def test_matches_naive_reference(
    generator: torch.Generator, vocab: int, width: int, length: int
) -> None:
    drafter, embed, hidden, init = setup_problem(generator, 3, vocab)
    beams = beam_search(drafter, embed, hidden, init, width, length)
    assert beams.tokens.shape == (3, width, length)
    assert beams.tokens.dtype == torch.int64 and beams.scores.dtype == torch.float32
    assert beams.log_probs is None
    assert torch.equal(beams.tokens[:, :, 0], init[:, None].expand(3, width))
    assert_matches_naive(beams, drafter, embed, hidden, init)


@pytest.mark.parametrize(
    ("vocab", "width", "length"), [(2, 8, 4), (3, 9, 3), (2, 6, 3)]
)
def test_wide_search_is_exhaustive(
    generator: torch.Generator, vocab: int, width: int, length: int
) -> None:
    """With W >= Vd^(L-1) no prefix is ever pruned: beams = all sequences, sorted."""
    drafter, embed, hidden, init = setup_problem(generator, 2, vocab)
    beams = beam_search(drafter, embed, hidden, init, width, length)
    total = vocab ** (length - 1)
    for b in range(2):
        ranked = exhaustive(drafter, embed, hidden[b], int(init[b]), length, vocab)
        assert beams.tokens[b, :total].tolist() == [seq for _, seq in ranked]
        torch.testing.assert_close(
            beams.scores[b, :total],
            torch.tensor([score for score, _ in ranked]),
            atol=1e-5,
            rtol=0,
        )
        # Fillers: copies of beam 0 at -inf.
        assert torch.isneginf(beams.scores[b, total:]).all()
        assert (beams.tokens[b, total:] == beams.tokens[b, 0]).all()


def test_narrow_search_scores_are_exact_joint_log_probs(
    generator: torch.Generator,
) -> None:
    """Beam search is not exhaustive, but each beam's score is its true joint log-prob,
    beams are distinct, sorted, and never beat the exhaustive optimum."""
    vocab, width, length = 5, 3, 4
    drafter, embed, hidden, init = setup_problem(generator, 3, vocab, sharpness=0.5)
    beams = beam_search(drafter, embed, hidden, init, width, length)
    for b in range(3):
        ranked = exhaustive(drafter, embed, hidden[b], int(init[b]), length, vocab)
        by_seq = {tuple(seq): score for score, seq in ranked}
        rows = beams.tokens[b].tolist()
        assert len({tuple(r) for r in rows}) == width
        for row, score in zip(rows, beams.scores[b].tolist(), strict=True):
            assert by_seq[tuple(row)] == pytest.approx(score, abs=1e-5)
        assert beams.scores[b, 0].item() <= ranked[0][0] + 1e-5
        assert (beams.scores[b, :-1] >= beams.scores[b, 1:]).all()


@pytest.mark.parametrize(("top_k", "width"), [(1, 3), (2, 3), (2, 5), (3, 2)])
def test_draft_top_k_and_fillers_match_naive(
    generator: torch.Generator, top_k: int, width: int
) -> None:
    vocab, length = 5, 4
    drafter, embed, hidden, init = setup_problem(generator, 2, vocab)
    beams = beam_search(drafter, embed, hidden, init, width, length, draft_top_k=top_k)
    assert_matches_naive(beams, drafter, embed, hidden, init, top_k)
    possible = top_k ** (length - 1)
    for b in range(2):
        finite = torch.isfinite(beams.scores[b])
        assert int(finite.sum()) == min(width, possible)
        # Every filler is a valid copy of the best beam.
        assert (beams.tokens[b, ~finite] == beams.tokens[b, 0]).all()


def test_top_k_one_is_greedy_chain(generator: torch.Generator) -> None:
    vocab, width, length = 6, 4, 4
    drafter, embed, hidden, init = setup_problem(generator, 1, vocab)
    beams = beam_search(drafter, embed, hidden, init, width, length, draft_top_k=1)
    seq = [int(init[0])]
    for _ in range(length - 1):
        seq.append(int(prefix_log_probs(drafter, embed, hidden[0], seq, None).argmax()))
    assert beams.tokens[0].tolist() == [seq] * width
    assert torch.isfinite(beams.scores[0, 0])
    assert torch.isneginf(beams.scores[0, 1:]).all()
    # Downstream dedup absorbs the fillers completely.
    assert build_tree(beams.tokens).num_nodes.tolist() == [length]


def test_width_larger_than_vocab_first_step(generator: torch.Generator) -> None:
    """Vd = 2, W = 3: step 1 has only 2 sequences, step 2 already has 4."""
    drafter, embed, hidden, init = setup_problem(generator, 2, 2)
    short = beam_search(drafter, embed, hidden, init, 3, 2)
    assert torch.isneginf(short.scores[:, 2]).all()
    assert torch.equal(short.tokens[:, 2], short.tokens[:, 0])
    first_drafts = short.tokens[:, :2, 1].sort(dim=1).values  # [B, 2]
    assert torch.equal(first_drafts, torch.tensor([[0, 1]] * 2))
    longer = beam_search(drafter, embed, hidden, init, 3, 3)
    assert torch.isfinite(longer.scores).all()
    assert_matches_naive(longer, drafter, embed, hidden, init)


def test_deterministic_and_calls_drafter_once_per_step(
    generator: torch.Generator,
) -> None:
    drafter, embed, hidden, init = setup_problem(generator, 4, 6)
    first = beam_search(drafter, embed, hidden, init, 3, 4, return_log_probs=True)
    assert drafter.calls == 3  # L - 1 batched steps
    second = beam_search(drafter, embed, hidden, init, 3, 4, return_log_probs=True)
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.scores, second.scores)
    assert first.log_probs is not None and second.log_probs is not None
    assert torch.equal(first.log_probs, second.log_probs)


def test_log_probs_history_semantics(generator: torch.Generator) -> None:
    """hist[b, i, k] is the distribution that produced tokens[b, i, k+1]."""
    vocab, width, length = 5, 3, 4
    drafter, embed, hidden, init = setup_problem(generator, 2, vocab)
    beams = beam_search(
        drafter,
        embed,
        hidden,
        init,
        width,
        length,
        draft_top_k=3,
        return_log_probs=True,
    )
    hist = beams.log_probs
    assert hist is not None and hist.shape == (2, width, length - 1, vocab)
    assert hist.dtype == torch.float32
    for b in range(2):
        for i in range(width):
            row = beams.tokens[b, i].tolist()
            total = 0.0
            for k in range(length - 1):
                expected = prefix_log_probs(drafter, embed, hidden[b], row[: k + 1], 3)
                torch.testing.assert_close(hist[b, i, k], expected, atol=1e-6, rtol=0)
                total += hist[b, i, k, row[k + 1]].item()
            assert total == pytest.approx(beams.scores[b, i].item(), abs=1e-5)


def test_draft_vocab_maps_to_target_ids(generator: torch.Generator) -> None:
    draft_vocab = [3, 7, 8, 11]
    drafter, embed, hidden, init = setup_problem(
        generator, 2, len(draft_vocab), draft_vocab=draft_vocab
    )
    beams = beam_search(drafter, embed, hidden, init, 3, 4, return_log_probs=True)
    assert set(beams.tokens[:, :, 1:].unique().tolist()) <= set(draft_vocab)
    assert beams.log_probs is not None and beams.log_probs.shape[-1] == len(draft_vocab)
    assert_matches_naive(beams, drafter, embed, hidden, init)


@pytest.mark.parametrize(
    ("width", "length", "top_k", "message"),
    [(0, 3, None, "beam_width"), (2, 1, None, "beam_length"), (2, 3, 0, "draft_top_k")],
)
def test_rejects_bad_arguments(
    generator: torch.Generator, width: int, length: int, top_k: int | None, message: str
) -> None:
    drafter, embed, hidden, init = setup_problem(generator, 1, 4)
    with pytest.raises(ValueError, match=message):
        beam_search(drafter, embed, hidden, init, width, length, draft_top_k=top_k)


def test_rejects_mismatched_init_tokens(generator: torch.Generator) -> None:
    drafter, embed, hidden, _ = setup_problem(generator, 2, 4)
    with pytest.raises(ValueError, match="init_tokens"):
        beam_search(drafter, embed, hidden, torch.tensor([1]), 2, 3)


# ------------------------------------------------------------- one beam: the chain


@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("draft_vocab", [None, [3, 7, 8, 11, 12, 13]])
def test_one_beam_chain_matches_the_wide_search(
    generator: torch.Generator, top_k: int | None, draft_vocab: list[int] | None
) -> None:
    drafter, embed, hidden, init = setup_problem(generator, 3, 6, draft_vocab=draft_vocab)
    wide = _wide_search(drafter, embed, hidden, init, 1, 5, top_k, False)
    chain = beam_search(drafter, embed, hidden, init, 1, 5, draft_top_k=top_k)
    assert chain.tokens.shape == (3, 1, 5) and chain.tokens.dtype == torch.int64
    assert torch.equal(chain.tokens, wide.tokens)
    assert chain.scores is not None and chain.scores.dtype == torch.float32
    torch.testing.assert_close(chain.scores, wide.scores, rtol=0, atol=1e-6)
    bare = beam_search(drafter, embed, hidden, init, 1, 5, draft_top_k=top_k,
                       with_scores=False)
    assert bare.scores is None and torch.equal(bare.tokens, wide.tokens)


def test_one_beam_never_ranks_beams(
    generator: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W = 1 takes the chain: no candidate ranking (negative control: W = 2 ranks)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ranked candidates")

    monkeypatch.setattr(beam_search_module, "_select_top", refuse)
    drafter, embed, hidden, init = setup_problem(generator, 2, 6)
    assert beam_search(drafter, embed, hidden, init, 1, 4).tokens.shape == (2, 1, 4)
    with pytest.raises(AssertionError, match="ranked"):
        beam_search(drafter, embed, hidden, init, 2, 4)
    with pytest.raises(AssertionError, match="ranked"):  # the history needs the wide loop
        beam_search(drafter, embed, hidden, init, 1, 4, return_log_probs=True)


def test_without_scores_wide_search_keeps_its_tokens(generator: torch.Generator) -> None:
    drafter, embed, hidden, init = setup_problem(generator, 2, 6)
    scored = beam_search(drafter, embed, hidden, init, 3, 4)
    bare = beam_search(drafter, embed, hidden, init, 3, 4, with_scores=False)
    assert bare.scores is None and torch.equal(bare.tokens, scored.tokens)


# ------------------------------------------------------------- real drafter module


@pytest.mark.parametrize("rnn", [True, False])
def test_real_recurrent_drafter_matches_naive(
    generator: torch.Generator, rnn: bool
) -> None:
    config_mod = pytest.importorskip("vllm_redrafter.config")
    drafter_mod = pytest.importorskip("vllm_redrafter.drafter")
    vocab, hidden_size = 6, 4
    config = config_mod.DrafterConfig(
        hidden_size=hidden_size,
        vocab_size=vocab + 3,
        exit_dim=5,
        num_draft_layers=1,
        rnn=rnn,
        draft_vocab=[0, 2, 3, 5, 7, 8],
    )
    drafter = drafter_mod.RecurrentDrafter(config, generator=generator).double()
    with torch.no_grad():
        drafter.lm_head.weight.mul_(40.0)  # make the draft distribution non-trivial
    table = torch.randn(
        vocab + 3, hidden_size, generator=generator, dtype=torch.float64
    )  # [V, H]

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    hidden = torch.randn(2, hidden_size, generator=generator, dtype=torch.float64)
    init = torch.tensor([1, 4])
    beams = beam_search(drafter, embed, hidden, init, 3, 4, draft_top_k=4)
    assert set(beams.tokens[:, :, 1:].unique().tolist()) <= set(config.draft_vocab)
    assert_matches_naive(beams, drafter, embed, hidden, init, top_k=4)


def test_real_drafter_chain_without_scores_uses_best_draft(
    generator: torch.Generator,
) -> None:
    """The unscored chain asks ``best_draft`` (no log-sum-exp); the scored one asks
    ``top_candidates``; both give the naive search's tokens."""
    config_mod = pytest.importorskip("vllm_redrafter.config")
    drafter_mod = pytest.importorskip("vllm_redrafter.drafter")
    config = config_mod.DrafterConfig(hidden_size=4, vocab_size=9, exit_dim=8,
                                      num_draft_layers=2, draft_vocab=[0, 2, 3, 5, 7, 8])
    drafter = drafter_mod.RecurrentDrafter(config, generator=generator).double()
    with torch.no_grad():
        drafter.lm_head.weight.mul_(40.0)
    table = torch.randn(9, 4, generator=generator, dtype=torch.float64)  # [V, H]
    hidden = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    init = torch.tensor([1, 4, 6])
    asked = {"best_draft": 0, "top_candidates": 0}
    for name in asked:
        method = getattr(drafter, name)

        def counted(*args: object, _method=method, _name=name, **kwargs: object):  # noqa: ANN202
            asked[_name] += 1
            return _method(*args, **kwargs)

        setattr(drafter, name, counted)
    bare = beam_search(drafter, lambda ids: table[ids], hidden, init, 1, 4,
                       with_scores=False)
    assert asked == {"best_draft": 3, "top_candidates": 0}
    scored = beam_search(drafter, lambda ids: table[ids], hidden, init, 1, 4)
    assert asked == {"best_draft": 3, "top_candidates": 3}
    assert torch.equal(bare.tokens, scored.tokens)
    assert_matches_naive(scored, drafter, lambda ids: table[ids], hidden, init)

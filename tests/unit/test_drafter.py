# SPDX-License-Identifier: Apache-2.0
"""RecurrentDrafter: parameter layout, shapes, the formulas, train/inference parity."""

import pytest
import torch
import torch.nn.functional as F

from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.drafter import RecurrentDrafter, torch_dtype

H = 4  # target hidden size
V = 11  # target vocab


def _make(
    *, rnn=True, exit_dim=2 * H, layers=2, draft_vocab=None, seed=0
) -> RecurrentDrafter:
    cfg = DrafterConfig(
        hidden_size=H,
        vocab_size=V,
        exit_dim=exit_dim,
        num_draft_layers=layers,
        rnn=rnn,
        draft_vocab=draft_vocab,
    )
    gen = torch.Generator().manual_seed(seed)
    model = RecurrentDrafter(cfg, generator=gen).to(torch.float64)
    # Make lm_head as large as the other layers so that logits differ visibly.
    with torch.no_grad():
        model.lm_head.weight.uniform_(-0.5, 0.5, generator=gen)
    return model


def _randn(*shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


VARIANTS = {
    "rnn": dict(rnn=True),
    "rnn-proj": dict(rnn=True, exit_dim=6),
    "sum": dict(rnn=False),
    "sum-proj-draftvocab": dict(rnn=False, exit_dim=5, draft_vocab=[0, 2, 3, 7, 10]),
    "rnn-nolayers-draftvocab": dict(rnn=True, layers=0, draft_vocab=[1, 4, 9]),
}


def _reference_logits(model: RecurrentDrafter, hidden, embeds_seq):
    """Hand-written Apple formula from the raw parameters.

    hidden: [B, H]; embeds_seq: list of [B, H] embeddings e_1..e_k; returns [B, Vd]
    logits after consuming all of them.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    state = torch.zeros_like(hidden)
    for e in embeds_seq:
        if model.config.rnn:
            pre = e @ params["rnn_w.weight"].T + state @ params["rnn_u.weight"].T
            state = F.silu(pre + params["rnn_u.bias"])
        else:
            state = state + e
    z = torch.cat([hidden, state], dim=-1)
    if model.config.has_input_proj:
        z = z @ params["input_proj.weight"].T + params["input_proj.bias"]
    for i in range(model.config.num_draft_layers):
        w, b = params[f"layers.{i}.linear.weight"], params[f"layers.{i}.linear.bias"]
        z = z + F.silu(z @ w.T + b)
    return z @ params["lm_head.weight"].T


# ------------------------------------------------------------------- layout


def test_parameter_keys_and_shapes_rnn_with_proj():
    model = _make(rnn=True, exit_dim=6, layers=2, draft_vocab=[1, 5, 7])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "input_proj.weight": (6, 2 * H),
        "input_proj.bias": (6,),
        "rnn_w.weight": (H, H),
        "rnn_u.weight": (H, H),
        "rnn_u.bias": (H,),
        "layers.0.linear.weight": (6, 6),
        "layers.0.linear.bias": (6,),
        "layers.1.linear.weight": (6, 6),
        "layers.1.linear.bias": (6,),
        "lm_head.weight": (3, 6),
        "draft_vocab": (3,),
    }
    assert model.draft_vocab.dtype == torch.int64
    assert model.draft_vocab.tolist() == [1, 5, 7]
    # the draft_vocab buffer is not a parameter
    assert model.num_parameters() == 6 * 8 + 6 + 2 * (H * H) + H + 2 * (36 + 6) + 18


def test_parameter_keys_sum_without_proj():
    model = _make(rnn=False, layers=1)
    assert sorted(model.state_dict()) == [
        "layers.0.linear.bias",
        "layers.0.linear.weight",
        "lm_head.weight",
    ]
    assert model.lm_head.bias is None
    assert model.draft_vocab is None
    assert model.num_parameters() == (2 * H) * (2 * H) + 2 * H + V * 2 * H


def test_init_is_reproducible_with_generator():
    cfg = DrafterConfig(hidden_size=H, vocab_size=V, exit_dim=6, num_draft_layers=1)
    a = RecurrentDrafter(cfg, generator=torch.Generator().manual_seed(3))
    b = RecurrentDrafter(cfg, generator=torch.Generator().manual_seed(3))
    c = RecurrentDrafter(cfg, generator=torch.Generator().manual_seed(4))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.rnn_u.weight, c.rnn_u.weight)
    # default nn.Linear bound for rnn_u (fan_in = H) and a small lm_head
    assert a.rnn_u.weight.abs().max() <= 1 / H**0.5
    assert a.rnn_u.weight.abs().max() > 0.1
    assert a.lm_head.weight.std() < 0.05


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_train_shapes(variant):
    model = _make(**VARIANTS[variant])
    vd = model.draft_vocab_size
    out = model.forward_train(_randn(2, 5, H), _randn(2, 5, H, seed=2), num_steps=3)
    assert out.shape == (2, 3, 5, vd)
    assert out.dtype == torch.float64
    state = model.initial_state((2, 3))
    assert state.shape == (2, 3, H) and state.dtype == torch.float64
    assert torch.count_nonzero(state) == 0
    new_state = model.update_state(state, _randn(2, 3, H))
    assert new_state.shape == (2, 3, H)
    assert model.logits(_randn(2, 3, H), new_state).shape == (2, 3, vd)


def test_logits_broadcasts_hidden_over_beams():
    model = _make(exit_dim=6)
    hidden = _randn(2, 1, H)  # [B, 1, H]
    state = _randn(2, 3, H, seed=5)  # [B, W, H]
    out = model.logits(hidden, state)
    expected = model.logits(hidden.expand(2, 3, H).contiguous(), state)
    assert out.shape == (2, 3, V)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_forward_train_validates_inputs():
    model = _make()
    with pytest.raises(ValueError, match="num_steps"):
        model.forward_train(_randn(1, 3, H), _randn(1, 3, H), 0)
    with pytest.raises(ValueError, match="token_embeds"):
        model.forward_train(_randn(1, 3, H), _randn(1, 4, H), 1)
    with pytest.raises(ValueError, match="hidden"):
        model.forward_train(_randn(1, 3, H + 1), _randn(1, 3, H + 1), 1)


# ------------------------------------------------------------------ formulas


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_hand_written_reference(variant):
    model = _make(**VARIANTS[variant])
    hidden = _randn(3, H, seed=10)
    embeds = [_randn(3, H, seed=11 + k) for k in range(3)]
    state = model.initial_state((3,))
    for k, e in enumerate(embeds):
        state = model.update_state(state, e)
        expected = _reference_logits(model, hidden, embeds[: k + 1])
        torch.testing.assert_close(model.logits(hidden, state), expected)


def test_first_rnn_state_includes_bias_and_silu():
    model = _make(rnn=True)
    with torch.no_grad():
        model.rnn_u.bias.copy_(torch.tensor([-2.0, -0.5, 0.5, 3.0]))
    zeros = model.initial_state((1,))
    # zero embedding: s_1 = SiLU(0 + U*0 + b) = SiLU(b), not 0 and not b
    s1 = model.update_state(zeros, torch.zeros(1, H, dtype=torch.float64))
    expected = torch.tensor([[-2.0, -0.5, 0.5, 3.0]], dtype=torch.float64)
    expected = expected * torch.sigmoid(expected)
    torch.testing.assert_close(s1, expected)
    assert abs(s1[0, 3].item() - 2.8577223805) < 1e-9  # SiLU(3) = 3 * sigmoid(3)
    # non-zero embedding: s_1 = SiLU(W e + b)
    e = _randn(1, H, seed=4)
    s1 = model.update_state(zeros, e)
    pre = e @ model.rnn_w.weight.T + model.rnn_u.bias
    torch.testing.assert_close(s1, F.silu(pre))


def test_sum_variant_is_running_sum():
    model = _make(rnn=False)
    e1, e2 = _randn(2, H, seed=1), _randn(2, H, seed=2)
    s1 = model.update_state(model.initial_state((2,)), e1)
    s2 = model.update_state(s1, e2)
    torch.testing.assert_close(s1, e1, rtol=0, atol=0)
    torch.testing.assert_close(s2, e1 + e2, rtol=0, atol=0)


def test_concat_order_is_hidden_first():
    # input_proj ignores the second half of its input: logits must then depend on the
    # hidden state only. With state-first concatenation they would depend on the state.
    model = _make(rnn=True, exit_dim=6)
    with torch.no_grad():
        model.input_proj.weight[:, H:] = 0.0
    hidden = _randn(2, H, seed=1)
    state_a, state_b = _randn(2, H, seed=2), _randn(2, H, seed=3)
    out_a = model.logits(hidden, state_a)
    torch.testing.assert_close(out_a, model.logits(hidden, state_b), rtol=0, atol=0)
    other_hidden = _randn(2, H, seed=4)
    assert (model.logits(other_hidden, state_a) - out_a).abs().max() > 1e-3
    # and the swapped call is genuinely different
    assert (model.logits(state_a, hidden) - out_a).abs().max() > 1e-3


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_step_by_step_inference_reproduces_forward_train(variant):
    """Inference from h_t, feeding E(tok[t+1]), E(tok[t+2]), ... reproduces training.

    forward_train[:, i, t] must equal the logits after i+1 update_state calls with the
    embeddings of tokens t+1 .. t+i+1 (zeros past the end of the sequence).
    """
    model = _make(**VARIANTS[variant])
    batch, seq_len, num_steps = 2, 6, 4
    hidden = _randn(batch, seq_len, H, seed=20)
    embeds = _randn(batch, seq_len, H, seed=21)
    train = model.forward_train(hidden, embeds, num_steps)
    zero = torch.zeros(batch, H, dtype=torch.float64)
    for t in range(seq_len):
        state = model.initial_state((batch,))
        for i in range(num_steps):
            pos = t + i + 1
            state = model.update_state(state, embeds[:, pos] if pos < seq_len else zero)
            step = model.logits(hidden[:, t], state)
            torch.testing.assert_close(
                train[:, i, t], step, rtol=0, atol=1e-12, msg=f"t={t} step={i}"
            )


def test_forward_train_shift_convention_against_reference():
    # Step i at position t consumed tokens t+1..t+i+1: check one position explicitly.
    model = _make(rnn=True, exit_dim=6)
    hidden = _randn(1, 5, H, seed=30)
    embeds = _randn(1, 5, H, seed=31)
    train = model.forward_train(hidden, embeds, num_steps=2)
    expected = _reference_logits(model, hidden[:, 1], [embeds[:, 2], embeds[:, 3]])
    torch.testing.assert_close(train[:, 1, 1], expected)
    # consuming the tokens at t, t+1 instead (an off-by-one) gives different logits
    wrong = _reference_logits(model, hidden[:, 1], [embeds[:, 1], embeds[:, 2]])
    assert (train[:, 1, 1] - wrong).abs().max() > 1e-6


def test_forward_train_zero_fills_past_the_end():
    model = _make(rnn=True)
    hidden = _randn(1, 3, H, seed=40)
    embeds = _randn(1, 3, H, seed=41)
    train = model.forward_train(hidden, embeds, num_steps=3)
    zero = torch.zeros(1, H, dtype=torch.float64)
    expected = _reference_logits(model, hidden[:, 1], [embeds[:, 2], zero, zero])
    torch.testing.assert_close(train[:, 2, 1], expected)
    # the tail of the embeddings cannot influence earlier inputs: perturb position 0
    embeds2 = embeds.clone()
    embeds2[:, 0] += 1.0
    train2 = model.forward_train(hidden, embeds2, num_steps=3)
    torch.testing.assert_close(train2, train, rtol=0, atol=0)


# ------------------------------------------------------------- draft vocab


def test_draft_vocab_mapping_round_trip():
    draft_vocab = [0, 2, 3, 7, 10]
    model = _make(rnn=False, exit_dim=5, draft_vocab=draft_vocab)
    draft_ids = torch.tensor([[4, 0], [1, 3]])
    assert model.to_target_ids(draft_ids).tolist() == [[10, 0], [2, 7]]
    mapping = model.target_to_draft_map()
    assert mapping.dtype == torch.int64
    assert mapping.tolist() == [0, -1, 1, 2, -1, -1, -1, 3, -1, -1, 4]
    all_draft = torch.arange(len(draft_vocab))
    assert torch.equal(mapping[model.to_target_ids(all_draft)], all_draft)


def test_identity_mapping_without_draft_vocab():
    model = _make()
    ids = torch.tensor([0, 5, 10])
    assert model.to_target_ids(ids) is ids
    assert torch.equal(model.target_to_draft_map(), torch.arange(V))


def test_dtype_follows_module():
    model = _make(exit_dim=6).to(torch.bfloat16)
    hidden = _randn(1, 3, H).to(torch.bfloat16)
    embeds = _randn(1, 3, H, seed=2).to(torch.bfloat16)
    out = model.forward_train(hidden, embeds, 2)
    assert out.dtype == torch.bfloat16
    assert model.initial_state((2,)).dtype == torch.bfloat16


def test_draft_dtype_resolution():
    from vllm_redrafter.drafter import resolve_draft_dtype

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert resolve_draft_dtype("auto", f32, bf16, False) == bf16  # stored 16-bit: kept
    assert resolve_draft_dtype("auto", f32, f32, False) == f32
    assert resolve_draft_dtype("auto", bf16, f32, False) == bf16  # 16-bit target: its own
    assert resolve_draft_dtype("auto", f16, bf16, False) == f16
    assert resolve_draft_dtype("auto", f32, bf16, True) == f32  # target head: its dtype
    assert resolve_draft_dtype("float32", bf16, bf16, False) == f32
    with pytest.raises(ValueError, match="omit draft_dtype"):
        resolve_draft_dtype("bfloat16", f32, bf16, True)
    with pytest.raises(ValueError, match="draft_dtype must be"):
        resolve_draft_dtype("fp8", f32, bf16, False)


def test_dtype_names_are_one_map():
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match=r"unknown dtype 'bf16': use one of bfloat16, "
                                         r"float16, float32"):
        torch_dtype("bf16")


def test_best_draft_is_the_first_maximum_of_the_logits():
    model = _make()
    hidden, state = _randn(3, H, seed=2), _randn(3, H, seed=3)
    best = model.best_draft(hidden, state)  # [3]
    assert best.dtype == torch.int64 and best.shape == (3,)
    assert torch.equal(best, model.logits(hidden, state).argmax(dim=-1))

    class Fixed(torch.nn.Module):  # logits with ties at the maximum
        def forward(self, z):  # noqa: ANN001, ANN201
            rows = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0],
                                 [0.0, 0.0, 2.0, 2.0]], dtype=z.dtype)
            return rows[: z.shape[0]]

    model.lm_head = Fixed()
    assert model.best_draft(hidden, state).tolist() == [1, 0, 2]


class _ShardedHead(torch.nn.Module):
    """A vocab-sharded head (``tp_size > 1``) that only answers ``top_candidates``."""

    tp_size = 2

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[int] = []

    def forward(self, z):  # noqa: ANN001, ANN201
        raise AssertionError("all-gathered the logits")

    def top_candidates(self, z, k, top_k=None):  # noqa: ANN001, ANN201
        self.asked.append(k)
        shape = (*z.shape[:-1], k)
        return torch.zeros(shape), torch.full(shape, 7, dtype=torch.int64)


def test_best_draft_asks_a_sharded_head_for_its_top_candidate():
    model = _make()
    head = _ShardedHead()
    model.lm_head = head
    best = model.best_draft(_randn(2, H, seed=2), _randn(2, H, seed=3))
    assert best.tolist() == [7, 7] and head.asked == [1]
    head.tp_size = 1  # negative control: an unsharded head's logits are read
    with pytest.raises(AssertionError, match="all-gathered"):
        model.best_draft(_randn(2, H, seed=2), _randn(2, H, seed=3))

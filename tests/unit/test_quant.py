# SPDX-License-Identifier: Apache-2.0
"""Weight-only int8 / int4 drafting (``draft_int8``, ``draft_bits``,
:mod:`vllm_redrafter.quant`)."""

import pytest
import torch
from torch import nn

from vllm_redrafter.beam_search import beam_search
from vllm_redrafter.config import DrafterConfig
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.quant import (
    Int4Rows,
    Int8Rows,
    LowBitLinear,
    int4_fits,
    int4_supported,
    int8_supported,
    int8_wanted,
    low_bit_calls,
    low_bit_pays,
    quantize_drafter_linears,
    quantize_groups,
    quantize_rows,
)

pytestmark = pytest.mark.skipif(not int8_supported(), reason="no torch._weight_int8pack_mm")


def test_quantize_rows_literal():
    """The module docstring's example."""
    weight = torch.tensor([[0.5, -1.0, 0.25, 0.0], [2.0, 0.0, 0.0, -2.0]])
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8
    assert q.tolist() == [[64, -127, 32, 0], [127, 0, 0, -127]]
    assert torch.allclose(scale, torch.tensor([1 / 127, 2 / 127]))
    assert torch.allclose(q.float() * scale[:, None], weight, atol=0.5 / 127 * 2)


def test_int8_rows_close_to_bf16_product_and_used_only_where_it_applies():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    wrapped = LowBitLinear(linear, max_rows=4)
    x = torch.randn(2, 2, 64, generator=gen).to(torch.bfloat16)  # 4 rows: int8
    ref = linear(x).float()
    out = wrapped(x)
    assert out.shape == (2, 2, 96) and out.dtype == torch.bfloat16
    assert wrapped.quant.calls == 1
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert not torch.equal(out, linear(x))  # the int8 weights were really used
    # 5 rows, float32 input: the original layer, bit for bit
    big = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    assert torch.equal(wrapped(big), linear(big))
    assert wrapped.quant.calls == 1
    small32 = torch.randn(1, 64, generator=gen)  # float32 layer and input: never int8
    linear32 = nn.Linear(64, 8)
    wrapped32 = LowBitLinear(linear32)
    assert torch.equal(wrapped32(small32), linear32(small32))
    assert wrapped32.quant.calls == 0 and not Int8Rows(torch.zeros(8, 64)).applies(small32)


def _drafter() -> RecurrentDrafter:
    cfg = DrafterConfig(hidden_size=32, vocab_size=300, exit_dim=64, num_draft_layers=2,
                        rnn=True)
    torch.manual_seed(0)
    drafter = RecurrentDrafter(cfg)
    drafter.init_weights(torch.Generator().manual_seed(1))
    return drafter.to(torch.bfloat16).eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_drafter_drafts_like_the_original_at_batch_one(bits):
    if bits == 4 and not int4_supported():
        pytest.skip("no CPU int4 product in torch")
    drafter = _drafter()
    embed = nn.Embedding(300, 32).to(torch.bfloat16)
    hidden = torch.randn(1, 32).to(torch.bfloat16)  # [B=1, H]
    init = torch.tensor([7])
    with torch.inference_mode():
        ref = beam_search(drafter, embed, hidden, init, 2, 4)
    wrapped = quantize_drafter_linears(drafter, bits=bits)
    assert wrapped == len([m for m in drafter.modules() if isinstance(m, LowBitLinear)])
    assert wrapped >= 4  # ResBlocks, RNN, head
    # int4 for the RNN and ResBlocks (32 / 64 wide); the 300-row head stays int8
    assert {type(m.quant) for m in drafter.modules() if isinstance(m, LowBitLinear)} == (
        {Int8Rows, Int4Rows} if bits == 4 else {Int8Rows})
    with torch.inference_mode():
        out = beam_search(drafter, embed, hidden, init, 2, 4)
    assert low_bit_calls(drafter) > 0
    # near-identical weights: the best beam's first drafted token agrees
    assert out.tokens[0, 0, 1] == ref.tokens[0, 0, 1]
    assert quantize_drafter_linears(drafter) == 0  # already wrapped: idempotent


def test_int8_is_wanted_by_default_only_where_it_can_serve(monkeypatch):
    """``draft_int8: "auto"`` (the default) keeps int8 copies for bfloat16 drafting on
    CPU only; ``True`` / ``False`` are obeyed as given. Negative control: a torch without
    the int8 product turns ``"auto"`` off."""
    bf16, fp32 = torch.bfloat16, torch.float32
    assert int8_wanted("auto", "cpu", bf16) is True
    assert int8_wanted("auto", "cuda", bf16) is False
    assert int8_wanted("auto", "cpu", fp32) is False
    assert int8_wanted(True, "cuda", bf16) is True
    assert int8_wanted(False, "cpu", bf16) is False
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    assert int8_wanted("auto", "cpu", bf16) is False


def test_int8_pays_compares_both_products_as_measured():
    """``"auto"`` keeps int8 only where it measures faster: the decision follows the two
    timings (a fake clock: the original product first, then the int8 one); both
    products are really run."""
    weight = torch.randn(32, 16).to(torch.bfloat16)
    ran = []

    def fake(times):
        clock = iter(times)

        def measure(fn):
            ran.append(fn())
            return next(clock)
        return measure

    assert low_bit_pays(weight, 8, fake([0.9, 0.3])) == (True, 0.9, 0.3)
    assert low_bit_pays(weight, 8, fake([0.3, 0.9])) == (False, 0.3, 0.9)
    assert [tuple(y.shape) for y in ran] == [(1, 32)] * 4
    assert not torch.equal(ran[0], ran[1])  # the second product is the int8 one
    pays, plain, quantized = low_bit_pays(weight)  # the real clock: positive timings
    assert plain > 0 and quantized > 0 and pays == (quantized < plain)


needs_int4 = pytest.mark.skipif(not int4_supported(), reason="no CPU int4 product in torch")


def test_quantize_groups_literal():
    """The docstring's example: one group ``[0.0, 1.5, 3.0, -1.5]``."""
    codes, scale, low = quantize_groups(torch.tensor([[0.0, 1.5, 3.0, -1.5]]), group_size=4)
    assert codes.tolist() == [[5, 10, 15, 0]]
    assert torch.allclose(scale, torch.tensor([[0.3]])) and low.tolist() == [[-1.5]]


@needs_int4
def test_int4_rows_match_their_dequantized_weight_and_halve_int8():
    """The int4 product equals ``x @ dequantized.T`` (to bfloat16 rounding), is close to
    the original product, and holds half the weight bytes of the int8 copy."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 64, generator=gen) * 0.05).to(torch.bfloat16)  # [N, K]
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)  # [rows, K]
    int4 = Int4Rows(weight)
    codes, scale, low = quantize_groups(weight)
    deq = (low[..., None] + codes.view(96, 2, 32).float() * scale[..., None]).view(96, 64)
    out = int4(x).float()  # [3, 96]
    ref = x.float() @ deq.T
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    exact = x.float() @ weight.float().T
    assert (out - exact).abs().max() < 0.15 * exact.abs().max()
    assert not torch.allclose(out, exact, atol=1e-3)  # really the 4-bit weights
    assert int4.packed.numel() * 2 == Int8Rows(weight).qweight.numel()
    assert int4.calls == 1 and int4.bits == 4
    assert int4.applies(x) and not int4.to(torch.float32).applies(x)  # scales follow .to()


@needs_int4
def test_draft_bits_4_uses_int4_where_the_shape_allows_and_int8_elsewhere():
    """Negative control: with ``bits=8`` no layer holds int4 weights."""
    fits, odd = nn.Linear(64, 32, bias=False), nn.Linear(64, 40, bias=False)  # N=40: no
    assert int4_fits(fits.weight) and not int4_fits(odd.weight)
    model = nn.Sequential(fits, odd).to(torch.bfloat16)
    assert quantize_drafter_linears(model, bits=4) == 2
    assert [type(m.quant) for m in model] == [Int4Rows, Int8Rows]
    again = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    quantize_drafter_linears(again, bits=8)
    assert type(again[0].quant) is Int8Rows
    with pytest.raises(ValueError, match="int4 needs"):
        Int4Rows(odd.weight)

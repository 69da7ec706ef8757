# SPDX-License-Identifier: Apache-2.0
"""Weight-only int8 / int4 for the drafter's linear layers at small batches (vLLM-free).

At batch 1 a drafting step multiplies one to ``W`` rows by each weight matrix: the cost is
reading the weights (the own head alone is ``8,192 x 1,152``), not the arithmetic. Keeping
a second copy of each weight as int8 with one scale per output row halves the bytes read
against bfloat16. The int8 product is used only where it was measured to win (CPU,
bfloat16 activations, at most ``max_rows`` rows: on this project's 2-core CPU a W=4, L=5
beam search at batch 1 drops from 9.4 to 6.6 ms, while at 8 or more rows the int8 kernel
is slower than bfloat16); every other call uses the original weight unchanged. With
``draft_bits = 4`` the copies are 4-bit (:class:`Int4Rows`, half the bytes again): inside
an engine the target's forward evicts the drafter's weights from the caches between
drafting steps, so each step reads them from memory and its time follows their bytes (a
W=1, L=5 search with cold caches: 5.1-5.8 ms in int8, 3.4-4.3 ms in int4).

Drafts are proposals that the target verifies exactly, so the small rounding of the
weights can change which tokens are drafted but never the output.

Example: a ``Linear(4, 2)`` with weight rows ``[0.5, -1.0, 0.25, 0.0]`` and
``[2.0, 0.0, 0.0, -2.0]`` is stored as int8 rows ``[64, -127, 32, 0]`` (scale
``1/127``) and ``[127, 0, 0, -127]`` (scale ``2/127``); ``y = (x @ q.T) * scale``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from vllm_redrafter.logger import get_logger

logger = get_logger(__name__)

LOW_BIT_MAX_ROWS = 4
"""Largest number of rows (batch x beams in one call) sent to the int8 or int4 product:
both measured faster than bfloat16 up to 4 rows and not from 8 (``docs/bench/draft_int8.md``,
``docs/bench/draft_int4.md``)."""

INT4_GROUP = 32
"""Columns per scale and offset of the int4 copies (every drafter width here is a
multiple of 32: 576, 1,152)."""


def int8_supported() -> bool:
    """Whether this torch build has the weight-only int8 product (a private ATen op)."""
    return hasattr(torch, "_weight_int8pack_mm")


def int8_wanted(option: bool | str, device_type: str, draft_dtype: torch.dtype) -> bool:
    """Whether a proposer keeps int8 copies of its drafter's weights (``draft_int8``).

    ``"auto"`` keeps them only where they can serve: ``device_type == "cpu"``, a
    bfloat16 drafter and a torch with the int8 product; ``True`` / ``False`` are
    obeyed as given (the caller warns when ``True`` cannot apply). Examples:
    ``("auto", "cpu", bfloat16) -> True`` (with the product), ``("auto", "cuda",
    bfloat16) -> False``, ``("auto", "cpu", float32) -> False``, ``(True, "cuda",
    bfloat16) -> True``.
    """
    if option == "auto":
        return (device_type == "cpu" and draft_dtype == torch.bfloat16
                and int8_supported())
    return bool(option)


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls (one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def low_bit_pays(weight: torch.Tensor, bits: int = 8,
                 measure: Callable[[Callable[[], object]], float] = median_ms,
                 low: LowBitRows | None = None) -> tuple[bool, float, float]:
    """Whether the low-bit product (:func:`low_bit_rows`) beats the original one on this
    machine, measured.

    Times one row through ``weight [N, K]`` (bfloat16; the drafter's largest product,
    its head) both ways: ``(low-bit faster, original ms, low-bit ms)``. Used by
    ``draft_int8: "auto"`` so that a CPU whose int8/int4 kernels are slow keeps
    bfloat16 (on this project's 2-core CPU, the 8,192 x 1,152 head: 0.87 ms -> 0.29 ms
    in int8). ``low``: the copy to time, already built from ``weight`` (so that the
    caller can keep it); by default one is built here.
    """
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)  # [1, K]
    low = low if low is not None else low_bit_rows(weight, bits)
    plain = measure(lambda: torch.nn.functional.linear(x, weight))
    quantized = measure(lambda: low(x))
    return quantized < plain, plain, quantized


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight [N, K]`` -> ``(q [N, K] int8, scale [N] float32)``
    with ``weight ~= q * scale[:, None]`` (see the module example)."""
    w = weight.detach().float()  # [N, K]
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q.contiguous(), scale


class LowBitRows(nn.Module):
    """A low-bit copy of a ``[N, K]`` weight and its product (base of :class:`Int8Rows`
    and :class:`Int4Rows`).

    ``applies(x)`` says whether ``x [*, K]`` takes the low-bit path (CPU, bfloat16,
    at most ``max_rows`` rows); ``calls`` counts the products computed (for tests and
    the bench).
    """

    bits = 0

    def __init__(self, max_rows: int) -> None:
        super().__init__()
        self.max_rows = max_rows
        self.calls = 0

    @property
    def act_dtype(self) -> torch.dtype:
        """The activations' dtype: that of the scales, which follows ``module.to()``."""
        raise NotImplementedError

    def applies(self, x: torch.Tensor) -> bool:
        """Whether ``x [*, K]`` takes the low-bit path (CPU, bfloat16, few rows)."""
        return (x.device.type == "cpu" and x.dtype == torch.bfloat16
                and self.act_dtype == torch.bfloat16
                and x.numel() <= self.max_rows * x.shape[-1])

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat [rows, K]`` -> ``[rows, N]``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [*, K]`` -> ``[*, N]`` (no bias)."""
        self.calls += 1
        y = self.product(x.reshape(-1, x.shape[-1]))  # [rows, N]
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Int8Rows(LowBitRows):
    """An int8 copy of a ``[N, K]`` weight (one scale per row) and its product.

    Args:
        weight: ``[N, K]``; its dtype is the activations' (only bfloat16 takes the
            int8 path).
        max_rows: largest ``rows = x.numel() / K`` sent to the int8 product.
    """

    bits = 8

    def __init__(self, weight: torch.Tensor, max_rows: int = LOW_BIT_MAX_ROWS) -> None:
        super().__init__(max_rows)
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q.to(weight.device), persistent=False)  # [N, K]
        self.register_buffer("scale", scale.to(weight.device, weight.dtype),
                             persistent=False)  # [N]

    @property
    def act_dtype(self) -> torch.dtype:
        return self.scale.dtype

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(flat, self.qweight, self.scale)  # [rows, N]


def int4_supported() -> bool:
    """Whether this torch build has the CPU weight-only int4 product (private ATen ops)."""
    return (hasattr(torch, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch, "_convert_weight_to_int4pack_for_cpu"))


def int4_fits(weight: torch.Tensor, group_size: int = INT4_GROUP) -> bool:
    """Whether ``weight [N, K]`` has the shape the int4 kernel takes (``N % 16 == 0``,
    ``K % group_size == 0``)."""
    rows, cols = weight.shape
    return rows % 16 == 0 and cols % group_size == 0


def quantize_groups(weight: torch.Tensor, group_size: int = INT4_GROUP
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group of ``group_size`` consecutive columns.

    ``weight [N, K]`` -> ``(codes [N, K] int32 in 0..15, scale [N, K/g], low [N, K/g])``
    float32, with ``weight ~= low + codes * scale`` group by group.

    Example: one group ``[0.0, 1.5, 3.0, -1.5]`` (``g = 4``) has ``low = -1.5``,
    ``scale = (3.0 - -1.5) / 15 = 0.3`` and codes ``[5, 10, 15, 0]``.
    """
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // group_size, group_size)  # [N, K/g, g]
    low = w.amin(dim=-1)  # [N, K/g]
    scale = ((w.amax(dim=-1) - low) / 15.0).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15)
    return codes.reshape(rows, cols).to(torch.int32), scale, low


class Int4Rows(LowBitRows):
    """A 4-bit copy of a ``[N, K]`` weight (:func:`quantize_groups`: a scale and an
    offset per group of ``group_size`` columns) and torch's CPU int4 product.

    Half the bytes of int8 again: at batch 1 a drafting step streams the drafter's
    weights from memory (the target's forward in between evicts them from the caches),
    so the product's time follows the bytes (``docs/bench/draft_int4.md``).

    Args:
        weight: ``[N, K]`` with :func:`int4_fits`; its dtype is the activations'.
        max_rows: largest ``rows`` sent to the int4 product.
        group_size: columns per scale and offset.
    """

    bits = 4

    def __init__(self, weight: torch.Tensor, max_rows: int = LOW_BIT_MAX_ROWS,
                 group_size: int = INT4_GROUP) -> None:
        super().__init__(max_rows)
        if not int4_fits(weight, group_size):
            raise ValueError(f"int4 needs a [N % 16 == 0, K % {group_size} == 0] weight, "
                             f"got {tuple(weight.shape)}")
        codes, scale, low = quantize_groups(weight, group_size)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.cpu(), 1)  # [N, K/2] uint8
        # the kernel computes (code - 8) * scale + zero, so zero = low + 8 * scale
        scales_zeros = torch.stack([scale.t(), (low + 8.0 * scale).t()], dim=-1)  # [K/g, N, 2]
        self.register_buffer("packed", packed.to(weight.device), persistent=False)
        self.register_buffer("scales_zeros", scales_zeros.to(weight.device, weight.dtype)
                             .contiguous(), persistent=False)
        self.group_size = group_size

    @property
    def act_dtype(self) -> torch.dtype:
        return self.scales_zeros.dtype

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                 self.scales_zeros)  # [rows, N]


def low_bit_rows(weight: torch.Tensor, bits: int, max_rows: int = LOW_BIT_MAX_ROWS
                 ) -> LowBitRows:
    """:class:`Int4Rows` for ``bits == 4`` where the weight's shape and this torch allow
    it, else :class:`Int8Rows`."""
    if bits == 4 and int4_supported() and int4_fits(weight):
        return Int4Rows(weight, max_rows)
    return Int8Rows(weight, max_rows)


class LowBitLinear(nn.Module):
    """A ``Linear`` that also holds its weight in int8 or int4 (:func:`low_bit_rows`)
    and uses it for the calls it applies to; every other call runs the original layer
    unchanged.

    Args:
        linear: the layer to wrap (kept).
        max_rows: see :class:`LowBitRows`.
        bits: 8 or 4.
    """

    def __init__(self, linear: nn.Linear, max_rows: int = LOW_BIT_MAX_ROWS,
                 bits: int = 8) -> None:
        super().__init__()
        self.linear = linear
        self.quant = low_bit_rows(linear.weight, bits, max_rows)

    @property
    def weight(self) -> torch.Tensor:
        """The original weight (what the rest of the drafter reads for dtype/device)."""
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant.applies(x):
            return self.linear(x)
        y = self.quant(x)
        return y if self.linear.bias is None else y + self.linear.bias


def quantize_drafter_linears(module: nn.Module, max_rows: int = LOW_BIT_MAX_ROWS,
                             bits: int = 8) -> int:
    """Wrap every plain ``nn.Linear`` below ``module`` in :class:`LowBitLinear` (in
    place); returns how many were wrapped. Other modules (the target's shared head, a
    vocabulary-parallel head) are left alone."""
    if not int8_supported():
        logger.warning("draft_int8: this torch build has no weight-only int8 product "
                       "(torch._weight_int8pack_mm); drafting without it")
        return 0
    wrapped = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, LowBitLinear(child, max_rows, bits))
            wrapped += 1
        elif not isinstance(child, LowBitLinear):
            wrapped += quantize_drafter_linears(child, max_rows, bits)
    return wrapped


def low_bit_calls(module: nn.Module) -> int:
    """Products computed in int8 or int4 by every :class:`LowBitRows` below ``module``."""
    return sum(m.calls for m in module.modules() if isinstance(m, LowBitRows))

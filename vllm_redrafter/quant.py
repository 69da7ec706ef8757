# SPDX-License-Identifier: Apache-2.0
"""Weight-only int8 for the drafter's linear layers at small batches (vLLM-free).

At batch 1 a drafting step multiplies one to ``W`` rows by each weight matrix: the cost is
reading the weights (the own head alone is ``8,192 x 1,152``), not the arithmetic. Keeping
a second copy of each weight as int8 with one scale per output row halves the bytes read
against bfloat16. The int8 product is used only where it was measured to win (CPU,
bfloat16 activations, at most ``max_rows`` rows: on this project's 2-core CPU a W=4, L=5
beam search at batch 1 drops from 9.4 to 6.6 ms, while at 8 or more rows the int8 kernel
is slower than bfloat16); every other call uses the original weight unchanged.

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

INT8_MAX_ROWS = 4
"""Largest number of rows (batch x beams in one call) sent to the int8 product: measured
faster than bfloat16 up to 4 rows and slower from 8 (``docs/bench/draft_int8.md``)."""


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
def int8_pays(weight: torch.Tensor,
              measure: Callable[[Callable[[], object]], float] = median_ms
              ) -> tuple[bool, float, float]:
    """Whether the int8 product beats the original one on this machine, measured.

    Times one row through ``weight [N, K]`` (bfloat16; the drafter's largest product,
    its head) both ways: ``(int8 faster, original ms, int8 ms)``. Used by
    ``draft_int8: "auto"`` so that a CPU whose int8 kernel is slow keeps bfloat16
    (on this project's 2-core CPU, the 8,192 x 1,152 head: 0.87 ms -> 0.29 ms).
    """
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)  # [1, K]
    int8 = Int8Rows(weight)
    plain = measure(lambda: torch.nn.functional.linear(x, weight))
    quantized = measure(lambda: int8(x))
    return quantized < plain, plain, quantized


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight [N, K]`` -> ``(q [N, K] int8, scale [N] float32)``
    with ``weight ~= q * scale[:, None]`` (see the module example)."""
    w = weight.detach().float()  # [N, K]
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)  # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q.contiguous(), scale


class Int8Rows(nn.Module):
    """An int8 copy of a ``[N, K]`` weight (one scale per row) and its product.

    Args:
        weight: ``[N, K]``; its dtype is the activations' (only bfloat16 takes the
            int8 path).
        max_rows: largest ``rows = x.numel() / K`` sent to the int8 product.

    ``calls`` counts the products computed (for tests and the bench).
    """

    def __init__(self, weight: torch.Tensor, max_rows: int = INT8_MAX_ROWS) -> None:
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q.to(weight.device), persistent=False)  # [N, K]
        self.register_buffer("scale", scale.to(weight.device, weight.dtype),
                             persistent=False)  # [N]
        self.max_rows = max_rows
        self.calls = 0

    def applies(self, x: torch.Tensor) -> bool:
        """Whether ``x [*, K]`` takes the int8 path (CPU, bfloat16, few rows)."""
        return (x.device.type == "cpu" and x.dtype == torch.bfloat16
                and self.scale.dtype == torch.bfloat16
                and x.numel() <= self.max_rows * x.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [*, K]`` -> ``[*, N]`` (no bias)."""
        self.calls += 1
        flat = x.reshape(-1, x.shape[-1])  # [rows, K]
        y = torch._weight_int8pack_mm(flat, self.qweight, self.scale)  # [rows, N]
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Int8RowsLinear(nn.Module):
    """A ``Linear`` that also holds its weight in int8 (:class:`Int8Rows`) and uses it
    for the calls it applies to; every other call runs the original layer unchanged.

    Args:
        linear: the layer to wrap (kept).
        max_rows: see :class:`Int8Rows`.
    """

    def __init__(self, linear: nn.Linear, max_rows: int = INT8_MAX_ROWS) -> None:
        super().__init__()
        self.linear = linear
        self.int8 = Int8Rows(linear.weight, max_rows)

    @property
    def weight(self) -> torch.Tensor:
        """The original weight (what the rest of the drafter reads for dtype/device)."""
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.int8.applies(x):
            return self.linear(x)
        y = self.int8(x)
        return y if self.linear.bias is None else y + self.linear.bias


def quantize_drafter_linears(module: nn.Module, max_rows: int = INT8_MAX_ROWS) -> int:
    """Wrap every plain ``nn.Linear`` below ``module`` in :class:`Int8RowsLinear` (in
    place); returns how many were wrapped. Other modules (the target's shared head, a
    vocabulary-parallel head) are left alone."""
    if not int8_supported():
        logger.warning("draft_int8: this torch build has no weight-only int8 product "
                       "(torch._weight_int8pack_mm); drafting without it")
        return 0
    wrapped = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, Int8RowsLinear(child, max_rows))
            wrapped += 1
        elif not isinstance(child, Int8RowsLinear):
            wrapped += quantize_drafter_linears(child, max_rows)
    return wrapped


def int8_calls(module: nn.Module) -> int:
    """Products computed in int8 by every :class:`Int8Rows` below ``module``."""
    return sum(m.calls for m in module.modules() if isinstance(m, Int8Rows))

# SPDX-License-Identifier: Apache-2.0
"""Tree attention on vLLM's CPU backend, with no second copy of the KV cache.

vLLM's CPU kernel (``cpu_attention_with_kv_cache``) only knows causal masks, and it keeps
K/V in an ISA-specific packed layout (transposed per block for ``vec``, other packings
for ``vec16`` and ``amx``), so a tree mask cannot be passed to it and torch cannot read
the cache naively. This module registers a subclass of the CPU backend whose
implementation

1. runs the C++ kernel for the whole batch, as usual (every row that is not a drafted
   tree node is then already right: the root and any prompt rows are causal rows);
2. for the drafted nodes of the tree requests only, recomputes attention in torch over
   *committed context + ancestors-or-self*: the context K/V are gathered from the paged
   cache with a **layout map learnt from the backend's own cache writer** (at first use,
   a probe writes known values into a scratch block and records where each
   ``(head, token, dim)`` lands), the nodes' own K/V come from the forward's ``key`` /
   ``value``; one batched SDPA with a boolean mask covers every tree request;
3. keeps the nodes' K/V of every layer for the KV fix-up
   (:func:`vllm_redrafter.integration.runner.sample_with_trees`), which re-issues the
   backend's own writer for the accepted nodes.

Memory: nothing persistent beyond the layout map (two ``[Hkv, block, D]`` index
tensors); per step, the tree requests' context K/V of one layer at a time and the
nodes' K/V of every layer (``R x layers x 2 x Hkv x D``). Supported: standard decoder
attention (no ALiBi, sliding window, soft-cap or sinks; KV cache dtype ``auto``); the
proposer checks this at load time.

Glossary: ``B`` tree requests, ``n`` drafted nodes (``nmax`` padded), ``C`` context
tokens (``Cmax`` padded), ``Hq``/``Hkv`` query/KV heads, ``D`` head size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_redrafter.integration import runner as runner_state
from vllm_redrafter.integration.runner import LayerCapture, TreeVerifyStep

BACKEND_PATH = "vllm_redrafter.integration.tree_attention.TreeCPUAttentionBackend"

_LAYOUTS: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


class TreeCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with tree verification (same name and metadata)."""

    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionImpl]:
        return TreeCPUAttentionImpl


def unsupported_features(impl: Any) -> list[str]:
    """What in this attention layer tree attention does not implement."""
    found = []
    if getattr(impl, "alibi_slopes", None) is not None:
        found.append("ALiBi")
    if getattr(impl, "sliding_window", -1) not in (-1, None):
        found.append("sliding window")
    if getattr(impl, "logits_soft_cap", 0) not in (0, None):
        found.append("logits soft-cap")
    if getattr(impl, "sinks", None) is not None:
        found.append("attention sinks")
    if getattr(impl, "is_fp8_kv_cache", False):
        found.append(f"KV cache dtype {getattr(impl, 'kv_cache_dtype', '?')}")
    return found


class TreeCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU attention with tree rows recomputed under the tree mask (see module doc)."""

    def write_kv(self, layer: Any, key: torch.Tensor, value: torch.Tensor,
                 kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """The backend's own cache writer (no capture)."""
        CPUAttentionBackendImpl.do_kv_cache_update(self, layer, key, value, kv_cache,
                                                   slot_mapping)

    def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.write_kv(layer, key, value, kv_cache, slot_mapping)
        step = runner_state.current_tree_step()
        if step is None or key.shape[0] == 0:
            return
        rows = step.tree_rows.to(key.device)
        step.captures.append(LayerCapture(
            writer=self.write_kv, layer=layer, kv_cache=kv_cache,
            key=key[rows].clone(), value=value[rows].clone(),
            slots=slot_mapping[rows].clone()))

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        step = runner_state.current_tree_step()
        if step is None or attn_metadata is None or "mask" in step.disabled:
            return output
        self._tree_rows(layer, query, key, value, kv_cache, attn_metadata, output, step)
        return output

    def _tree_rows(self, layer: Any, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any,
                   output: torch.Tensor, step: TreeVerifyStep) -> None:
        """Overwrite the drafted nodes' attention output with the tree-masked one."""
        plan = step.attention_cache.get("plan")
        if plan is None:
            plan = _plan(step, attn_metadata.block_table, kv_cache.shape[2], query.device)
            step.attention_cache["plan"] = plan
        k_map, v_map = self._layout(layer, kv_cache)
        ctx_k, ctx_v = gather_context(kv_cache, plan["blocks"], k_map, v_map,
                                      plan["max_context"])  # [B, Cmax, Hkv, D] each
        node_rows = plan["node_rows"]  # [B, nmax] (padding -> row 0)
        q = query[node_rows]  # [B, nmax, Hq, D]
        k = torch.cat([ctx_k, key[node_rows]], dim=1)  # [B, Cmax + nmax, Hkv, D]
        v = torch.cat([ctx_v, value[node_rows]], dim=1)  # [B, Cmax + nmax, Hkv, D]
        out = tree_sdpa(q, k, v, plan["mask"], self.scale)  # [B, nmax, Hq, D]
        valid = plan["valid"]  # [B, nmax]
        output[node_rows[valid]] = out[valid].to(output.dtype)

    def _layout(self, layer: Any, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, num_kv_heads, block_size, twice_d = kv_cache.shape
        key = (getattr(layer, "isa", None), kv_cache.dtype, num_kv_heads, block_size, twice_d)
        if key not in _LAYOUTS:
            if not kv_cache.is_contiguous():
                raise RuntimeError("ReDrafter tree attention needs a contiguous CPU KV cache")

            def write(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                      slots: torch.Tensor) -> None:
                self.write_kv(layer, k, v, cache, slots)

            _LAYOUTS[key] = probe_cache_layout(write, num_kv_heads, block_size,
                                               twice_d // 2, kv_cache.dtype)
        return _LAYOUTS[key]


def probe_cache_layout(write: Any, num_kv_heads: int, block_size: int, head_size: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Learn where a cache writer puts every K and V element inside one block.

    Three probes write one full block of known small integers (exact in bf16/fp16):
    the token offset, the head dimension and the head index, each ``+ 1``, positive for
    K and negative for V. Every written element of the block then names its
    ``(K or V, head, token, dim)``.

    Args:
        write: ``write(key, value, kv_cache, slot_mapping)`` with the backend's writer.
        num_kv_heads, block_size, head_size: the cache geometry.
        dtype: the cache dtype.

    Returns:
        ``(k_map, v_map)``, each ``[Hkv, block, D]`` int64: flat offset inside a block
        (``kv_cache[b].view(-1)``) of that K / V element.

    Raises:
        RuntimeError: if the writer's layout is not a one-to-one placement.

    Example: for vLLM's ``vec`` ISA (K transposed per block, V plain),
    ``k_map[h, t, d] == h * 2 * block * D + d * block + t``.
    """
    shape = (block_size, num_kv_heads, head_size)
    token = torch.arange(block_size)[:, None, None].expand(shape)
    head = torch.arange(num_kv_heads)[None, :, None].expand(shape)
    dim = torch.arange(head_size)[None, None, :].expand(shape)
    planes = []
    for field in (token, dim, head):
        cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
        values = (field + 1).to(dtype)
        write(values.contiguous(), (-values).contiguous(), cache,
              torch.arange(block_size, dtype=torch.int64))
        planes.append(cache.view(-1).to(torch.float64))
    tok, dims, heads = planes
    written = tok != 0
    positions = torch.nonzero(written).squeeze(1)  # [2 * Hkv * block * D] ideally
    expected = 2 * num_kv_heads * block_size * head_size
    if positions.numel() != expected or not bool((dims[written] != 0).all()):
        raise RuntimeError(
            f"ReDrafter tree attention: the CPU KV-cache writer placed "
            f"{positions.numel()} of {expected} probe values; its layout is not supported"
        )
    is_value = tok[positions] < 0
    t = tok[positions].abs().long() - 1
    d = dims[positions].abs().long() - 1
    h = heads[positions].abs().long() - 1
    maps = []
    for select in (~is_value, is_value):
        m = torch.full((num_kv_heads, block_size, head_size), -1, dtype=torch.int64)
        m[h[select], t[select], d[select]] = positions[select]
        if int((m < 0).sum()) != 0 or int(select.sum()) != m.numel():
            raise RuntimeError("ReDrafter tree attention: the CPU KV-cache layout is not "
                               "a one-to-one placement of K and V")
        maps.append(m)
    return maps[0], maps[1]


def _plan(step: TreeVerifyStep, block_table: torch.Tensor, block_size: int,
          device: torch.device) -> dict[str, Any]:
    """Per-step gather plan shared by every layer.

    Returns ``blocks [B, nb]`` (block ids holding each request's context, padded with
    the last one), ``node_rows [B, nmax]``, ``valid [B, nmax]``, ``max_context`` and
    ``mask [B, nmax, Cmax + nmax]`` (True = visible).
    """
    reqs = step.requests
    max_context = max(r.context_len for r in reqs)
    max_nodes = max(r.num_drafts for r in reqs)
    num_blocks = -(-max_context // block_size)
    blocks = torch.zeros(len(reqs), num_blocks, dtype=torch.int64)
    node_rows = torch.zeros(len(reqs), max_nodes, dtype=torch.int64)
    valid = torch.zeros(len(reqs), max_nodes, dtype=torch.bool)
    mask = torch.zeros(len(reqs), max_nodes, max_context + max_nodes, dtype=torch.bool)
    table = block_table.cpu()
    for b, req in enumerate(reqs):
        used = -(-req.context_len // block_size)
        blocks[b, :used] = table[req.batch_index, :used]
        blocks[b, used:] = blocks[b, used - 1]
        n = req.num_drafts
        node_rows[b, :n] = torch.arange(req.root_row + 1, req.root_row + 1 + n)
        valid[b, :n] = True
        mask[b, :, : req.context_len] = True  # padding rows see the context: no NaN
        mask[b, :n, max_context : max_context + n] = req.mask
    return {"blocks": blocks.to(device), "node_rows": node_rows.to(device),
            "valid": valid.to(device), "mask": mask.to(device), "max_context": max_context}


def gather_context(kv_cache: torch.Tensor, blocks: torch.Tensor, k_map: torch.Tensor,
                   v_map: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the first ``length`` tokens of K and V through a learnt layout map.

    Args:
        kv_cache: ``[num_blocks, Hkv, block, 2 * D]`` one layer's paged cache.
        blocks: ``[B, nb]`` block ids in sequence order.
        k_map, v_map: ``[Hkv, block, D]`` flat offsets inside a block.
        length: tokens to return (``<= nb * block``).

    Returns:
        ``(k, v)``, each ``[B, length, Hkv, D]``.
    """
    batch, num_blocks = blocks.shape
    heads, block_size, head_size = k_map.shape
    flat = kv_cache.view(kv_cache.shape[0], -1)[blocks]  # [B, nb, Hkv * block * 2D]

    def read(index: torch.Tensor) -> torch.Tensor:
        picked = flat[:, :, index.reshape(-1).to(flat.device)]  # [B, nb, Hkv * block * D]
        picked = picked.view(batch, num_blocks, heads, block_size, head_size)
        picked = picked.permute(0, 1, 3, 2, 4)  # [B, nb, block, Hkv, D]
        return picked.reshape(batch, num_blocks * block_size, heads, head_size)[:, :length]

    return read(k_map), read(v_map)


def tree_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Masked attention in float32 with grouped KV heads.

    Args:
        q: ``[B, n, Hq, D]``; k, v: ``[B, S, Hkv, D]``; mask: ``[B, n, S]`` bool
        (True = visible; every row must see at least one key).

    Returns:
        ``[B, n, Hq, D]`` float32.
    """
    qh = q.float().transpose(1, 2)  # [B, Hq, n, D]
    group = q.shape[2] // k.shape[2]
    kh = k.float().transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    vh = v.float().transpose(1, 2).repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)  # [B, n, Hq, D]

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
3. records every layer's cache for the KV fix-up (:func:`move_tree_kv`, called by
   :func:`vllm_redrafter.integration.runner.sample_with_trees`), which copies the
   accepted nodes' K/V between slots through the same learnt layout map (so it is as
   layout- and ISA-independent as the backend's own writer).

Memory: nothing persistent beyond the layout map (two ``[Hkv, block, D]`` index
tensors); per step, the gather indices of the tree requests' context (``B x Cmax x
Hkv x D`` int64, shared by all layers) and that context's K/V for one layer at a time. Supported: standard decoder
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
from vllm_redrafter.integration.runner import TreeVerifyStep

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
        """The backend's own cache writer."""
        CPUAttentionBackendImpl.do_kv_cache_update(self, layer, key, value, kv_cache,
                                                   slot_mapping)

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor, attn_metadata: Any,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        step = runner_state.current_tree_step()
        if step is None or attn_metadata is None:
            return output
        plan = step.attention_cache.get("plan")
        if plan is None:
            k_map, v_map = self._layout(layer, kv_cache)
            plan = _plan(step, attn_metadata.block_table, attn_metadata.slot_mapping,
                         kv_cache, k_map, v_map, query.device)
            step.attention_cache["plan"] = plan
            step.kv_mover = move_tree_kv
        step.kv_caches.append(kv_cache)
        if "mask" not in step.disabled:
            self._tree_rows(query, kv_cache, output, plan)
        return output

    def _tree_rows(self, query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor,
                   plan: dict[str, Any]) -> None:
        """Overwrite the drafted nodes' attention output with the tree-masked one."""
        flat = kv_cache.view(-1)
        batch, width, heads, head_size = plan["kv_shape"]
        k = flat.index_select(0, plan["k_index"]).view(plan["kv_shape"])  # [B, S, Hkv, D]
        v = flat.index_select(0, plan["v_index"]).view(plan["kv_shape"])  # [B, S, Hkv, D]
        q = query.index_select(0, plan["node_rows"]).view(batch, -1, *query.shape[1:])
        out = tree_sdpa(q, k, v, plan["bias"], self.scale)  # [B, nmax, Hq, D]
        out = out.reshape(-1, *query.shape[1:])[plan["valid"]]  # [R, Hq, D]
        output.index_copy_(0, plan["valid_rows"], out.to(output.dtype))

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


def _plan(step: TreeVerifyStep, block_table: torch.Tensor, slot_mapping: torch.Tensor,
          kv_cache: torch.Tensor, k_map: torch.Tensor, v_map: torch.Tensor,
          device: torch.device) -> dict[str, Any]:
    """Per-step gather plan shared by every layer (all layers of the group have the same
    block table, slot mapping and cache geometry).

    Keys: ``k_index`` / ``v_index`` (``[B * (Cmax + nmax) * Hkv * D]`` flat offsets into
    one layer's cache of each tree request's context then its drafted nodes, which the
    backend wrote into their own slots before the forward; padding reads offset 0),
    ``kv_shape`` ``(B, Cmax + nmax, Hkv, D)``, ``node_rows`` (``[B * nmax]`` query rows,
    padding -> row 0), ``valid`` (``[B * nmax]`` bool), ``valid_rows``, ``bias``
    (``[B, 1, nmax, Cmax + nmax]`` additive mask: 0 visible, -inf hidden), ``slots`` (the
    KV slots of ``step.tree_rows``) and the layout maps.
    """
    reqs = step.requests
    heads = kv_cache.shape[1]
    head_size = k_map.shape[2]
    block_elems = kv_cache[0].numel()
    max_context = max(r.context_len for r in reqs)
    max_nodes = max(r.num_drafts for r in reqs)
    width = max_context + max_nodes
    table = block_table.cpu()
    slots = slot_mapping.cpu()
    k_index = torch.zeros(len(reqs), width, heads, head_size, dtype=torch.int64)
    v_index = torch.zeros_like(k_index)
    node_rows = torch.zeros(len(reqs), max_nodes, dtype=torch.int64)
    valid = torch.zeros(len(reqs), max_nodes, dtype=torch.bool)
    visible = torch.zeros(len(reqs), max_nodes, width, dtype=torch.bool)
    for b, req in enumerate(reqs):
        n, ctx = req.num_drafts, req.context_len
        rows = torch.arange(req.root_row + 1, req.root_row + 1 + n)  # [n]
        for index, layout in ((k_index, k_map), (v_index, v_map)):
            index[b, :ctx] = context_offsets(table[req.batch_index], ctx, layout, block_elems)
            index[b, max_context : max_context + n] = slot_offsets(slots[rows], layout,
                                                                   block_elems)
        node_rows[b, :n] = rows
        valid[b, :n] = True
        visible[b, :, :ctx] = True  # padding rows see the context: no NaN
        visible[b, :n, max_context : max_context + n] = req.mask
    bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf"))
    return {"k_map": k_map, "v_map": v_map, "block_elems": block_elems,
            "k_index": k_index.view(-1).to(device), "v_index": v_index.view(-1).to(device),
            "kv_shape": (len(reqs), width, heads, head_size),
            "node_rows": node_rows.view(-1).to(device), "valid": valid.view(-1).to(device),
            "valid_rows": node_rows[valid].to(device), "bias": bias[:, None].to(device),
            "slots": slots[step.tree_rows]}


def slot_offsets(slots: torch.Tensor, layout_map: torch.Tensor,
                 block_elems: int) -> torch.Tensor:
    """Flat offsets of the K (or V) elements of arbitrary cache slots.

    Args:
        slots: ``[M]`` KV slots (``block * block_size + offset``).
        layout_map: ``[Hkv, block, D]``; block_elems: elements per block.

    Returns:
        ``[M, Hkv, D]`` int64 offsets into ``kv_cache.view(-1)``.
    """
    block_size = layout_map.shape[1]
    slots = slots.cpu().to(torch.int64)
    base = (slots // block_size) * block_elems  # [M]
    return base[:, None, None] + layout_map[:, slots % block_size].transpose(0, 1)


def move_tree_kv(step: TreeVerifyStep, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
    """KV fix-up: copy the K and V of tree rows ``src_rows`` into the slots of tree rows
    ``dst_rows`` (indices into ``step.tree_rows``) in every layer's cache, through the
    layout map learnt from the backend's writer. All sources are read before any write.

    Example: path ``[0, 4, 5]`` of a request whose rows start at 0 moves rows ``[4, 5]``
    into the slots of rows ``[1, 2]``.
    """
    plan = step.attention_cache["plan"]
    slots = plan["slots"].cpu()
    src_slots, dst_slots = slots[src_rows], slots[dst_rows]
    elems = plan["block_elems"]
    src = torch.cat([slot_offsets(src_slots, plan["k_map"], elems).reshape(-1),
                     slot_offsets(src_slots, plan["v_map"], elems).reshape(-1)])
    dst = torch.cat([slot_offsets(dst_slots, plan["k_map"], elems).reshape(-1),
                     slot_offsets(dst_slots, plan["v_map"], elems).reshape(-1)])
    for kv_cache in step.kv_caches:
        flat = kv_cache.view(-1)
        src_d, dst_d = src.to(flat.device), dst.to(flat.device)
        flat.index_copy_(0, dst_d, flat.index_select(0, src_d))


def context_offsets(blocks: torch.Tensor, length: int, layout_map: torch.Tensor,
                    block_elems: int) -> torch.Tensor:
    """Flat offsets (into ``kv_cache.view(-1)``) of the first ``length`` tokens' K or V.

    Args:
        blocks: ``[nb]`` the request's block ids in sequence order.
        length: tokens to address (``<= nb * block``).
        layout_map: ``[Hkv, block, D]`` offsets inside a block (``k_map`` or ``v_map``).
        block_elems: elements per block of the cache (``kv_cache[0].numel()``).

    Returns:
        ``[length, Hkv, D]`` int64. Example (``vec`` layout, ``block = 32``, ``D = 64``,
        one head): token 40 of blocks ``[7, 2]`` is block 2, offset 8, so its K dim 3 is
        at ``2 * block_elems + 3 * 32 + 8``.
    """
    block_size = layout_map.shape[1]
    pos = torch.arange(length)  # [length]
    base = blocks.cpu()[pos // block_size].to(torch.int64) * block_elems  # [length]
    return base[:, None, None] + layout_map[:, pos % block_size].transpose(0, 1)


def gather_context(kv_cache: torch.Tensor, blocks: torch.Tensor, k_map: torch.Tensor,
                   v_map: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one request's first ``length`` tokens of K and V through the layout maps.

    Returns ``(k, v)``, each ``[length, Hkv, D]`` (a copy, in the cache dtype).
    """
    flat = kv_cache.view(-1)
    elems = kv_cache[0].numel()
    return (flat[context_offsets(blocks, length, k_map, elems)],
            flat[context_offsets(blocks, length, v_map, elems)])


def tree_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Masked attention in float32 with grouped KV heads.

    Args:
        q: ``[B, n, Hq, D]``; k, v: ``[B, S, Hkv, D]``; mask: ``[B, n, S]`` bool (True =
        visible) or ``[B, 1, n, S]`` float additive bias; every row must see a key.

    Returns:
        ``[B, n, Hq, D]`` float32.
    """
    if mask.dtype == torch.bool:
        mask = mask[:, None]
    qh = q.transpose(1, 2).float()  # [B, Hq, n, D]
    kh = k.transpose(1, 2).float()  # [B, Hkv, S, D]
    vh = v.transpose(1, 2).float()  # [B, Hkv, S, D]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)  # [B, n, Hq, D]

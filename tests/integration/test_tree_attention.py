# SPDX-License-Identifier: Apache-2.0
"""Tree attention on vLLM's CPU cache: the layout probe, the context reader and the masked
attention against a dense reference, for every CPU ISA this machine runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_redrafter.steps import tree_fallback_reason

pytest.importorskip("vllm")
cpu_attn = pytest.importorskip("vllm.v1.attention.backends.cpu_attn")

from vllm_redrafter.integration.tree_attention import (  # noqa: E402
    gather_context,
    probe_cache_layout,
    tree_sdpa,
)

HKV, HQ, D = 2, 4, 64


def _configs():
    configs = [(torch.float32, 32), (torch.float32, 16), (torch.bfloat16, 32)]
    out = []
    for dtype, block in configs:
        isa = cpu_attn._get_attn_isa(dtype, block, D, "auto")
        out.append(pytest.param(dtype, block, isa, id=f"{str(dtype)[6:]}-{block}-{isa}"))
    return out


def _writer(isa):
    impl = SimpleNamespace(attn_type="decoder", kv_cache_dtype="auto")
    layer = SimpleNamespace(isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)

    def write(key, value, cache, slots):
        cpu_attn.CPUAttentionBackendImpl.do_kv_cache_update(impl, layer, key, value, cache,
                                                            slots)
    return write


@pytest.mark.parametrize("dtype,block,isa", _configs())
def test_probe_maps_every_element_once(dtype, block, isa):
    k_map, v_map = probe_cache_layout(_writer(isa), HKV, block, D, dtype)
    both = torch.cat([k_map.flatten(), v_map.flatten()])
    assert both.unique().numel() == both.numel() == 2 * HKV * block * D
    if isa == "vec":  # documented layout: K transposed per block
        h, t, d = 1, 5, 7
        assert int(k_map[h, t, d]) == h * 2 * block * D + d * block + t


@pytest.mark.parametrize("dtype,block,isa", _configs())
def test_gather_reads_back_what_the_writer_wrote(dtype, block, isa):
    torch.manual_seed(0)
    write = _writer(isa)
    k_map, v_map = probe_cache_layout(write, HKV, block, D, dtype)
    num_blocks, length = 6, 3 * block - 5
    cache = torch.zeros(num_blocks, HKV, block, 2 * D, dtype=dtype)
    table = torch.tensor([4, 1, 3])  # the request's blocks, out of order
    key = torch.randn(length, HKV, D).to(dtype)
    value = torch.randn(length, HKV, D).to(dtype)
    positions = torch.arange(length)
    slots = table[positions // block] * block + positions % block
    write(key, value, cache, slots)
    got_k, got_v = gather_context(cache, table, k_map, v_map, length)
    assert torch.equal(got_k, key) and torch.equal(got_v, value)


def _dense_reference(q, k, v, visible, scale):
    """Per query row: softmax over its visible keys, float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        cols = visible[i].nonzero().squeeze(1)
        scores = torch.einsum("hd,shd->hs", q[i], k[cols]) * scale
        out[i] = torch.einsum("hs,shd->hd", scores.softmax(-1), v[cols])
    return out


def test_tree_sdpa_matches_a_dense_reference():
    torch.manual_seed(1)
    context, n = 37, 7
    parents = [-1, 0, 1, 2, 0, 4, 5, 5]  # drafted nodes 1..7
    visible = torch.zeros(n, context + n, dtype=torch.bool)
    visible[:, :context] = True
    for node in range(1, n + 1):
        walk = node
        while walk > 0:
            visible[node - 1, context + walk - 1] = True
            walk = parents[walk]
    q = torch.randn(n, HQ, D)
    k = torch.randn(context + n, HKV, D)
    v = torch.randn(context + n, HKV, D)
    got = tree_sdpa(q[None], k[None], v[None], visible[None], 0.125)[0]
    want = _dense_reference(q, k, v, visible, 0.125)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # The mask matters: a causal mask over the flattened tree gives other rows.
    causal = torch.ones(n, context + n, dtype=torch.bool).tril(diagonal=context)
    wrong = tree_sdpa(q[None], k[None], v[None], causal[None], 0.125)[0]
    assert not torch.allclose(wrong.double(), want, atol=1e-3)


def test_tree_fallback_reason_on_real_sampling_params():
    from vllm import SamplingParams

    assert tree_fallback_reason(SamplingParams(temperature=0.0)) is None
    assert tree_fallback_reason(SamplingParams(temperature=0.9, top_p=0.8)) is None
    assert tree_fallback_reason(SamplingParams(logprobs=2)) == "logprobs"
    assert tree_fallback_reason(SamplingParams(presence_penalty=0.5)) == "presence penalty"
    assert tree_fallback_reason(SamplingParams(min_tokens=4, max_tokens=8)) == "min_tokens"


@pytest.mark.parametrize("dtype,block,isa", _configs())
def test_move_tree_kv_copies_slots_through_the_layout(dtype, block, isa):
    from vllm_redrafter.integration.runner import TreeVerifyStep
    from vllm_redrafter.integration.tree_attention import move_tree_kv

    torch.manual_seed(2)
    write = _writer(isa)
    k_map, v_map = probe_cache_layout(write, HKV, block, D, dtype)
    caches = [torch.zeros(3, HKV, block, 2 * D, dtype=dtype) for _ in range(2)]
    slots = torch.tensor([block + 3, block + 4, block + 5, 2 * block, 2 * block + 1])
    key = torch.randn(5, HKV, D).to(dtype)
    value = torch.randn(5, HKV, D).to(dtype)
    for cache in caches:
        write(key, value, cache, slots)
    step = TreeVerifyStep(requests=[], tree_rows=torch.arange(5), disabled=frozenset(),
                          kv_caches=caches)
    step.attention_cache["plan"] = {"slots": slots, "k_map": k_map, "v_map": v_map,
                                    "block_elems": caches[0][0].numel()}
    # path [0, 3, 4]: rows 3, 4 move into the slots of rows 1, 2
    move_tree_kv(step, torch.tensor([3, 4]), torch.tensor([1, 2]))
    for cache in caches:
        table = torch.tensor([0, 1, 2])
        got_k, got_v = gather_context(cache, table, k_map, v_map, 2 * block + 2)
        assert torch.equal(got_k[block + 4], key[3]) and torch.equal(got_k[block + 5], key[4])
        assert torch.equal(got_v[block + 4], value[3]) and torch.equal(got_v[block + 5], value[4])
        assert torch.equal(got_k[block + 3], key[0])  # the root stays
        assert torch.equal(got_k[2 * block], key[3])  # sources are not cleared

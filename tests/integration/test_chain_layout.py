# SPDX-License-Identifier: Apache-2.0
"""The chain verification adaptor (Medusa row rule, best-beam drafts) and the CPU
expand-kernel fix, without an engine."""

from __future__ import annotations

import pytest
import torch

from vllm_redrafter.scorers.chain import best_beam_drafts, select_context_rows


def test_row_rule_with_drafts_and_partial_prefill():
    # rows per request: 4, 1, 3 -> request 0 accepted 1 draft (+bonus), request 1 is a
    # partial prefill, request 2 accepted nothing (recovered token only)
    context = select_context_rows([[7, 8], [], [5]], [3, 0, 2])
    assert context.req_indices == [0, 2]
    assert context.rows == [1, 5]
    assert context.init_tokens == [8, 5]
    assert context.num_rows == 8


def test_row_rule_without_spec_metadata():
    context = select_context_rows([[3], [4], [9]], None)
    assert (context.rows, context.init_tokens, context.num_rows) == ([0, 1, 2],
                                                                     [3, 4, 9], 3)


def test_row_rule_all_accepted():
    context = select_context_rows([[1, 2, 3, 4]], [3])
    assert context.rows == [3] and context.init_tokens == [4]


def test_row_rule_rejects_inconsistent_inputs():
    with pytest.raises(ValueError, match="emitted 3 tokens from 2 rows"):
        select_context_rows([[1, 2, 3]], [1])
    with pytest.raises(ValueError, match="entries"):
        select_context_rows([[1]], [0, 0])


def test_best_beam_drafts_takes_beam_zero_without_the_init_token():
    context = select_context_rows([[8], [], [2]], None)
    beams = torch.tensor([[[8, 3, 4, 9], [8, 1, 1, 1]],
                          [[2, 6, 6, 7], [2, 0, 0, 0]]])  # [n=2, W=2, L=4]
    assert best_beam_drafts(beams, context, 3, 3) == [[3, 4, 9], [], [6, 6, 7]]
    assert best_beam_drafts(beams, context, 3, 2) == [[3, 4], [], [6, 6]]
    with pytest.raises(ValueError, match="beam_tokens must be"):
        best_beam_drafts(beams[:1], context, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_cpu_expand_fix_matches_kernel_semantics(dtype):
    from vllm_redrafter.integration.cpu_fixes import expand_kernel_cpu

    first = 0.75 if dtype.is_floating_point else 4  # a float keeps its fraction
    values = torch.tensor([first, 0, 2]).to(dtype)
    out = torch.full((6,), -7, dtype=dtype)
    expand_kernel_cpu(out, values, torch.tensor([2, 3, 5], dtype=torch.int32), 0, 1)
    expected = torch.tensor([first, first, 1, 2, 2, -7]).to(dtype)
    assert torch.equal(out, expected)


def test_vllm_expand_batch_to_tokens_is_correct_on_cpu_with_the_plugin():
    from vllm.platforms import current_platform

    from vllm_redrafter import plugin

    if not current_platform.is_cpu():
        pytest.skip("the fix only applies to the CPU backend")
    plugin.register()
    current_platform.register_triton_kernel_overrides()  # as a worker does
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    temperature = torch.tensor([0.8, 0.0, 0.5])
    out = expand_batch_to_tokens(temperature, torch.tensor([2, 3, 5]), 5,
                                 replace_from=0, replace_to=1)
    assert torch.allclose(out, torch.tensor([0.8, 0.8, 1.0, 0.5, 0.5]))

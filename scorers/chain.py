# SPDX-License-Identifier: Apache-2.0
"""Chain verification layout: which target row feeds the drafter, and what vLLM verifies.

In chain mode vLLM's own ``RejectionSampler`` verifies each request's draft as a linear
chain, and the target forward of a decode step has ``1 + num_draft_tokens[i]`` sampled rows
per request (``sample_hidden_states``): the last committed token, then every draft. After
verification, request ``i`` produced ``len(sampled_token_ids[i])`` tokens (the accepted
drafts plus one bonus/recovered token). Two facts follow (the Medusa row rule,
``docs/vllm-integration.md`` §2.1):

* the target hidden state of the **last accepted token**, the context ``h`` of the next
  drafter call, is row ``offset_i + len(sampled_token_ids[i]) - 1``, where ``offset_i`` is
  the number of rows of the requests before ``i``;
* the drafter's init token is ``sampled_token_ids[i][-1]``, the token the target chose
  from ``h``.

A request with no sampled token (a partial prefill chunk, or a discarded sample) gets no
draft. The second half of the adaptor turns the drafter's best beam into the
``list[list[int]]`` vLLM expects, capped at ``num_speculative_tokens``.

Pure torch/python; vLLM-free so it can be unit-tested alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_redrafter.steps import DraftStep


@dataclass(frozen=True, slots=True)
class ChainContext:
    """Per-step drafter inputs of the requests that get a draft.

    Attributes:
        req_indices: batch indices (``input_batch.req_ids`` order) of those requests.
        rows: for each, its row in ``sample_hidden_states`` (last accepted token).
        init_tokens: for each, the newest sampled token (the drafter's init token).
        num_rows: total rows of ``sample_hidden_states`` the layout implies.
    """

    req_indices: list[int]
    rows: list[int]
    init_tokens: list[int]
    num_rows: int

    @property
    def num_active(self) -> int:
        """Number of requests that get a draft."""
        return len(self.req_indices)


def select_context_rows(
    sampled_token_ids: Sequence[Sequence[int]],
    num_draft_tokens: Sequence[int] | None,
    last_nodes: Sequence[int | None] | None = None,
) -> ChainContext:
    """Apply the Medusa row rule to one step's verification output.

    A request verified as a **tree** does not follow it: its accepted path is not the
    first rows, so its context row is the row of its last accepted node
    (``offset_i + last_nodes[i]``; node ``j`` is row ``j`` of the request).

    Args:
        sampled_token_ids: per request, the tokens emitted this step (accepted drafts
            then the bonus/recovered token); empty for partial prefills.
        num_draft_tokens: per request, the drafts verified this step
            (``SpecDecodeMetadata.num_draft_tokens``); None when no request had drafts
            (one row per request).
        last_nodes: per request, the last accepted tree node, or None for requests
            verified as a chain (None: all chains).

    Returns:
        :class:`ChainContext`.

    Raises:
        ValueError: if a request emitted more tokens than it had rows.

    Example: ``sampled = [[7, 8], [], [5]]`` with ``num_draft_tokens = [3, 0, 2]``: rows
    per request are ``4, 1, 3``, so request 0 uses row ``0 + 2 - 1 = 1`` (init 8),
    request 1 gets no draft, request 2 uses row ``5 + 1 - 1 = 5`` (init 5). With
    ``last_nodes = [3, None, None]`` request 0 (a tree whose path ended at node 3)
    uses row ``0 + 3 = 3`` instead.
    """
    if num_draft_tokens is not None and len(num_draft_tokens) != len(sampled_token_ids):
        raise ValueError(
            f"num_draft_tokens has {len(num_draft_tokens)} entries for "
            f"{len(sampled_token_ids)} requests"
        )
    req_indices: list[int] = []
    rows: list[int] = []
    init_tokens: list[int] = []
    offset = 0
    for i, tokens in enumerate(sampled_token_ids):
        num_rows = 1 + (num_draft_tokens[i] if num_draft_tokens is not None else 0)
        if len(tokens) > num_rows:
            raise ValueError(
                f"request {i} emitted {len(tokens)} tokens from {num_rows} rows"
            )
        node = None if last_nodes is None or i >= len(last_nodes) else last_nodes[i]
        if node is not None and not 0 <= node < num_rows:
            raise ValueError(f"request {i}: tree node {node} outside its {num_rows} rows")
        if tokens:
            req_indices.append(i)
            rows.append(offset + (len(tokens) - 1 if node is None else node))
            init_tokens.append(int(tokens[-1]))
        offset += num_rows
    return ChainContext(req_indices, rows, init_tokens, offset)


def best_beam_drafts(
    beam_tokens: torch.Tensor,
    context: ChainContext | DraftStep,
    num_reqs: int,
    max_draft_tokens: int,
) -> list[list[int]]:
    """The best beam of each active request as vLLM's per-request draft lists.

    Args:
        beam_tokens: ``[n, W, L]`` int beams of the ``n = context.num_active`` requests,
            best beam first, column 0 = the init token (``Beams.tokens``).
        context: the layout that produced the drafter inputs (its ``req_indices`` and
            ``num_active``).
        num_reqs: batch size; requests without a draft get ``[]``.
        max_draft_tokens: cap per request (``num_speculative_tokens``; vLLM asserts
            that no request drafts more).

    Returns:
        ``num_reqs`` lists of target token ids in batch order.

    Example: beams ``[[[8, 3, 4, 9], ...]]`` for request 0 of 2 with cap 3 give
    ``[[3, 4, 9], []]``.
    """
    if beam_tokens.dim() != 3 or beam_tokens.shape[0] != context.num_active:
        raise ValueError(
            f"beam_tokens must be [n={context.num_active}, W, L], got "
            f"{tuple(beam_tokens.shape)}"
        )
    drafts: list[list[int]] = [[] for _ in range(num_reqs)]
    # [n, min(L-1, cap)] drafted tokens of the best beam (column 0 is not drafted)
    best = beam_tokens[:, 0, 1 : 1 + max(max_draft_tokens, 0)].tolist()
    for req_index, tokens in zip(context.req_indices, best):
        drafts[req_index] = tokens
    return drafts

# SPDX-License-Identifier: Apache-2.0
"""The one module that reads and writes vLLM model-runner state.

Every ReDrafter hook goes through here; the rest of the project sees only the vLLM-free
dataclasses of :mod:`vllm_redrafter.steps` and :mod:`vllm_redrafter.scorers.tree`.

One engine step on a worker, in order (tree mode):

1. ``_prepare_inputs`` (hook :func:`after_prepare_inputs`): the requests whose scheduled
   drafts are the tree proposed for them last step (looked up **by request id** in the
   tree registry, so batch reordering does not matter) become this step's
   :class:`TreeVerifyStep`; their node rows get depth positions (``base + depth``).
2. The target forward: the tree attention backend
   (:mod:`vllm_redrafter.integration.tree_attention`) reads the step to give each node
   the committed context plus its ancestors, and records the layers' caches.
3. ``_sample`` (hook :func:`sample_with_trees`): vLLM's sampler runs for every request;
   then each tree request's row of ``sampled_token_ids`` is replaced by the tree
   verdict (accepted path + one token), the accepted nodes' K/V are copied into the
   slots of the linear positions (KV fix-up), and the last accepted node is remembered.
4. ``propose_draft_token_ids`` (hook in ``hooks.py``): :func:`read_draft_step` builds the
   :class:`~vllm_redrafter.steps.DraftStep` (context row = last accepted node for tree
   requests, the chain row rule otherwise), the proposer answers a
   :class:`~vllm_redrafter.steps.Proposal`, and :func:`apply_proposal` registers its
   trees and returns vLLM's draft lists.

A registered tree is dropped when its request is next scheduled (verified or not) or
finishes; a tree whose tokens do not match what vLLM scheduled (drafts replaced by
placeholders, zeroed, truncated by a grammar) is never verified as a tree: vLLM's chain
verification then applies, which is exact for any draft list. A tree that is a single
path as scheduled (one beam, or one look-up branch; :attr:`TreeDraft.is_chain`) goes the
same way on purpose: the chain path verifies it exactly without the tree attention's and
the KV fix-up's cost; its last accepted node is its accepted count (for the look-up
source counts).

Diagnostics: ``VLLM_REDRAFTER_TREE_DISABLE=positions,mask,kv_fixup`` switches parts of
tree verification off (the negative-control tests show each is needed for exact output;
never set it in production).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_redrafter.logger import get_logger
from vllm_redrafter.scorers.chain import select_context_rows
from vllm_redrafter.scorers.tree import TreeVerdict, tree_attention_mask, verify_tree
from vllm_redrafter.steps import (
    DraftRequest,
    DraftStep,
    Proposal,
    SamplingView,
    StepCosts,
    TreeDraft,
    tree_fallback_reason,
)

logger = get_logger(__name__)

DISABLE_ENV = "VLLM_REDRAFTER_TREE_DISABLE"
TREE_PARTS = ("positions", "mask", "kv_fixup")


def disabled_parts() -> frozenset[str]:
    """Tree parts switched off by :data:`DISABLE_ENV` (diagnostics only).

    Raises:
        ValueError: on an unknown part name.
    """
    raw = os.environ.get(DISABLE_ENV, "")
    parts = frozenset(p.strip() for p in raw.split(",") if p.strip())
    unknown = sorted(parts - set(TREE_PARTS))
    if unknown:
        raise ValueError(f"{DISABLE_ENV}: unknown parts {unknown}; known: {list(TREE_PARTS)}")
    return parts


@dataclass(slots=True)
class TreeRequestStep:
    """One request verified as a tree in the current step.

    Attributes:
        req_id: request id.
        batch_index: index in this step's batch.
        tree: the tree as scheduled (truncated to the scheduled drafts).
        root_row: global query row of the root (node ``j`` is row ``root_row + j``).
        context_len: tokens every node sees before the tree (committed, root included).
        logits_row: first row of this request in the step's logits / sampled rows.
        mask: ``[n, n]`` bool ancestor-or-self mask of the drafted nodes.
    """

    req_id: str
    batch_index: int
    tree: TreeDraft
    root_row: int
    context_len: int
    logits_row: int
    mask: torch.Tensor

    @property
    def num_drafts(self) -> int:
        """Drafted nodes ``n``."""
        return self.tree.num_nodes - 1


@dataclass(slots=True)
class TreeVerifyStep:
    """Everything the attention backend and the sampler hook need about this step.

    Attributes:
        requests: the tree requests, in batch order.
        tree_rows: ``[R]`` global query rows of every tree request's root and nodes,
            request by request (``R = sum(n_i + 1)``).
        disabled: parts switched off (diagnostics).
        kv_caches: every attention layer's paged cache seen in this step's forward.
        attention_cache: scratch of the attention backend for this step (gather
            indices shared by all layers, the tree rows' KV slots, ...).
        kv_mover: set by the attention backend: ``kv_mover(step, src_rows, dst_rows)``
            copies the K/V of tree rows ``src_rows`` into the slots of ``dst_rows``
            (indices into ``tree_rows``) in every layer.
    """

    requests: list[TreeRequestStep]
    tree_rows: torch.Tensor
    disabled: frozenset[str]
    kv_caches: list[torch.Tensor] = field(default_factory=list)
    attention_cache: dict[str, Any] = field(default_factory=dict)
    kv_mover: Any = None


@dataclass
class _WorkerState:
    trees: dict[str, TreeDraft] = field(default_factory=dict)
    current: TreeVerifyStep | None = None
    last_nodes: dict[str, int] = field(default_factory=dict)
    chained: set[str] = field(default_factory=set)
    """Requests whose registered tree was a single path, verified by vLLM's chain path
    this step."""
    chain_trees: int = 0
    """Single-path trees verified by the chain path so far (tests, diagnostics)."""
    draft_faults: int = 0
    step_started: float | None = None
    cost_clock: Callable[[], float] = time.perf_counter
    """The clock of the steps' costs (:func:`set_cost_clock`)."""
    rewind: dict[int, torch.Tensor] | None = None
    """CPU generator states of this step's discarded requests, before sampling."""


def chain_tree_count() -> int:
    """Single-path trees this worker verified through vLLM's chain path."""
    return _STATE.chain_trees


def draft_fault_count() -> int:
    """Drafting steps of this process that failed and fell back to no draft."""
    return _STATE.draft_faults


def _draft_fault(step: DraftStep, exc: BaseException) -> list[list[int]]:
    """A drafting step failed: count it, log (a WARNING the first time, DEBUG after), and
    draft nothing for this step. Verification of no draft is plain decoding, so outputs
    cannot change; the next step drafts again."""
    _STATE.draft_faults += 1
    log = logger.warning if _STATE.draft_faults == 1 else logger.debug
    log("ReDrafter drafting step failed (%s: %s); no draft this step (%d failed so far; "
        "later failures are logged at DEBUG)", type(exc).__name__, exc, _STATE.draft_faults)
    return [[] for _ in range(step.num_reqs)]


_STATE = _WorkerState()


def set_cost_clock(clock: Callable[[], float]) -> None:
    """Time the steps' forward with ``clock`` (the proposer's
    :func:`vllm_redrafter.policy.cost_clock`; wall time until set)."""
    _STATE.cost_clock = clock


def note_step_start() -> None:
    """The model runner starts executing a step (hook ``runner-step-timer``)."""
    _STATE.step_started = _STATE.cost_clock()


def _step_costs(scheduler_output: Any, sampled_token_ids: list[list[int]],
                spec_decode_metadata: Any) -> StepCosts:
    """The finished step's size, forward time and per-request (drafted, accepted)."""
    started, _STATE.step_started = _STATE.step_started, None
    seconds = None if started is None else _STATE.cost_clock() - started
    num_tokens = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)
    verified: list[tuple[int, int]] = []
    if spec_decode_metadata is not None:
        for drafted, sampled in zip(spec_decode_metadata.num_draft_tokens, sampled_token_ids):
            if drafted > 0 and sampled:
                verified.append((int(drafted), len(sampled) - 1))
    return StepCosts(num_tokens, seconds, tuple(verified))


def redrafter_of(runner: Any) -> Any | None:
    """``runner.drafter`` when it is a ReDrafter proposer (vLLM's ``custom_class``
    method, with ``propose_step``), else None: the runner hooks act only then."""
    spec = getattr(runner, "speculative_config", None)
    drafter = getattr(runner, "drafter", None)
    if getattr(spec, "method", None) != "custom_class" or not hasattr(drafter, "propose_step"):
        return None
    return drafter


def step_has_no_drafts(runner: Any, spec_decode_metadata: Any) -> bool:
    """True when ReDrafter drafts for ``runner`` and no request of this step carries a
    draft token (then vLLM's plain sampler is exact and cheaper than its rejection
    sampler)."""
    if spec_decode_metadata is None or redrafter_of(runner) is None:
        return False
    return not any(spec_decode_metadata.num_draft_tokens)


def note_sampling_start(runner: Any) -> None:
    """``sample_tokens`` starts (hook ``cpu-seeded-discard-rewind``): keep the state of
    every CPU generator of a request whose sample this step will discard (a partial
    prefill chunk), before the sampler draws from it. Only ReDrafter engines carry the
    fix: a plain engine sharing the process (in-process engines) keeps vLLM's behaviour."""
    if redrafter_of(runner) is None:
        _STATE.rewind = None
        return
    num_reqs = int(runner.input_batch.num_reqs)
    discarded = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    states = {}
    for index in discarded.tolist():
        gen = runner.input_batch.generators.get(int(index))
        if gen is not None and gen.device.type == "cpu":
            states[int(index)] = gen.get_state()
    _STATE.rewind = states


def note_sampling_end() -> None:
    _STATE.rewind = None


@contextlib.contextmanager
def rewound_cpu_generators(runner: Any) -> Iterator[None]:
    """Around vLLM's ``_bookkeeping_sync``: its rewind of a discarded request's generator
    (``set_offset(get_offset() - 4)``, Philox offsets) raises for CPU generators; hide
    those generators from it, then restore the states kept before sampling, which undoes
    the discarded draws exactly (what the offset rewind means on CUDA)."""
    states = _STATE.rewind or {}
    generators = runner.input_batch.generators
    hidden = {index: generators.pop(index) for index in states if index in generators}
    try:
        yield
    finally:
        for index, gen in hidden.items():
            gen.set_state(states[index])
            generators[index] = gen


def current_tree_step() -> TreeVerifyStep | None:
    """The tree verification in flight in this process (None outside one)."""
    return _STATE.current


# ------------------------------------------------------------------ propose side


def _sampling_params(runner: Any, req_id: str) -> Any:
    state = runner.requests.get(req_id)
    return None if state is None else state.sampling_params


def read_draft_step(
    runner: Any,
    sampled_token_ids: list[list[int]],
    spec_decode_metadata: Any,
    *,
    tree_mode: bool,
    with_history: bool = False,
    costs: StepCosts | None = None,
) -> DraftStep:
    """The :class:`DraftStep` of the step that just ran.

    The context row of a request verified as a tree is its last accepted node's row;
    every other request follows the chain row rule
    (:func:`vllm_redrafter.scorers.chain.select_context_rows`).
    """
    req_ids = list(runner.input_batch.req_ids)
    num_drafts = None if spec_decode_metadata is None else spec_decode_metadata.num_draft_tokens
    last_nodes = [_STATE.last_nodes.get(req_id) for req_id in req_ids[: len(sampled_token_ids)]]
    context = select_context_rows(sampled_token_ids, num_drafts, last_nodes=last_nodes)
    requests = []
    batch = runner.input_batch
    for index, row, init in zip(context.req_indices, context.rows, context.init_tokens):
        req_id = req_ids[index]
        last_node = last_nodes[index] if index < len(last_nodes) else None
        if last_node is None and req_id in _STATE.chained:
            last_node = len(sampled_token_ids[index]) - 1  # a path: node = accepted count
        tree_ok = tree_mode and tree_fallback_reason(_sampling_params(runner, req_id)) is None
        history = None
        if with_history:
            history = batch.token_ids_cpu[index, : int(batch.num_tokens_no_spec[index])]
        requests.append(DraftRequest(req_id, index, row, init, tree_ok, history, last_node))
    return DraftStep(len(sampled_token_ids), requests, context.num_rows, costs)


def propose_drafts(runner: Any, drafter: Any, *, sampled_token_ids: Any,
                   sample_hidden_states: torch.Tensor, spec_decode_metadata: Any,
                   scheduler_output: Any = None) -> list[list[int]]:
    """One drafting step: read the step, ask ``drafter.propose_step``, apply the answer.

    ``drafter`` provides ``propose_step(step, sample_hidden_states) -> Proposal`` and the
    attributes ``tree_mode`` and ``wants_history`` (bools).
    """
    if not isinstance(sampled_token_ids, list):
        raise TypeError(
            "ReDrafter expects the CPU sampled-token lists of custom_class proposers, "
            f"got {type(sampled_token_ids).__name__}"
        )
    costs = _step_costs(scheduler_output, sampled_token_ids, spec_decode_metadata)
    step = read_draft_step(runner, sampled_token_ids, spec_decode_metadata,
                           tree_mode=bool(getattr(drafter, "tree_mode", False)),
                           with_history=bool(getattr(drafter, "wants_history", False)),
                           costs=costs)
    if step.num_rows != sample_hidden_states.shape[0]:
        raise RuntimeError(
            f"ReDrafter row layout mismatch: {step.num_rows} rows expected, "
            f"sample_hidden_states has {sample_hidden_states.shape[0]}"
        )
    if not step.requests:
        return [[] for _ in range(step.num_reqs)]
    try:
        proposal = drafter.propose_step(step, sample_hidden_states)
    except Exception as exc:  # noqa: BLE001 - a drafter fault must never stop serving
        return _draft_fault(step, exc)
    return apply_proposal(runner, proposal)


def profile_drafter(runner: Any) -> None:
    """Inside vLLM's memory profiling (``profile_run``): run the drafter at the largest
    batch (``max_num_seqs``) so that its peak working memory is measured before the KV
    cache is sized. A no-op for other proposers.

    The ReDrafter proposer provides ``profile_run(num_reqs)``.
    """
    warm_up = getattr(redrafter_of(runner), "profile_run", None)
    if warm_up is not None:
        warm_up(int(runner.max_num_reqs))


def apply_proposal(runner: Any, proposal: Proposal) -> list[list[int]]:
    """Register the proposal's trees and return vLLM's per-request draft lists."""
    for req_id, tree in proposal.trees.items():
        _STATE.trees[req_id] = tree
    return proposal.in_batch_order(list(runner.input_batch.req_ids))


# ------------------------------------------------------------------ verify side


def after_prepare_inputs(runner: Any, scheduler_output: Any, result: Any) -> None:
    """Turn the scheduled drafts into this step's :class:`TreeVerifyStep` (or None) and
    write the depth positions of its nodes into ``runner.positions``."""
    _STATE.current = None
    _STATE.chained.clear()
    for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
        _STATE.trees.pop(req_id, None)
    if not _STATE.trees:
        return
    spec_decode_metadata = result[1]
    scheduled = scheduler_output.scheduled_spec_decode_tokens
    batch = runner.input_batch
    candidates = {
        req_id: _STATE.trees.pop(req_id)
        for req_id in list(scheduler_output.num_scheduled_tokens)
        if req_id in _STATE.trees
    }
    if spec_decode_metadata is None or not candidates:
        return
    query_start = runner.query_start_loc.np
    discard = runner.discard_request_mask.np
    row_offsets = _logits_row_offsets(spec_decode_metadata.num_draft_tokens)
    requests: list[TreeRequestStep] = []
    for req_id, tree in candidates.items():
        drafts = list(scheduled.get(req_id, ()))
        index = batch.req_id_to_index[req_id]
        n = len(drafts)
        if n == 0 or drafts != tree.drafts[:n] or bool(discard[index]):
            continue
        sub = tree.truncated(n)
        if sub.is_chain:  # vLLM's chain verification: exact, and cheaper
            _STATE.chained.add(req_id)
            _STATE.chain_trees += 1
            continue
        end = int(query_start[index + 1])
        seq_len = int(batch.num_computed_tokens_cpu[index]) + end - int(query_start[index])
        requests.append(TreeRequestStep(
            req_id=req_id, batch_index=index, tree=sub, root_row=end - n - 1,
            context_len=seq_len - n, logits_row=row_offsets[index],
            mask=tree_attention_mask(sub)))
    if not requests:
        return
    requests.sort(key=lambda r: r.batch_index)
    rows = torch.cat([torch.arange(r.root_row, r.root_row + 1 + r.num_drafts)
                      for r in requests])  # [R]
    step = TreeVerifyStep(requests, rows, disabled_parts())
    if "positions" not in step.disabled:
        _write_depth_positions(runner.positions, requests)
    _STATE.current = step


def _logits_row_offsets(num_draft_tokens: list[int]) -> list[int]:
    """First logits row of each request: rows are ``1 + drafts`` per request.
    Example: ``[3, 0, 2]`` -> ``[0, 4, 5]``."""
    offsets, total = [], 0
    for n in num_draft_tokens:
        offsets.append(total)
        total += 1 + int(n)
    return offsets


def _write_depth_positions(positions: torch.Tensor, requests: list[TreeRequestStep]) -> None:
    """Node ``j`` of a request gets RoPE position ``position(root) + depth(j)``; its KV
    slot (computed by vLLM from the linear positions) stays its own."""
    for req in requests:
        base = positions[req.root_row]
        depths = torch.tensor(req.tree.depths[1:], dtype=positions.dtype,
                              device=positions.device)  # [n]
        positions[req.root_row + 1 : req.root_row + 1 + req.num_drafts] = base + depths


def sample_with_trees(runner: Any, original: Any, logits: Any,
                      spec_decode_metadata: Any) -> Any:
    """vLLM's ``_sample``, then tree acceptance and the KV fix-up for tree requests."""
    _STATE.last_nodes.clear()
    step = _STATE.current
    if step is None or spec_decode_metadata is None or logits is None:
        _STATE.current = None
        return original(runner, logits, spec_decode_metadata)
    try:
        # vLLM may update logits in place: take the tree rows first.
        tree_logits = [logits[r.logits_row : r.logits_row + 1 + r.num_drafts].float().clone()
                       for r in step.requests]  # each [n + 1, V]
        output = original(runner, logits, spec_decode_metadata)
        verdicts = [_verify_one(runner, req, rows)
                    for req, rows in zip(step.requests, tree_logits)]
        verdicts = _agree_across_ranks(verdicts)
        _write_sampled(output.sampled_token_ids, step.requests, verdicts)
        if "kv_fixup" not in step.disabled:
            _fix_up_kv(step, verdicts)
        for req, verdict in zip(step.requests, verdicts):
            _STATE.last_nodes[req.req_id] = verdict.last_node
        return output
    finally:
        _STATE.current = None


def _verify_one(runner: Any, req: TreeRequestStep, rows: torch.Tensor) -> TreeVerdict:
    params = _sampling_params(runner, req.req_id)
    sampling = SamplingView(
        temperature=float(getattr(params, "temperature", 0.0) or 0.0),
        top_k=getattr(params, "top_k", None),
        top_p=getattr(params, "top_p", None),
    )
    generator = runner.input_batch.generators.get(req.batch_index)
    return verify_tree(req.tree, rows, sampling, generator)


def _agree_across_ranks(verdicts: list[TreeVerdict]) -> list[TreeVerdict]:
    """Under TP every rank must move the same KV: take the output rank's verdicts
    (random draws of unseeded requests may differ per rank)."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    if get_tensor_model_parallel_world_size() == 1:
        return verdicts
    from vllm.distributed.parallel_state import get_tp_group

    width = max(len(v.path) for v in verdicts)
    packed = torch.full((len(verdicts), 2, width), -1, dtype=torch.int64)
    for i, verdict in enumerate(verdicts):
        packed[i, 0, : len(verdict.path)] = torch.tensor(verdict.path)
        packed[i, 1, : len(verdict.emitted)] = torch.tensor(verdict.emitted)
    group = get_tp_group()
    packed = group.broadcast(packed.to(group.device), src=0).cpu()
    agreed = []
    for row in packed.tolist():
        path = [x for x in row[0] if x >= 0]
        agreed.append(TreeVerdict(path, row[1][: len(path)]))
    return agreed


def _write_sampled(sampled: torch.Tensor, requests: list[TreeRequestStep],
                   verdicts: list[TreeVerdict]) -> None:
    """Row ``i`` of vLLM's ``[B, max_spec_len + 1]`` output = emitted tokens, -1 padding."""
    for req, verdict in zip(requests, verdicts):
        row = torch.full((sampled.shape[1],), -1, dtype=sampled.dtype)
        row[: len(verdict.emitted)] = torch.tensor(verdict.emitted, dtype=sampled.dtype)
        sampled[req.batch_index] = row.to(sampled.device)


def _fix_up_kv(step: TreeVerifyStep, verdicts: list[TreeVerdict]) -> None:
    """Copy each accepted node's K/V into the slot of its linear position (the node at
    depth ``d`` of the path goes to row ``d``'s slot), in every layer."""
    src: list[int] = []
    dst: list[int] = []
    offset = 0
    for req, verdict in zip(step.requests, verdicts):
        for node, depth in verdict.kv_moves():
            src.append(offset + node)
            dst.append(offset + depth)
        offset += 1 + req.num_drafts
    if not src:
        return
    if step.kv_mover is None:
        raise RuntimeError("ReDrafter tree step without a KV mover: the tree attention "
                           "backend did not run in this forward")
    step.kv_mover(step, torch.tensor(src, dtype=torch.int64),
                  torch.tensor(dst, dtype=torch.int64))

# SPDX-License-Identifier: Apache-2.0
"""ReDrafterProposer: the drafter inside vLLM's model runner (chain or tree verification).

vLLM builds this class through its ``custom_class`` speculative method
(``create_custom_proposer(vllm_config)``), once per TP rank of the last PP stage, and
calls ``load_model(target_model)`` after loading the target. Every decode step, the
``runner-propose-draft-hook`` hands the step to :mod:`vllm_redrafter.integration.runner`,
which builds a vLLM-free :class:`~vllm_redrafter.steps.DraftStep` (each request's context
row and init token: the chain row rule, or the last accepted tree node) and calls
:meth:`ReDrafterProposer.propose_step`; the proposer

1. runs the drafter's beam search (``W`` beams of length ``L``,
   :func:`vllm_redrafter.beam_search.beam_search`) on those rows, and
2. answers a :class:`~vllm_redrafter.steps.Proposal`: in **chain mode** the best beam's
   ``L - 1`` tokens, which vLLM's own rejection sampler verifies with no draft
   probabilities (point-mass acceptance: lossless for a deterministic proposal); in
   **tree mode** (``tree: true``) the prefix-deduplicated tree of all ``W`` beams
   (:func:`vllm_redrafter.tree.build_tree`), verified in one target pass by the tree
   hooks (:mod:`vllm_redrafter.integration.tree_hooks`). Requests a tree cannot serve
   (structured output, penalties, logprobs, ...) get the chain in either mode.

Weights: the drafter's input embedding **is the target's** embedding module (shared by
reference, TP-sharded as the target's); the RNN and ResBlocks are small replicated
``nn.Linear`` layers; the drafter's own output projection is a vLLM ``ParallelLMHead``
(vocab-sharded under TP) whose logits are all-gathered, so every rank runs the same
beam search on the same full-vocabulary log-probabilities with the same collectives.
Nothing here depends on the TP rank, so ranks never diverge or raise alone.

Glossary: ``B`` requests drafted this step, ``W`` beam width, ``L`` beam length,
``H`` target hidden size, ``E`` drafter exit_dim, ``Vd`` draft vocabulary.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from vllm_redrafter.beam_search import (
    beam_search,
    merge_shard_candidates,
    shard_candidates,
    top_candidates,
)
from vllm_redrafter.checkpoint import load_drafter
from vllm_redrafter.config import LookupOptions
from vllm_redrafter.drafter import RecurrentDrafter, resolve_draft_dtype
from vllm_redrafter.integration import compat, hooks, patches, spec_config, tree_hooks
from vllm_redrafter.integration import runner as runner_state
from vllm_redrafter.logger import get_logger
from vllm_redrafter.lookup import (
    Candidate,
    ContextIndex,
    SourceCounts,
    cut_untrusted,
    fill_order,
    lookup_depth,
    merge_branches,
    path_sources,
    trusted,
)
from vllm_redrafter.graphs import CudaGraphBackend, GraphedSearch, batch_buckets
from vllm_redrafter.memory import beam_search_peak_bytes
from vllm_redrafter.policy import DraftPolicy, TreeSizeTable, cost_clock
from vllm_redrafter.quant import (
    LOW_BIT_MAX_ROWS,
    LowBitRows,
    int8_supported,
    int8_wanted,
    low_bit_pays,
    low_bit_rows,
    quantize_drafter_linears,
)
from vllm_redrafter.scorers.chain import best_beam_drafts
from vllm_redrafter.steps import DraftRequest, DraftStep, Proposal, StepCosts, TreeDraft
from vllm_redrafter.tree import build_tree

logger = get_logger(__name__)

WARMUP_REQUESTS = 2
"""Requests in the load-time warm-up beam search (checks shapes and TP collectives)."""

_T = TypeVar("_T")


class _Cycle(NamedTuple):
    """The last drafting call, closed by the next (:meth:`DraftPolicy.observe_cycle`)."""

    began: float
    """Its start on the policy's clock."""
    num_reqs: int
    length: int
    policy: DraftPolicy
    """The policy that chose its draft."""
    spent: float
    """Seconds it took."""
    decode_tokens: int
    """Tokens a decode step verifying its drafts schedules (one per request plus the
    drafts)."""


def describe_load_failures(outcomes: list[tuple[str, str | None]], what: str) -> str | None:
    """One message naming every TP rank that could not load ``what``, or None.

    ``outcomes[rank] = (node name, error or None)``. Example: ``[("a", None),
    ("b", "FileNotFoundError: /d/config.json")]`` -> ``"... rank 1 on node b:
    FileNotFoundError: /d/config.json"``.
    """
    failed = [f"rank {rank} on node {node}: {error}"
              for rank, (node, error) in enumerate(outcomes) if error is not None]
    if not failed:
        return None
    return (f"ReDrafter could not load {what} on {len(failed)} of {len(outcomes)} "
            f"tensor-parallel ranks ({'; '.join(failed)}); every node running a worker "
            "needs the drafter directory at the same path (copy it there, or put it on "
            "shared storage)")


def load_on_every_rank(load: Callable[[], _T], what: str,
                       gather: Callable[[tuple[str, str | None]], list[tuple[str, str | None]]]
                       ) -> _T:
    """Run ``load`` on this rank, then agree with every rank (``gather``: all-gather of
    one small object over the CPU group) before any GPU collective, so a failure on one
    node fails every rank at once with the same message instead of leaving the others
    waiting in the drafter's first collective."""
    try:
        result, error = load(), None
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        result, error = None, f"{type(exc).__name__}: {exc}"
    message = describe_load_failures(gather((socket.gethostname(), error)), what)
    if message is not None:
        raise spec_config.ReDrafterConfigError(message)
    return result  # type: ignore[return-value]


def _gather_over_tp_cpu_group(item: tuple[str, str | None]) -> list[tuple[str, str | None]]:
    """All-gather ``item`` over the TP group's CPU (gloo) group; ``[item]`` at TP = 1."""
    import torch.distributed as dist
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return [item]
    out: list[Any] = [None] * group.world_size
    dist.all_gather_object(out, item, group=group.cpu_group)
    return out


def _sync_allowed() -> contextlib.AbstractContextManager[Any]:
    """vLLM's scope for an intended GPU->CPU synchronisation (its sync checker flags any
    other); a no-op context where vLLM has none."""
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    except ImportError:  # pragma: no cover - older layouts
        return contextlib.nullcontext()
    return gpu_sync_allowed()


def _runner_device(vllm_config: Any) -> torch.device:
    """The device vLLM runs this worker on (its device config; ``cuda`` resolved to the
    worker's current CUDA device)."""
    device = torch.device(vllm_config.device_config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_engine_support(vllm_config: Any) -> None:
    """Refuse, before anything is loaded, what ReDrafter's proposer cannot run.

    Raises:
        ReDrafterConfigError: pipeline parallelism > 1, async scheduling on, or the
            engine on Model Runner V2.
    """
    spec_config.check_engine_options(
        int(getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1)),
        bool(getattr(vllm_config.scheduler_config, "async_scheduling", False)),
        bool(getattr(vllm_config, "use_v2_model_runner", False)))


def _shard_logits(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[*, D]`` features -> this rank's ``[N, V_padded / tp]`` logits of the
    vocab-parallel ``head`` (through its quant method, as vLLM's logits processor)."""
    return head.quant_method.apply(head, x.reshape(-1, x.shape[-1]))


def _full_logits(local: torch.Tensor, tp_size: int, vocab_size: int) -> torch.Tensor:
    """Every rank's ``[N, V_padded / tp]`` shards all-gathered -> ``[N, V]`` (padding
    columns dropped)."""
    from vllm.distributed import tensor_model_parallel_all_gather

    if tp_size > 1:
        local = tensor_model_parallel_all_gather(local.contiguous(), dim=-1)
    return local[:, :vocab_size]


def _merged_candidates(packed: torch.Tensor, tp_size: int, k: int, top_k: int | None,
                       lead: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's packed ``[N, 2m + 1]`` shard candidates, all-gathered and merged on
    every rank -> ``([*lead, K] float32, [*lead, K] int64)``."""
    from vllm.distributed import tensor_model_parallel_all_gather

    gathered = tensor_model_parallel_all_gather(packed.contiguous(), dim=-1)
    gathered = gathered.view(packed.shape[0], tp_size, packed.shape[1])  # [N, tp, 2m+1]
    log_probs, ids = merge_shard_candidates(gathered, k, top_k)  # [N, K] x2
    return log_probs.reshape(*lead, -1), ids.reshape(*lead, -1)


class VocabParallelDraftHead(nn.Module):
    """The drafter's output projection ``Linear(E, Vd, bias=False)``, vocab-sharded.

    Wraps a vLLM ``ParallelLMHead`` (each TP rank holds a slice of the rows) and returns
    all-gathered full-vocabulary logits, so it is a drop-in replacement for
    ``RecurrentDrafter.lm_head``.

    Args:
        vocab_size: ``Vd``.
        exit_dim: ``E``.
        dtype: parameter dtype.
    """

    def __init__(self, vocab_size: int, exit_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        self.vocab_size = vocab_size
        self.tp_size = get_tensor_model_parallel_world_size()
        self.head = ParallelLMHead(vocab_size, exit_dim, bias=False, params_dtype=dtype)
        self.low_bit: LowBitRows | None = None
        """An int8 / int4 copy of the full head for small CPU products (``draft_int8``,
        ``draft_bits``; TP = 1)."""

    @property
    def weight(self) -> torch.Tensor:
        """This rank's ``[Vd_padded / tp, E]`` shard (dtype/device source for the core)."""
        return self.head.weight

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this rank's rows of the full ``[Vd, E]`` matrix (zero padding rows), then
        let the layer's quant method post-process it (as vLLM's model loader does; on
        CPU this selects the GEMM kernel)."""
        self.head.weight_loader(self.head.weight, weight)
        finalize = getattr(self.head.quant_method, "process_weights_after_loading", None)
        if finalize is not None:
            finalize(self.head)

    def enable_low_bit(self, weight: torch.Tensor, bits: int,
                       built: LowBitRows | None = None) -> bool:
        """Keep ``weight [Vd, E]`` (the full head) in ``bits`` too, for the products it
        applies to (:func:`~vllm_redrafter.quant.low_bit_rows`); TP = 1 only. ``built``:
        that copy, already made from ``weight`` (the start-up timing's), kept as is."""
        if self.tp_size != 1 or not int8_supported():
            return False
        self.low_bit = built if built is not None else low_bit_rows(weight, bits)
        return True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``[*, E]`` features -> ``[*, Vd]`` full-vocabulary logits on every rank."""
        if self.low_bit is not None and self.low_bit.applies(z):
            return self.low_bit(z)  # [*, Vd]
        local = _shard_logits(self.head, z)  # [N, Vd_padded / tp]
        logits = _full_logits(local, self.tp_size, self.vocab_size)  # [N, Vd]
        return logits.reshape(*z.shape[:-1], self.vocab_size)

    def top_candidates(self, z: torch.Tensor, k: int, top_k: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search's per-row candidates without all-gathering the logits.

        Under TP each rank packs its shard's best ``m`` values, their ids and its partial
        log-sum-exp (:func:`~vllm_redrafter.beam_search.shard_candidates`); one
        all-gather of ``[N, tp * (2m + 1)]`` floats replaces ``[N, Vd]``, and every rank
        merges the same candidates. ``z [*, E]`` -> ``([*, K] float32, [*, K] int64)``.
        """
        if self.tp_size == 1:
            return top_candidates(self(z), k, top_k)
        from vllm.distributed import get_tensor_model_parallel_rank

        local = _shard_logits(self.head, z)  # [N, Vd_padded / tp]
        offset = get_tensor_model_parallel_rank() * local.shape[1]
        packed = shard_candidates(local, offset, self.vocab_size, k, top_k)  # [N, 2m+1]
        return _merged_candidates(packed, self.tp_size, k, top_k, z.shape[:-1])


class TargetDraftHead(nn.Module):
    """``head="target"`` drafters: the target's own output head, used by reference.

    Full vocabulary, or any TP size: runs the target's ``lm_head`` (a ``ParallelLMHead``,
    or the input embedding for tied models) by reference through its quant method,
    all-gathers the vocab shards like vLLM's logits processor, and keeps the draft
    vocabulary's columns; nothing is copied. Example: ``V = 6`` on 2 ranks,
    ``draft_vocab = [1, 4]``: rank shards give logits of tokens 0-2 and 3-5; the gathered
    ``[*, 6]`` row keeps columns 1 and 4.

    A draft vocabulary at TP = 1: its ``[Vd, H]`` rows of the head are gathered once at
    load. A drafting step is bound by reading the head's weights (a few rows per request),
    so scoring only ``Vd`` rows instead of ``V`` cuts its cost by ``V / Vd``; the copy is
    ``Vd / V`` of the head's size.

    Args:
        lm_head: the target's output head module (kept by reference, not registered).
        vocab_size: ``V`` (columns past it are vocab padding).
        draft_vocab: ``[Vd]`` int64 target ids, or ``None`` for the full vocabulary.
    """

    def __init__(self, lm_head: nn.Module, vocab_size: int,
                 draft_vocab: torch.Tensor | None) -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size

        object.__setattr__(self, "target_lm_head", lm_head)  # not a submodule
        self.vocab_size = vocab_size
        self.tp_size = get_tensor_model_parallel_world_size()
        self.columns = draft_vocab  # [Vd] or None
        self.rows: torch.Tensor | None = None  # [Vd, H] when gathered (TP = 1, subset)
        self._local: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        """``(shard width, _shard_columns(width))``, computed once (TP > 1, subset)."""
        weight = getattr(lm_head, "weight", None)
        if draft_vocab is not None and self.tp_size == 1 and isinstance(weight, torch.Tensor):
            self.rows = weight.detach().index_select(0, draft_vocab)  # [Vd, H]

    def _shard_columns(self, shard: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's draft-vocabulary columns in its ``shard``-wide vocab slice:
        ``(local column indices, their draft ids)``; None without a draft vocabulary.
        Fixed for the engine's life, so computed once (``nonzero`` would synchronise the
        device on every drafting step). Example: ``draft_vocab = [1, 4, 5]``, shard 3 on
        rank 1 (columns 3-5) -> ``([1, 2], [1, 2])``."""
        if self.columns is None:
            return None
        if self._local is None or self._local[0] != shard:
            from vllm.distributed import get_tensor_model_parallel_rank

            offset = get_tensor_model_parallel_rank() * shard
            mine = ((self.columns >= offset) & (self.columns < offset + shard)).nonzero()
            draft_ids = mine.flatten()  # [n]
            self._local = (shard, (self.columns[draft_ids] - offset, draft_ids))
        return self._local[1]

    def top_candidates(self, x: torch.Tensor, k: int, top_k: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search's per-row candidates; under TP without all-gathering the logits.

        Each rank takes its vocab slice (and within it the draft vocabulary's columns),
        packs its best ``m`` values, their draft ids and its partial log-sum-exp, and one
        all-gather of ``[N, tp * (2m + 1)]`` floats replaces ``[N, V]``. ``x [*, H]`` ->
        ``([*, K] float32, [*, K] int64)``.
        """
        if self.rows is not None or self.tp_size == 1:
            return top_candidates(self(x), k, top_k)
        from vllm.distributed import get_tensor_model_parallel_rank

        local = _shard_logits(self.target_lm_head, x)  # [N, V_padded / tp]
        width = max(k, top_k or 0)
        selected = self._shard_columns(local.shape[1])
        if selected is None:
            offset = get_tensor_model_parallel_rank() * local.shape[1]
            packed = shard_candidates(local, offset, self.vocab_size, k, top_k)
        else:
            cols, draft_ids = selected
            sub = local.index_select(1, cols)  # [N, n]; padded to the common width m
            if sub.shape[1] < width:
                sub = torch.nn.functional.pad(sub, (0, width - sub.shape[1]),
                                              value=float("-inf"))
            packed = shard_candidates(sub, 0, cols.numel(), k, top_k)  # ids: positions
            m = (packed.shape[1] - 1) // 2
            positions = packed[:, m:2 * m].long().clamp_(max=max(cols.numel() - 1, 0))
            ids = draft_ids[positions] if cols.numel() else torch.zeros_like(positions)
            packed[:, m:2 * m] = ids.float()
        return _merged_candidates(packed, self.tp_size, k, top_k, x.shape[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, H]`` projected features -> ``[*, Vd]`` logits on every rank."""
        if self.rows is not None:
            return torch.nn.functional.linear(x, self.rows)  # [*, Vd]
        local = _shard_logits(self.target_lm_head, x)  # [N, V_padded / tp]
        logits = _full_logits(local, self.tp_size, self.vocab_size)  # [N, V]
        if self.columns is not None:
            logits = logits.index_select(1, self.columns)  # [N, Vd]
        return logits.reshape(*x.shape[:-1], logits.shape[-1])


def _target_output_head(target_model: nn.Module) -> nn.Module:
    """The target's output head module (``lm_head``), for ``head="target"`` drafters."""
    head = getattr(target_model, "lm_head", None)
    if not isinstance(head, nn.Module) or getattr(head, "quant_method", None) is None:
        raise spec_config.ReDrafterConfigError(
            "this ReDrafter drafter scores tokens with the target's output head "
            f"(config drafter.head='target'), but {type(target_model).__name__} exposes "
            "no vLLM lm_head on this rank; use a drafter with its own head "
            "(train with --head drafter)")
    return head


class _CastEmbedding(nn.Module):
    """The target's input embedding (shared by reference) with its output in the
    drafter's dtype: ``[*]`` ids -> ``[*, H]``."""

    def __init__(self, embed: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = embed
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids).to(self.dtype)


def _input_embedding(target_model: nn.Module) -> nn.Module:
    """The target's token-embedding module (raw table lookup, as the drafter was trained).

    Tries ``target.model.embed_tokens`` (Llama-style vLLM models), then
    ``target.get_input_embeddings()``.
    """
    inner = getattr(target_model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if isinstance(embed, nn.Module):
        return embed
    getter = getattr(target_model, "get_input_embeddings", None)
    if callable(getter):
        module = getter()
        if isinstance(module, nn.Module):
            return module
    raise RuntimeError(
        f"ReDrafter cannot find the input embedding of {type(target_model).__name__} "
        "(looked for .model.embed_tokens and get_input_embeddings())"
    )


def _check_tree_attention(target_model: nn.Module) -> None:
    """Every attention layer of the target must run the tree backend and use only what
    it implements; raise a clear error otherwise (before any request is served)."""
    from vllm_redrafter.integration.tree_attention import (
        TreeCPUAttentionImpl,
        unsupported_features,
    )

    impls = [m.impl for m in target_model.modules() if hasattr(m, "impl") and hasattr(m, "kv_cache")]
    if not impls:
        raise spec_config.ReDrafterConfigError(
            "ReDrafter tree=true found no attention layers in the target model")
    for impl in impls:
        if not isinstance(impl, TreeCPUAttentionImpl):
            raise spec_config.ReDrafterConfigError(
                f"ReDrafter tree=true needs the tree attention backend, but the target "
                f"uses {type(impl).__name__}; use tree=false (chain mode)")
        missing = unsupported_features(impl)
        if missing:
            raise spec_config.ReDrafterConfigError(
                f"ReDrafter tree=true does not support {', '.join(missing)} in the "
                "target's attention; use tree=false (chain mode)")


class ReDrafterProposer:
    """vLLM ``custom_class`` proposer running ReDrafter's beam search (chain or tree).

    Args:
        vllm_config: the engine's ``VllmConfig``; ReDrafter settings are read from
            ``additional_config["redrafter"]`` (see ``integration/spec_config.py``).
    """

    lookup: LookupOptions | None = None
    """Context look-up branches joined with the beams (``lookup``, tree mode only)."""
    _cost_clock: Callable[[], float] = staticmethod(time.perf_counter)
    """The clock of the policy's costs: :func:`~vllm_redrafter.policy.cost_clock` of the
    device from :meth:`load_model` on (the thread's CPU time on a CPU)."""
    lookup_policy: DraftPolicy | None = None
    """With ``lookup.skip_beams_match``: the policy of the steps whose every request
    has a trusted look-up continuation (no beam search): its own acceptance, tree sizes
    and drafting cost, the target's step costs shared with :attr:`policy`."""
    _drafted_by: DraftPolicy | None = None
    """The policy that chose the last step's draft (fed that step's acceptance); None
    before the first step (then :attr:`policy`)."""
    _cycle: _Cycle | None = None
    """The last drafting call, closed by the next one."""

    def __init__(self, vllm_config: Any) -> None:
        from vllm_redrafter import plugin

        state = plugin.status()
        if state.get("status") != "active":
            raise RuntimeError(
                "ReDrafterProposer needs the vllm-redrafter plugin active in this "
                f"process, but its status is {state or 'not loaded'} "
                f"(vLLM {compat.vllm_version()}); check VLLM_PLUGINS / "
                "VLLM_REDRAFTER_ENABLED and the supported vLLM versions"
            )
        patches.ensure_applied(hooks.RUNNER_HOOK)
        patches.ensure_applied(hooks.PROFILE_HOOK)
        patches.ensure_applied(hooks.TIMER_HOOK)
        patches.ensure_applied(hooks.NO_DRAFT_HOOK)
        patches.ensure_applied(hooks.CPU_REWIND_FIX)
        check_engine_support(vllm_config)

        self.vllm_config = vllm_config
        self.settings = spec_config.settings_from_vllm_config(vllm_config)
        self.options = self.settings.options
        self.tree_mode = bool(self.options.tree)
        """Verify the deduplicated tree of all beams (``tree: true``)."""
        self.lookup = self.options.lookup if self.tree_mode else None
        self.wants_history = self.lookup is not None
        """Whether :class:`~vllm_redrafter.steps.DraftRequest` should carry the
        committed token ids (context look-up reads them)."""
        self._indices: dict[str, ContextIndex] = {}
        """Per request id, the incremental n-gram index of its tokens (look-up)."""
        self._proposed: dict[str, tuple[TreeDraft, tuple[int, ...]]] = {}
        """Last step's merged trees and their node sources, by request id."""
        self.accepted_sources = SourceCounts()
        """Accepted tree tokens by source (drafter, look-up, both), look-up mode."""
        if self.tree_mode:
            for name in tree_hooks.TREE_PATCHES:
                patches.ensure_applied(name)
        self.num_speculative_tokens = int(
            vllm_config.speculative_config.num_speculative_tokens
        )
        if self.num_speculative_tokens != self.options.num_speculative_tokens:
            mode = "tree" if self.tree_mode else "chain"
            raise spec_config.ReDrafterConfigError(
                f"num_speculative_tokens={self.num_speculative_tokens} must equal "
                f"{self.options.num_speculative_tokens} in {mode} mode (beam_width="
                f"{self.options.beam_width}, beam_length={self.options.beam_length})"
            )
        self.max_num_reqs = int(vllm_config.scheduler_config.max_num_seqs)
        self.dtype = vllm_config.model_config.dtype
        """The target's dtype."""
        self.draft_dtype = self.dtype
        """The drafter's dtype (option ``draft_dtype``; resolved in :meth:`load_model`)."""
        self._low_bit = False
        """Whether the drafter keeps low-bit (``draft_bits``) copies of its weights
        (option ``draft_int8``; resolved in :meth:`load_model`)."""
        self.drafter: RecurrentDrafter | None = None
        self.embed: nn.Module | None = None
        self.device: torch.device | None = None
        # Preallocated in load_model: [max_num_reqs] context rows / init tokens.
        self._rows_cpu = torch.zeros(self.max_num_reqs, dtype=torch.int64)
        self._init_cpu = torch.zeros(self.max_num_reqs, dtype=torch.int64)
        self._rows: torch.Tensor | None = None
        self._init: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        """Pinned ``[max_num_reqs, W*L + 1]`` staging buffer of the drafts (CUDA)."""
        self._graphed: GraphedSearch | None = None
        """The beam search replayed from CUDA graphs (CUDA, TP = 1, not enforce_eager)."""
        self.policy = DraftPolicy(
            max_length=self.options.num_draft_tokens,
            tree=(TreeSizeTable(self.options.beam_width, self.options.max_tree_drafts)
                  if self.tree_mode else None),
            adaptive=bool(self.options.adaptive))
        """Load-aware drafting: measured costs and acceptance, and the per-step choice."""
        self.lookup_policy = self._make_lookup_policy()
        self._step_beam_length = self.options.beam_length
        """Beam length of the step being drafted (``length + 1`` of the policy's choice)."""
        self.profiled_batch = 0
        """Largest batch of a :meth:`profile_run` (vLLM's memory profiling) so far."""
        self.draft_seconds = 0.0
        """Cumulative host seconds spent in :meth:`propose_step` (the final
        device-to-host copy of the drafts synchronises, so this covers device work)."""
        self.num_proposals = 0
        """Requests drafted so far on this rank."""
        self.beam_searches_skipped = 0
        """Drafting steps whose beam search was skipped for trusted look-up branches."""

    # ------------------------------------------------------------------ loading

    @torch.no_grad()
    def load_model(self, target_model: nn.Module) -> None:
        """Build the drafter next to ``target_model`` (called once per TP rank).

        Shares the target's input embedding by reference, loads the drafter weights in
        the target's dtype on its device, shards the output projection over TP, then
        preallocates the per-step buffers and runs a small warm-up beam search.
        """
        from vllm.config import set_current_vllm_config

        embed = _input_embedding(target_model)
        device = _runner_device(self.vllm_config)
        drafter_dir = self.settings.drafter_dir
        core = load_on_every_rank(lambda: load_drafter(drafter_dir),
                                  f"the drafter {drafter_dir}", _gather_over_tp_cpu_group)
        self.draft_dtype = resolve_draft_dtype(
            self.options.draft_dtype, self.dtype, core.dtype, core.config.uses_target_head)
        core = core.to(self.draft_dtype)
        self._low_bit = int8_wanted(self.options.draft_int8, device.type, self.draft_dtype)
        timed_head: LowBitRows | None = None  # the timing's low-bit copy of the own head
        if self._low_bit and self.options.draft_int8 == "auto":
            self._low_bit, timed_head = self._low_bit_measured(core)
        embed_dim = getattr(embed, "embedding_dim", core.hidden_size)
        if embed_dim != core.hidden_size:
            raise spec_config.ReDrafterConfigError(
                f"ReDrafter drafter hidden_size={core.hidden_size} does not match the "
                f"target embedding width {embed_dim}"
            )
        embed = _CastEmbedding(embed, self.draft_dtype)
        head: VocabParallelDraftHead | TargetDraftHead
        head_low_bit = False  # whether the head also has low-bit weights (own head, TP = 1)
        if core.config.uses_target_head:
            core = core.to(device).eval().requires_grad_(False)
            columns = core.draft_vocab.to(device) if core.draft_vocab is not None else None
            with set_current_vllm_config(self.vllm_config):
                head = TargetDraftHead(_target_output_head(target_model),
                                       core.config.vocab_size, columns)
            core.lm_head = head
        else:
            full_head = core.lm_head.weight.to(device)  # [Vd, E]
            with set_current_vllm_config(self.vllm_config), torch.device(device):
                head = VocabParallelDraftHead(
                    core.draft_vocab_size, core.config.exit_dim, self.draft_dtype
                )
            core.lm_head = head  # replaces the full projection; frees it on every rank
            core = core.to(device).eval().requires_grad_(False)
            head.load_full_weight(full_head)
            if self._low_bit:
                # the timed copy was built on the CPU ("auto" times only there)
                reuse = timed_head if device.type == "cpu" else None
                head_low_bit = head.enable_low_bit(full_head, self.options.draft_bits,
                                                   built=reuse)
        if self._low_bit:
            self._enable_low_bit(core, device, head_low_bit)

        self.drafter, self.embed, self.device = core, embed, device
        self._cost_clock = cost_clock(device.type)
        runner_state.set_cost_clock(self._cost_clock)  # the step timer's clock too
        self._rows = torch.zeros(self.max_num_reqs, dtype=torch.int64, device=device)
        self._init = torch.zeros(self.max_num_reqs, dtype=torch.int64, device=device)
        if device.type == "cuda":
            pin = {"pin_memory": True}
            self._rows_cpu = torch.zeros(self.max_num_reqs, dtype=torch.int64, **pin)
            self._init_cpu = torch.zeros(self.max_num_reqs, dtype=torch.int64, **pin)
            width = self.options.beam_width * self.options.beam_length + 1
            self._host = torch.zeros(self.max_num_reqs, width, dtype=torch.int64, **pin)
            if head.tp_size == 1 and not self.vllm_config.model_config.enforce_eager:
                self._graphed = GraphedSearch(
                    self._eager_beam_search, core.hidden_size, self.draft_dtype, device,
                    batch_buckets(self.max_num_reqs), CudaGraphBackend())
        if self.tree_mode:
            _check_tree_attention(target_model)
        self.dummy_run(min(WARMUP_REQUESTS, self.max_num_reqs))
        logger.info(
            "ReDrafter proposer ready: drafter %s (%s, %d parameters on this rank), "
            "head=%s, beam_width=%d, beam_length=%d, draft_top_k=%s, tp=%d, verification=%s, "
            "drafting=%s", self.settings.drafter_dir, self.draft_dtype, core.num_parameters(),
            core.config.head, self.options.beam_width, self.options.beam_length,
            self.options.draft_top_k, head.tp_size, "tree" if self.tree_mode else "chain",
            "CUDA graphs" if self._graphed is not None else "eager")

    def _low_bit_measured(self, core: RecurrentDrafter
                          ) -> tuple[bool, LowBitRows | None]:
        """``draft_int8: "auto"``: keep low-bit copies only if a one-row product through
        the drafter's largest own weight (its head) measures faster in ``draft_bits``
        here. Under TP every rank uses rank 0's measurement (ranks must draft alike).

        Returns ``(keep them, the timed copy)``; the copy is returned only when the timed
        weight is the drafter's own head, so that :meth:`load_model` keeps it rather than
        quantizing (and, in int4, packing) the head a second time."""
        from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

        weight = max((m.weight for m in core.modules() if type(m) is nn.Linear),
                     key=lambda w: w.numel(), default=None)  # [N, K]
        if weight is None:  # nothing of its own to quantize
            return False, None
        bits = self.options.draft_bits
        low = low_bit_rows(weight, bits)
        pays, plain, quantized = low_bit_pays(weight, bits, low=low)
        if get_tensor_model_parallel_world_size() > 1:
            pays = bool(get_tp_group().broadcast_object(pays, src=0))
        logger.info("draft_int8=auto: one row through the drafter's %s weight takes "
                    "%.3f ms in %s, %.3f ms in int%d: %s", tuple(weight.shape), plain,
                    self.draft_dtype, quantized, bits,
                    "low-bit weights kept" if pays else "low-bit weights not used")
        head = getattr(core.lm_head, "weight", None)
        return pays, (low if pays and weight is head else None)

    def _enable_low_bit(self, core: RecurrentDrafter, device: torch.device,
                        head_low_bit: bool) -> None:
        """``draft_int8``: ``draft_bits`` copies of the drafter's own linear layers
        (``head_low_bit``: whether the caller also kept the head in low bits); says when
        they cannot take effect."""
        wrapped = quantize_drafter_linears(core, bits=self.options.draft_bits)
        if device.type != "cpu" or self.draft_dtype != torch.bfloat16:
            logger.warning(
                "draft_int8: the int8 products serve bfloat16 drafting on CPU; this drafter "
                "runs in %s on %s, so they are never used (drop draft_int8 or set it to "
                "\"auto\", or serve bfloat16 / use a drafter stored in bfloat16)",
                self.draft_dtype, device.type)
        else:
            also = "and the head" if head_low_bit else "(not the head: TP > 1 or a target head)"
            logger.info("draft_int8=%s, draft_bits=%d: %d linear layers %s also kept in "
                        "%d bits (int8 where int4 cannot take the shape) for drafting "
                        "steps of up to %d rows", self.options.draft_int8,
                        self.options.draft_bits, wrapped, also, self.options.draft_bits,
                        LOW_BIT_MAX_ROWS)

    def _make_lookup_policy(self) -> DraftPolicy | None:
        """The look-up-only steps' policy (:attr:`lookup_policy`): its length is the
        look-up branches' depth, up to ``lookup.trusted_depth`` (else ``L - 1``)."""
        lookup = self.lookup
        if lookup is None or lookup.skip_beams_match is None:
            return None
        depth = lookup_depth(self.options.num_draft_tokens, lookup.trusted_depth)
        return DraftPolicy(
            max_length=depth,
            tree=TreeSizeTable(lookup.max_candidates, self.options.max_tree_drafts),
            adaptive=bool(self.options.adaptive), target=self.policy.target,
            plain=self.policy.plain)

    def profile_run(self, num_reqs: int) -> None:
        """The drafter's peak working memory, inside vLLM's memory profiling: one beam
        search at ``num_reqs`` (``max_num_seqs``) requests (hook ``runner-profile-drafter``)."""
        self.dummy_run(num_reqs)
        if self._graphed is not None:
            self._graphed.capture_all()  # graph pool memory is counted by the profiling
        self.profiled_batch = max(self.profiled_batch, num_reqs)
        logger.info(
            "ReDrafter drafter profiled at %d requests inside vLLM's memory profiling "
            "(beam search peak <= %.1f MiB by formula)", num_reqs,
            self.peak_bytes(num_reqs) / 2**20)

    def peak_bytes(self, num_reqs: int) -> int:
        """Upper bound of one beam search's working memory at ``num_reqs`` requests
        (:func:`vllm_redrafter.memory.beam_search_peak_bytes`)."""
        assert self.drafter is not None
        config = self.drafter.config
        head = self.drafter.lm_head
        tp = int(getattr(head, "tp_size", 1))
        extra = 0
        if tp > 1 and config.uses_target_head:
            extra = config.vocab_size // tp + 1  # this rank's V / tp slice of the head
        # own head under TP: only a Vd / tp shard and its temporary exist (sharded
        # candidates), inside the formula's Vd bound
        return beam_search_peak_bytes(
            num_reqs, self.options.beam_width, self.drafter.draft_vocab_size,
            max(config.hidden_size, config.exit_dim), self.draft_dtype,
            draft_top_k=self.options.draft_top_k, extra_columns=extra)

    def dummy_run(self, num_reqs: int) -> None:
        """One beam search on zero hidden states for ``num_reqs`` requests."""
        assert self.drafter is not None
        hidden = torch.zeros(
            num_reqs, self.drafter.hidden_size, dtype=self.draft_dtype, device=self.device
        )  # [B, H]
        init = torch.zeros(num_reqs, dtype=torch.int64, device=self.device)  # [B]
        self._eager_beam_search(hidden, init)

    # ---------------------------------------------------------------- proposing

    def _beam_search(self, hidden: torch.Tensor, init_tokens: torch.Tensor) -> torch.Tensor:
        """``hidden [B, H]``, ``init_tokens [B]`` -> beams ``[B, W, L]`` (best first),
        replayed from a CUDA graph when they are captured."""
        length = self._step_beam_length
        if self._graphed is not None and length == self.options.beam_length:
            return self._graphed(hidden.to(self.draft_dtype), init_tokens)
        return self._eager_beam_search(hidden, init_tokens, length)

    def _eager_beam_search(self, hidden: torch.Tensor, init_tokens: torch.Tensor,
                           beam_length: int | None = None) -> torch.Tensor:
        """The beam search itself (static shapes: what the CUDA graphs capture)."""
        assert self.drafter is not None and self.embed is not None
        beams = beam_search(
            self.drafter,
            self.embed,
            hidden.to(self.draft_dtype),
            init_tokens,
            self.options.beam_width,
            beam_length or self.options.beam_length,
            draft_top_k=self.options.draft_top_k,
            with_scores=False,  # only the tokens are proposed
        )
        return beams.tokens  # [B, W, L]

    def _to_device(
        self, values: list[int], cpu: torch.Tensor, dev: torch.Tensor | None
    ) -> torch.Tensor:
        """Copy ``values`` through the preallocated buffers; returns a ``[n]`` view."""
        n = len(values)
        cpu[:n] = torch.as_tensor(values, dtype=torch.int64)
        assert dev is not None
        dev[:n].copy_(cpu[:n], non_blocking=True)
        return dev[:n]

    def _draft_beams(self, step: DraftStep, hidden: torch.Tensor) -> torch.Tensor:
        """The beams of the step's requests: ``hidden [B, H]`` -> ``[B, W, L]`` (best
        first, column 0 = init token). Tests override this with oracles."""
        init = self._to_device(step.init_tokens, self._init_cpu, self._init)  # [B]
        return self._beam_search(hidden, init)

    @torch.inference_mode()
    def propose_step(self, step: DraftStep, sample_hidden_states: torch.Tensor) -> Proposal:
        """Draft for every request of ``step``.

        Args:
            step: the requests that sampled a token this step (context rows and init
                tokens, see :func:`vllm_redrafter.integration.runner.read_draft_step`).
            sample_hidden_states: ``[num_rows, H]`` post-norm target hidden states of
                this step's sampled rows.

        Returns:
            A :class:`~vllm_redrafter.steps.Proposal`: in tree mode, the deduplicated
            tree of the ``W`` beams for every request that a tree can serve; the best
            beam's ``L - 1`` tokens (a chain) for the others.
        """
        start, cost_start = time.perf_counter(), self._cost_clock()
        decode_only = self._decode_only(step.costs)  # before the cycle closes
        self._observe(step.costs, decode_only)
        self._close_cycle(step.costs, cost_start, decode_only)
        self._attribute(step)
        # {row: candidates} at the full depth: before the decision only where they pick
        # the policy, else only for a step that drafts (none on plain-decoding steps)
        found = self._find_lookups(step) if self.lookup_policy is not None else None
        policy = self._policy_for(step, found)
        self._drafted_by = policy
        length = self._draft_length(len(step.requests), policy)
        if length == 0:  # not worth drafting this step: plain decoding
            self.draft_seconds += time.perf_counter() - start
            proposal = Proposal()
            self._open_cycle(cost_start, len(step.requests), 0, policy, proposal)
            return proposal
        self._step_beam_length = length + 1
        if found is None:
            found = self._find_lookups(step)
        found = self._cut_lookups(found, length, keep_trusted=policy is self.policy)
        # the look-up policy's steps are look-up only (every request trusted at the full
        # depth); the other policy's skip the search too where all are trusted at length
        searched = (policy is self.policy
                    and not self._beams_not_needed(step, found, length))
        if searched:
            proposal = self._proposal(step, self._beams(step, sample_hidden_states), found)
        else:
            proposal = self._lookup_only_proposal(step, found)
            self.beam_searches_skipped += 1
        if proposal.trees and policy.tree is not None:
            sizes = [tree.num_nodes - 1 for tree in proposal.trees.values()]
            policy.tree.observe(length, sum(sizes) / len(sizes))
        if searched == (policy is self.policy):  # D(B, k) of the step's own kind: the
            policy.draft.observe(len(step.requests), length,  # beam search's
                                 self._cost_clock() - cost_start)
        self.draft_seconds += time.perf_counter() - start
        self.num_proposals += len(step.requests)
        self._open_cycle(cost_start, len(step.requests), length, policy, proposal)
        return proposal

    def _open_cycle(self, began: float, num_reqs: int, length: int, policy: DraftPolicy,
                    proposal: Proposal) -> None:
        """Remember this drafting call, to be closed by the next one."""
        decode_tokens = num_reqs + sum(len(d) for d in proposal.drafts.values())
        self._cycle = _Cycle(began, num_reqs, length, policy, self._cost_clock() - began,
                             decode_tokens)

    def _close_cycle(self, costs: StepCosts | None, now: float, decode_only: bool) -> None:
        """The cycle since the last drafting call, with the target's step measured inside
        it, to the policy that chose its draft (:meth:`DraftPolicy.observe_cycle`); only
        where that step decoded and verified the drafts and nothing else. A step that
        also prefilled (more tokens than the drafts and one per request) carries the new
        requests' scheduling: in-process at 64 requests such steps put a plain step's
        overhead at 57 ms against 5 ms for decode-only steps, which made drafting look
        1.26x faster than plain decoding. ``decode_only``: :meth:`_decode_only`."""
        last, self._cycle = self._cycle, None
        if not decode_only or costs is None or costs.forward_seconds is None:
            return
        last.policy.observe_cycle(last.num_reqs, last.length, now - last.began,
                                  costs.forward_seconds, last.spent)

    def _decode_only(self, costs: StepCosts | None) -> bool:
        """Whether the step that just ran decoded the open cycle's requests and verified
        its drafts and nothing more (no more tokens than one per request plus the
        drafts: no prefill beside them). Read before :meth:`_close_cycle` clears the
        cycle; both it and :meth:`_observe` take this one answer."""
        return (costs is not None and self._cycle is not None
                and costs.num_tokens <= self._cycle.decode_tokens)

    def _beams(self, step: DraftStep, sample_hidden_states: torch.Tensor) -> torch.Tensor:
        """The step's beams on the host, ``[B, W, L]`` (one device-to-host copy); raises
        ``FloatingPointError`` on a non-finite drafter input (the fault fallback)."""
        rows = self._to_device(step.rows, self._rows_cpu, self._rows)  # [B]
        hidden = sample_hidden_states.index_select(0, rows)  # [B, H]
        beams = self._draft_beams(step, hidden)  # [B, W, L] on the device
        finite = torch.isfinite(hidden).all(dim=-1)  # [B], checked after the one copy
        packed = torch.cat([beams.flatten(1), finite[:, None].to(beams.dtype)], 1)
        host = self._copy_to_host(packed)  # [B, W*L + 1]
        if not bool(host[:, -1].all()):
            raise FloatingPointError("non-finite target hidden state in the drafter's input")
        return host[:, :-1].reshape(beams.shape)  # [B, W, L]

    def _observe(self, costs: StepCosts | None, decode_only: bool) -> None:
        """Feed the finished step's measured cost and acceptance to the policy.

        Plain steps (prefills included) go to ``policy.plain``; steps that verified
        drafts to ``policy.target``, but only where they verified nothing else: a step
        that verified 4 requests' drafts beside a 50-token prefill computes 20 rows of
        logits for 70 tokens, and in ``bench`` (bf16, T=0.7, 2026-12-03) such steps
        priced verifying 14 requests x 5 tokens at 117 ms against 119 ms for a plain
        14-request step, so the policy drafted 4 tokens at 12-15 requests and lost."""
        if costs is None:
            return
        if costs.forward_seconds is not None:  # verification and plain steps apart
            if not costs.verified:
                self.policy.plain.observe(costs.num_tokens, costs.forward_seconds)
            elif decode_only:
                self.policy.target.observe(costs.num_tokens, costs.forward_seconds)
        # the depth drafted last step (a chain's length; a tree's depth, whatever its
        # node count)
        depth = self._step_beam_length - 1
        for drafted, accepted in costs.verified:
            (self._drafted_by or self.policy).acceptance.observe(min(drafted, depth),
                                                                accepted)

    def _attribute(self, step: DraftStep) -> None:
        """Count the sources of the tree tokens accepted last step (look-up mode)."""
        if self.lookup is None:
            return
        for req in step.requests:
            proposed = self._proposed.get(req.req_id)
            if proposed is not None and req.last_node is not None:
                tree, sources = proposed
                if req.last_node < tree.num_nodes:
                    self.accepted_sources.add(path_sources(tree, sources, req.last_node))
        self._proposed = {}

    def _policy_for(self, step: DraftStep, found: dict[int, list[Candidate]] | None
                    ) -> DraftPolicy:
        """:attr:`lookup_policy` for a step whose every request has a trusted look-up
        continuation at the full depth in ``found`` (its beam search will be skipped),
        else :attr:`policy`. Look-up is deterministic: every TP rank picks the same
        one."""
        full = self.options.num_draft_tokens
        if (self.lookup_policy is not None and found is not None
                and self._beams_not_needed(step, found, full)):
            return self.lookup_policy
        return self.policy

    def _draft_length(self, num_reqs: int, policy: DraftPolicy) -> int:
        """This step's draft length (0 = none) by ``policy``. Under TP every rank uses
        rank 0's choice (timings differ per rank; the beam search's collectives must
        not)."""
        length = policy.choose(num_reqs).length
        tp = int(getattr(getattr(self.drafter, "lm_head", None), "tp_size", 1))
        if tp > 1 and policy.adaptive:
            from vllm.distributed import get_tp_group

            length = int(get_tp_group().broadcast_object(length, src=0))
        return length

    def policy_stats(self) -> dict[str, float]:
        """The policy's counters (:meth:`DraftPolicy.counters`) and, with look-up, the
        accepted tokens by source (``accepted_drafter`` / ``_lookup`` / ``_both``), read
        by the bench."""
        counters = self.policy.counters()
        if self.lookup_policy is not None:  # both policies' steps
            for key, value in self.lookup_policy.counters().items():
                counters[key] += value
        if self.lookup is not None:
            counters.update({f"accepted_{k}": float(v)
                             for k, v in self.accepted_sources.as_dict().items()})
            counters["beams_skipped"] = float(self.beam_searches_skipped)
        return counters

    def _copy_to_host(self, packed: torch.Tensor) -> torch.Tensor:
        """The step's one device-to-host copy: into the pinned staging buffer on CUDA,
        then one stream synchronisation inside vLLM's allowed-sync scope."""
        if packed.device.type == "cpu":
            return packed
        if self._host is None or packed.numel() > self._host.numel():
            return packed.cpu()  # oracle drafts of another shape (tests)
        out = self._host.view(-1)[: packed.numel()].view(packed.shape)  # contiguous
        out.copy_(packed, non_blocking=True)
        with _sync_allowed():
            torch.cuda.current_stream().synchronize()
        return out

    def _find_lookups(self, step: DraftStep, depth: int | None = None
                      ) -> dict[int, list[Candidate]]:
        """Look-up continuations of every request a tree serves, by its index in
        ``step.requests``, up to ``depth`` (default the tree's full depth ``L - 1``) or
        ``lookup.trusted_depth`` where deeper (:meth:`_cut_lookups` cuts them to the
        step's depth); empty without look-up. The per-request indices are brought up to
        date; requests not drafted this step lose theirs."""
        if self.lookup is None:
            return {}
        if depth is None:
            depth = self.options.num_draft_tokens
        depth = lookup_depth(depth, self.lookup.trusted_depth)
        indices: dict[str, ContextIndex] = {}
        found = {i: self._lookup_candidates(req, depth, indices)
                 for i, req in enumerate(step.requests) if req.tree_ok}
        self._indices = indices
        return found

    def _cut_lookups(self, found: dict[int, list[Candidate]], depth: int,
                     keep_trusted: bool) -> dict[int, list[Candidate]]:
        """The continuations cut for this step. Beside the beams (``keep_trusted``):
        untrusted ones to the step's ``depth``, trusted ones keep their length with
        ``lookup.trusted_depth`` (else ``depth`` too). In a look-up-only step
        (:attr:`lookup_policy`, whose ``depth`` may exceed the tree's ``L - 1``): every
        one to ``depth``, untrusted ones also to ``L - 1``.

        Example (``L - 1 = 3``, ``skip_beams_match = 3``, ``trusted_depth = 6``), a
        trusted ``(9, 9, 1, 2, 3)`` and an untrusted ``(20, 21, 22, 23, 24, 25)``:
        beside beams of depth 2 -> ``(9, 9, 1, 2, 3)``, ``(20, 21)``; look-up only at
        depth 4 -> ``(9, 9, 1, 2)``, ``(20, 21, 22)``."""
        if self.lookup is None:
            return found
        skip = self.lookup.skip_beams_match
        if keep_trusted:
            deep = self.lookup.trusted_depth is not None
            return {i: cut_untrusted(c, depth, skip if deep else None)
                    for i, c in found.items()}
        tree_depth = min(depth, self.options.num_draft_tokens)
        return {i: cut_untrusted([Candidate(x.tokens[:depth], x.match) for x in c],
                                 tree_depth, skip) for i, c in found.items()}

    def _beams_not_needed(self, step: DraftStep, found: dict[int, list[Candidate]],
                          depth: int) -> bool:
        """Whether every request of the step has a trusted look-up continuation
        (``lookup.skip_beams_match``), so that the beam search can be skipped."""
        skip = self.lookup.skip_beams_match if self.lookup is not None else None
        return (skip is not None and len(found) == len(step.requests)
                and all(trusted(found[i], skip, depth) for i in found))

    def _lookup_only_proposal(self, step: DraftStep,
                              found: dict[int, list[Candidate]]) -> Proposal:
        """Trees of the look-up branches alone (the beam search was skipped)."""
        proposal = Proposal()
        for i, req in enumerate(step.requests):
            self._add_merged_tree(proposal, req, fill_order([], found[i], 0))
        return proposal

    def _add_merged_tree(self, proposal: Proposal, req: DraftRequest,
                         branches: list) -> None:
        """Merge ``branches`` below the request's init token (node budget
        ``num_speculative_tokens``) into its tree, remembering each node's source."""
        tree, sources = merge_branches(req.init_token, branches, self.num_speculative_tokens)
        proposal.trees[req.req_id] = tree
        proposal.drafts[req.req_id] = tree.drafts
        self._proposed[req.req_id] = (tree, sources)

    def _proposal(self, step: DraftStep, beams: torch.Tensor,
                  found: dict[int, list[Candidate]] | None = None) -> Proposal:
        """Chains (best beam) and trees (all beams, deduplicated; with look-up, merged
        with ``found``'s branches) from ``[B, W, L]``."""
        proposal = Proposal()
        cap = self.num_speculative_tokens
        tree_rows = [i for i, req in enumerate(step.requests) if self.tree_mode and req.tree_ok]
        chains = best_beam_drafts(beams, step, step.num_reqs, cap)  # batch order
        for req in step.requests:
            proposal.drafts[req.req_id] = chains[req.batch_index]
        if not tree_rows:
            return proposal
        if self.lookup is not None:
            if found is None:  # not looked up before the search: look up at the beams' depth
                depth = beams.shape[2] - 1
                found = self._cut_lookups(self._find_lookups(step, depth), depth,
                                          keep_trusted=True)
            self._merge_lookups(step, beams, tree_rows, proposal, found)
            return proposal
        packed = build_tree(beams[tree_rows])
        num_nodes = packed.num_nodes.tolist()
        tokens, parents, depths = (packed.packed_tokens.tolist(), packed.parents.tolist(),
                                   packed.depth.tolist())
        for k, i in enumerate(tree_rows):
            n = min(num_nodes[k], 1 + cap)
            tree = TreeDraft(tuple(tokens[k][:n]), tuple(parents[k][:n]), tuple(depths[k][:n]))
            req_id = step.requests[i].req_id
            proposal.trees[req_id] = tree
            proposal.drafts[req_id] = tree.drafts
        return proposal

    def _merge_lookups(self, step: DraftStep, beams: torch.Tensor, tree_rows: list[int],
                       proposal: Proposal, found: dict[int, list[Candidate]]) -> None:
        """Trees of the beams joined with each request's context look-up branches
        (:mod:`vllm_redrafter.lookup`), under the tree's node budget."""
        assert self.lookup is not None
        host = beams.tolist()  # [B][W][L]
        for i in tree_rows:
            branches = fill_order([beam[1:] for beam in host[i]], found.get(i, []),
                                  self.lookup.rank)
            self._add_merged_tree(proposal, step.requests[i], branches)

    def _lookup_candidates(self, req: DraftRequest, depth: int,
                           indices: dict[str, ContextIndex]) -> list:
        """Look-up continuations of one request (its index brought up to date), at most
        ``depth`` tokens each."""
        assert self.lookup is not None
        history = req.history
        if history is None or len(history) == 0 or int(history[-1]) != req.init_token:
            return []  # the committed tokens do not end with the init token: no look-up
        index = self._indices.get(req.req_id)
        if index is None:
            index = ContextIndex(self.lookup.min_match, self.lookup.max_match)
        index.sync(history)
        indices[req.req_id] = index
        return index.candidates(self.lookup.max_candidates, depth)

    def propose(self, *args: Any, **kwargs: Any) -> list[list[int]]:
        """vLLM's plain ``custom_class`` entry point: unusable for ReDrafter.

        It receives no hidden states; reaching it means the runner hook is missing.
        """
        raise RuntimeError(
            f"ReDrafterProposer.propose() was called without hidden states: the "
            f"vllm-redrafter patch {hooks.RUNNER_HOOK!r} is not active in this process"
        )

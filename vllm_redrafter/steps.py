# SPDX-License-Identifier: Apache-2.0
"""What one engine step hands the drafter, and what the drafter hands back (vLLM-free).

``vllm_redrafter.integration.runner`` is the only module that reads vLLM's model-runner
state; it turns a step into these small dataclasses, **keyed by request id** (vLLM
reorders its batch between steps, so a batch index is only meaningful inside one step),
and applies a :class:`Proposal` back. Everything here is plain Python and can be built
by hand in tests.

Glossary: ``W`` beam width, ``L`` beam length (includes the init token), ``N`` nodes of
one request's tree (node 0 is the root: the last committed token, never drafted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vllm_redrafter.acceptance import SAMPLING_EPS


@dataclass(frozen=True, slots=True)
class SamplingView:
    """The sampling parameters of one request that verification needs.

    Attributes:
        temperature: ``< SAMPLING_EPS`` means greedy.
        top_k: ``None``/``0``/``-1`` disable it.
        top_p: ``None``/``1.0`` disable it.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        """True when the request decodes greedily."""
        return self.temperature < SAMPLING_EPS


@dataclass(frozen=True, slots=True)
class DraftRequest:
    """One request that gets a draft this step.

    Attributes:
        req_id: vLLM request id.
        batch_index: its index in this step's batch (``input_batch.req_ids`` order).
        row: its context row in this step's ``sample_hidden_states`` (the target's
            hidden state after the last accepted token).
        init_token: the newest committed token (the drafter's first beam token).
        tree_ok: False when the request must be verified as a chain (structured
            output, penalties, bad words, logprobs, ... see
            :func:`tree_fallback_reason`).
        history: committed token ids so far (prompt + output, ending with
            ``init_token``), read-only; ``None`` when the caller did not provide them.
        last_node: the tree node whose path was accepted last step (``0``: none of its
            drafts), or None when the request was not verified as a tree.
    """

    req_id: str
    batch_index: int
    row: int
    init_token: int
    tree_ok: bool = False
    history: Sequence[int] | None = None
    last_node: int | None = None


@dataclass(frozen=True, slots=True)
class StepCosts:
    """What the step that just ran cost and yielded: load-aware drafting's inputs.

    Attributes:
        num_tokens: tokens the target computed in the step.
        forward_seconds: seconds from the start of the step's model execution to
            drafting (forward and sampling) by the policy's clock
            (:func:`vllm_redrafter.policy.cost_clock`: the thread's CPU time on a CPU),
            or None if not measured.
        verified: ``(drafted, accepted)`` per request that carried a draft: tokens (or
            tree nodes) drafted for it and draft tokens accepted.
    """

    num_tokens: int
    forward_seconds: float | None
    verified: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class DraftStep:
    """The requests to draft for in one step.

    Attributes:
        num_reqs: batch size (requests without a draft get ``[]``).
        requests: the requests that get a draft, in batch order.
        num_rows: rows of ``sample_hidden_states`` the step's layout implies.
        costs: what the step that just ran cost and yielded (None when unmeasured).
    """

    num_reqs: int
    requests: list[DraftRequest]
    num_rows: int
    costs: StepCosts | None = None

    @property
    def rows(self) -> list[int]:
        """Context row of every drafted request."""
        return [r.row for r in self.requests]

    @property
    def init_tokens(self) -> list[int]:
        """Init token of every drafted request."""
        return [r.init_token for r in self.requests]

    @property
    def req_indices(self) -> list[int]:
        """Batch index of every drafted request."""
        return [r.batch_index for r in self.requests]

    @property
    def num_active(self) -> int:
        """Number of drafted requests."""
        return len(self.requests)


@dataclass(frozen=True, slots=True)
class TreeDraft:
    """One request's deduplicated draft tree, flattened in topological order.

    Node 0 is the root (the committed init token); nodes ``1..N-1`` are drafted and
    reach vLLM as the draft list ``tokens[1:]``. Every parent precedes its children
    and a node's depth is its parent's plus one, so a node at depth ``d`` has index
    ``>= d``.

    Example (beams ``[A B C], [A B E], [A D F]``)::

        tokens  A B C E D F      parents -1 0 1 1 0 4      depths 0 1 2 2 1 2
    """

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not (n == len(self.parents) == len(self.depths)) or n == 0:
            raise ValueError(
                f"tree needs equal non-empty tokens/parents/depths, got {n}, "
                f"{len(self.parents)}, {len(self.depths)}"
            )
        if self.parents[0] != -1 or self.depths[0] != 0:
            raise ValueError("node 0 must be the root (parent -1, depth 0)")
        for node in range(1, n):
            parent = self.parents[node]
            if not 0 <= parent < node or self.depths[node] != self.depths[parent] + 1:
                raise ValueError(
                    f"node {node}: parent {parent} / depth {self.depths[node]} is not a "
                    "topologically ordered tree"
                )

    @property
    def num_nodes(self) -> int:
        """``N`` including the root."""
        return len(self.tokens)

    @property
    def drafts(self) -> list[int]:
        """The draft list vLLM schedules: every node but the root."""
        return list(self.tokens[1:])

    @property
    def is_chain(self) -> bool:
        """Whether the tree is a single path (node ``j`` at depth ``j``), which vLLM's
        chain verification handles exactly and more cheaply.

        Example: depths ``0 1 2 3`` -> True; ``0 1 2 2`` (two leaves) -> False.
        """
        return all(depth == node for node, depth in enumerate(self.depths))

    def truncated(self, num_drafts: int) -> TreeDraft:
        """The subtree of the first ``num_drafts`` drafted nodes (topological order
        keeps it a tree); used when vLLM schedules fewer drafts than proposed."""
        keep = 1 + max(0, num_drafts)
        return TreeDraft(self.tokens[:keep], self.parents[:keep], self.depths[:keep])


@dataclass(slots=True)
class Proposal:
    """The drafter's answer for one step, keyed by request id.

    Attributes:
        drafts: per request id, the draft token ids vLLM schedules (a chain, or a
            tree's ``drafts``).
        trees: the requests whose drafts are a tree (the rest are chains).
    """

    drafts: dict[str, list[int]] = field(default_factory=dict)
    trees: dict[str, TreeDraft] = field(default_factory=dict)

    def in_batch_order(self, req_ids: Sequence[str]) -> list[list[int]]:
        """Draft lists in the batch order vLLM expects (``[]`` when none)."""
        return [list(self.drafts.get(req_id, ())) for req_id in req_ids]


_FALLBACK_CHECKS: tuple[tuple[str, object, str], ...] = (
    ("logprobs", None, "logprobs"),
    ("prompt_logprobs", None, "prompt logprobs"),
    ("structured_outputs", None, "structured output"),
    ("bad_words", None, "bad words"),
    ("allowed_token_ids", None, "allowed_token_ids"),
    ("logit_bias", None, "logit_bias"),
    ("min_tokens", 0, "min_tokens"),
    ("min_p", 0.0, "min_p"),
    ("presence_penalty", 0.0, "presence penalty"),
    ("frequency_penalty", 0.0, "frequency penalty"),
    ("repetition_penalty", 1.0, "repetition penalty"),
)


def tree_fallback_reason(sampling_params: object | None) -> str | None:
    """Why a request must be verified as a chain, or None if a tree can serve it.

    A tree is verified by the plugin's own acceptance, which implements temperature,
    top-k, top-p and seeded sampling only. Everything that vLLM applies per position
    of a *chain* (grammars, penalties, bad words, logit processors, logprobs) keeps
    working by verifying the best beam as a chain instead.

    Args:
        sampling_params: a ``vllm.SamplingParams`` (read by attribute name) or None.

    Example: ``SamplingParams(temperature=0.7)`` -> None;
    ``SamplingParams(logprobs=2)`` -> ``"logprobs"``.
    """
    if sampling_params is None:
        return "no sampling parameters"
    for attr, neutral, reason in _FALLBACK_CHECKS:
        value = getattr(sampling_params, attr, neutral)
        if value is None and neutral is None:
            continue
        if isinstance(value, (Mapping, Sequence)) and not isinstance(value, str):
            if len(value) == 0:
                continue
            return reason
        if value != neutral:
            return reason
    return None

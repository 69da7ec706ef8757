# SPDX-License-Identifier: Apache-2.0
"""Configuration models: drafter architecture, runtime options, on-disk ``config.json``.

Three pydantic models, each with one job:

- :class:`DrafterConfig` describes the drafter's architecture (what the weights
  mean). It is frozen and forbids unknown keys: a typo must fail loudly, not build a
  different network.
- :class:`ReDrafterOptions` holds the runtime knobs of the proposer (beam width, beam
  length, tree verification, drafter top-k). Also frozen and strict.
- :class:`ReDrafterCheckpointConfig` is the speculators-style ``config.json`` written
  next to ``model.safetensors``. It allows unknown keys so that files written by newer
  tooling still load.

Glossary (see ``docs/design.md``): ``H`` target hidden size, ``E`` drafter width
(``exit_dim``), ``V`` target vocabulary, ``Vd`` draft vocabulary, ``W`` beam width,
``L`` beam length (includes the target's own first token).

This module never imports vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

CHECKPOINT_ARCHITECTURE = "ReDrafterForSpeculation"
"""``architectures[0]`` of our ``config.json``."""

SPECULATORS_MODEL_TYPE = "redrafter"
"""``speculators_model_type`` and ``speculators_config.algorithm`` of our files."""

PROPOSAL_TYPE = "redrafter_beam"
"""``proposal_type`` of the (single) proposal method our checkpoints advertise."""


class DrafterConfig(BaseModel):
    """Architecture of a :class:`~vllm_redrafter.drafter.RecurrentDrafter`.

    Attributes:
        hidden_size: ``H``, the target model's hidden size (RNN width, context width).
        vocab_size: ``V``, the target model's vocabulary size.
        exit_dim: ``E``, width of the ResBlock stack. When ``E != 2 * H`` an input
            projection ``Linear(2H, E)`` is added in front of the ResBlocks.
        num_draft_layers: number of ResBlocks ``z = z + SiLU(Linear(z))`` (may be 0).
        rnn: ``True`` for Apple's recurrent update ``s = SiLU(W e + U s + b)``;
            ``False`` for the running sum ``s = s + e``.
        draft_vocab: optional reduced output vocabulary: sorted, unique target token
            ids. The drafter's ``lm_head`` then has ``len(draft_vocab)`` rows and
            row ``j`` scores target token ``draft_vocab[j]``.
        head: where the output projection comes from. ``"drafter"`` (Apple's layout):
            the drafter owns ``lm_head: Linear(E, Vd)``. ``"target"``: the drafter
            owns only ``head_proj: Linear(E, H)`` and scores tokens with the
            **target's frozen output head** (its rows for ``draft_vocab``, or all of
            them), bound at load time and never stored in the checkpoint.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(gt=0, description="Target hidden size H.")
    vocab_size: int = Field(gt=0, description="Target vocabulary size V.")
    exit_dim: int = Field(gt=0, description="ResBlock width E; input_proj iff E != 2H.")
    num_draft_layers: int = Field(ge=0, description="Number of ResBlocks.")
    rnn: bool = Field(default=True, description="Recurrent update or running sum.")
    draft_vocab: list[int] | None = Field(
        default=None, description="Sorted unique target ids of the draft vocabulary."
    )
    head: Literal["drafter", "target"] = Field(
        default="drafter",
        description="Own output projection, or head_proj + the target's frozen head.",
    )

    @field_validator("draft_vocab")
    @classmethod
    def _check_draft_vocab_order(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if len(value) == 0:
            raise ValueError(
                "draft_vocab must be None or a non-empty list of target token ids"
            )
        for pos in range(1, len(value)):
            if value[pos] <= value[pos - 1]:
                raise ValueError(
                    "draft_vocab must be sorted strictly increasing (unique ids); "
                    f"found {value[pos - 1]} followed by {value[pos]} at index {pos}"
                )
        return value

    @model_validator(mode="after")
    def _check_draft_vocab_range(self) -> DrafterConfig:
        if self.draft_vocab is not None:
            # Sorted, so the extremes are the first and last entries.
            low, high = self.draft_vocab[0], self.draft_vocab[-1]
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    "draft_vocab entries must be in "
                    f"[0, vocab_size={self.vocab_size}); found {bad}"
                )
        return self

    @property
    def draft_vocab_size(self) -> int:
        """``Vd``: rows of the drafter's ``lm_head`` (``V`` without a draft vocab)."""
        if self.draft_vocab is None:
            return self.vocab_size
        return len(self.draft_vocab)

    @property
    def uses_target_head(self) -> bool:
        """Whether logits come from ``head_proj`` and the target's frozen head."""
        return self.head == "target"

    @property
    def has_input_proj(self) -> bool:
        """Whether the head starts with ``input_proj: Linear(2H, E)``."""
        return self.exit_dim != 2 * self.hidden_size


class LookupOptions(BaseModel):
    """Context look-up branches in the draft tree (:mod:`vllm_redrafter.lookup`).

    Attributes:
        max_candidates: look-up branches per request and step (1..16).
        min_match: shortest suffix of the newest tokens matched in the request's own
            prompt and output (1..16 tokens).
        max_match: longest suffix matched (``min_match``..32); longer matches are
            tried first.
        rank: how many of the drafter's beams claim the node budget before the look-up
            branches (0 = look-up first; ``beam_width`` = look-up last).
        extra_nodes: drafted nodes added to the tree's budget ``W * (L - 1)`` for the
            look-up branches (0..64); 0 keeps the drafter-only tree's budget.
        skip_beams_match: when a request's best look-up continuation follows a match of
            at least this many tokens and reaches the tree's depth, it is trusted: if
            every request of the step has one, the drafter's beam search is skipped and
            the trees hold the look-up branches alone (``min_match``..``max_match``);
            None always runs the beam search.
        trusted_depth: how long a trusted continuation (one that follows a match of at
            least ``skip_beams_match`` tokens) may be, beyond the tree's depth ``L - 1``
            (``L - 1``..64, within the node budget; needs ``skip_beams_match``). Text
            copied from the context is often accepted far past the beams' depth; other
            look-up branches stay at the tree's depth. None = the tree's depth.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_candidates: int = Field(default=2, ge=1, le=16,
                                description="Look-up branches per request and step.")
    min_match: int = Field(default=1, ge=1, le=16, description="Shortest suffix matched.")
    max_match: int = Field(default=4, ge=1, le=32, description="Longest suffix matched.")
    rank: int = Field(default=1, ge=0, le=64,
                      description="Beams placed before the look-up branches.")
    extra_nodes: int = Field(default=0, ge=0, le=64,
                             description="Nodes added to the tree budget W*(L-1).")
    skip_beams_match: int | None = Field(
        default=None, description="Match length that skips the beam search (None = never).")
    trusted_depth: int | None = Field(
        default=None, ge=1, le=64,
        description="Length of trusted continuations (None = the tree's depth).")

    @model_validator(mode="after")
    def _check_match_range(self) -> LookupOptions:
        if self.max_match < self.min_match:
            raise ValueError(
                f"lookup.max_match={self.max_match} must be >= lookup.min_match="
                f"{self.min_match}")
        skip = self.skip_beams_match
        if skip is not None and not self.min_match <= skip <= self.max_match:
            raise ValueError(
                f"lookup.skip_beams_match={skip} must be in [min_match={self.min_match}, "
                f"max_match={self.max_match}] (longer matches are never found), or null")
        if self.trusted_depth is not None and skip is None:
            raise ValueError(
                f"lookup.trusted_depth={self.trusted_depth} applies to trusted "
                "continuations: set lookup.skip_beams_match too (or drop "
                "trusted_depth)")
        return self


class ReDrafterOptions(BaseModel):
    """Runtime options of the ReDrafter proposer.

    Attributes:
        beam_width: ``W``, number of beams kept by the drafter's beam search (1..64).
        beam_length: ``L``, tokens per beam **including** the target's own first token
            (Apple's convention), so the drafter runs ``L - 1`` steps (2..16).
        tree: verify the deduplicated prefix tree of all beams instead of beam by beam.
        draft_top_k: if set, keep only the top-k drafter logits at each step
            (Apple uses 50); ``None`` disables the mask.
        adaptive: load-aware drafting: each step drafts the chain length (or the tree,
            or nothing) expected to give the most tokens per second from measured target
            and drafter costs and acceptance (:mod:`vllm_redrafter.policy`); the default,
            so that turning ReDrafter on never makes a loaded server slower. False drafts
            ``L - 1`` tokens (the whole tree) on every step (fixed speculation).
        lookup: context look-up branches joined with the beams in the tree
            (:class:`LookupOptions`; ``true`` for its defaults); None/``false`` = off.
            Needs ``tree``.
        draft_dtype: dtype the drafter runs in. ``"auto"``: the target's, except that a
            float32 target runs a drafter stored in 16 bits in its stored dtype (drafts
            are proposals, verified exactly: upcasting gains nothing but costs time);
            drafters scoring with the target's head always run in the target's dtype.
        draft_int8: also keep the drafter's own weights in int8 (one scale per row) and
            use them for the small products (up to 4 rows) of drafting steps on CPU in
            bfloat16 (:mod:`vllm_redrafter.quant`); drafts may differ slightly, outputs
            never do (drafts are verified exactly). ``"auto"`` (default): wherever they
            apply (CPU, bfloat16 drafting, a torch with the int8 product), silently
            off elsewhere; ``true`` also warns where they cannot apply (GPU, float32).
        draft_bits: width of those low-bit copies: ``4`` (default; a scale and an offset
            per 32 columns, half the bytes of int8, for every layer whose shape torch's
            CPU int4 product takes, 8-bit for the others) or ``8``. A batch-1 drafting
            step streams the drafter's weights from memory, so its time follows their
            bytes; offline τ is the same in both (``docs/bench/draft_int4.md``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Inclusive ranges, checked in one validator so that every message names the field
    # and both bounds (pydantic's default ge/le messages only name the violated bound).
    _RANGES: ClassVar[dict[str, tuple[int, int]]] = {
        "beam_width": (1, 64),
        "beam_length": (2, 16),
    }

    beam_width: int = Field(default=4, description="Beam width W, 1..64.")
    beam_length: int = Field(
        default=4, description="Beam length L including the init token, 2..16."
    )
    tree: bool = Field(default=False, description="Tree (deduplicated) verification.")
    draft_top_k: int | None = Field(
        default=None, description="Top-k mask on drafter logits (None = off), >= 1."
    )
    adaptive: bool = Field(
        default=True, description="Load-aware drafting from measured costs (false = fixed)."
    )
    lookup: LookupOptions | None = Field(
        default=None, description="Context look-up branches in the tree (needs tree)."
    )
    draft_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Drafter dtype (auto: see the class docstring)."
    )
    draft_int8: bool | Literal["auto"] = Field(
        default="auto",
        description="Weight-only int8 drafting for small CPU bf16 steps (auto: where it "
                    "applies).",
    )
    draft_bits: Literal[4, 8] = Field(
        default=4,
        description="Width of the draft_int8 low-bit weights: 4 (int4 where a layer's "
                    "shape allows, else 8) or 8.",
    )

    @field_validator("lookup", mode="before")
    @classmethod
    def _lookup_switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @model_validator(mode="after")
    def _lookup_needs_tree(self) -> ReDrafterOptions:
        if self.lookup is None:
            return self
        if not self.tree:
            raise ValueError(
                "lookup branches join the draft tree: set \"tree\": true with \"lookup\" "
                "(or drop \"lookup\")")
        if self.lookup.rank > self.beam_width:
            raise ValueError(
                f"lookup.rank={self.lookup.rank} must be <= beam_width={self.beam_width} "
                "(the beams placed before the look-up branches)")
        deep = self.lookup.trusted_depth
        depth, budget = self.beam_length - 1, self.max_tree_drafts
        if deep is not None and not depth <= deep <= budget:
            raise ValueError(
                f"lookup.trusted_depth={deep} must be in [beam_length - 1 = {depth}, "
                f"{budget}] (the tree's depth, the tree's node budget W*(L-1) + "
                "extra_nodes): raise lookup.extra_nodes for longer trusted "
                "continuations")
        return self

    @field_validator("beam_width", "beam_length")
    @classmethod
    def _check_range(cls, value: int, info: ValidationInfo) -> int:
        low, high = cls._RANGES[info.field_name]
        if not low <= value <= high:
            raise ValueError(
                f"{info.field_name} must be an integer in [{low}, {high}], got {value}"
            )
        return value

    @field_validator("draft_top_k")
    @classmethod
    def _check_top_k(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(
                f"draft_top_k must be None or an integer >= 1, got {value}"
            )
        return value

    @property
    def num_draft_tokens(self) -> int:
        """Drafted tokens per beam, ``L - 1`` (the init token is not drafted)."""
        return self.beam_length - 1

    @property
    def max_tree_drafts(self) -> int:
        """Most drafted tree nodes per request (the tree's node budget): ``W * (L - 1)``
        (all beams disjoint after the shared root; the root is the committed token, not
        a draft), plus ``lookup.extra_nodes`` with look-up branches."""
        extra = self.lookup.extra_nodes if self.lookup is not None else 0
        return self.beam_width * (self.beam_length - 1) + extra

    @property
    def num_speculative_tokens(self) -> int:
        """Draft slots vLLM must schedule per request and step: ``L - 1`` in chain
        mode, the tree's node budget :attr:`max_tree_drafts` in tree mode.

        Example: ``W = 4, L = 5``: 4 in chain mode, 16 in tree mode (17 nodes with
        the root)."""
        return self.max_tree_drafts if self.tree else self.num_draft_tokens

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ReDrafterOptions:
        """Build options from a plain mapping (CLI flags, vLLM ``speculative_config``).

        Raises:
            ValueError: on unknown keys (the message lists them and the allowed keys)
                or on invalid values (``pydantic.ValidationError`` is a ``ValueError``).

        Example: ``ReDrafterOptions.from_mapping({"beam_width": 8}).beam_width == 8``.
        """
        allowed = sorted(cls.model_fields)
        unknown = sorted(str(key) for key in values if key not in cls.model_fields)
        if unknown:
            raise ValueError(
                f"unknown ReDrafter option(s) {unknown}; allowed options: {allowed}"
            )
        return cls.model_validate(dict(values))


class ProposalMethod(BaseModel):
    """One entry of ``speculators_config.proposal_methods``."""

    model_config = ConfigDict(extra="allow")

    proposal_type: str
    speculative_tokens: int = Field(ge=1, description="Drafted tokens per step, L - 1.")
    beam_width: int | None = Field(default=None, ge=1)
    beam_length: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _tokens_match_length(self) -> ProposalMethod:
        if (
            self.beam_length is not None
            and self.speculative_tokens != self.beam_length - 1
        ):
            raise ValueError(
                f"speculative_tokens={self.speculative_tokens} must equal "
                f"beam_length - 1 = {self.beam_length - 1}"
            )
        return self


class VerifierSection(BaseModel):
    """``speculators_config.verifier``: the target model the drafter was trained for."""

    model_config = ConfigDict(extra="allow")

    # vLLM reads this key unconditionally, so it is always written (possibly null).
    name_or_path: str | None = None
    architectures: list[str] = Field(default_factory=list)


class SpeculatorsSection(BaseModel):
    """``speculators_config`` of a speculators-format checkpoint."""

    model_config = ConfigDict(extra="allow")

    algorithm: Literal["redrafter"] = SPECULATORS_MODEL_TYPE
    proposal_methods: list[ProposalMethod] = Field(min_length=1)
    default_proposal_method: str = PROPOSAL_TYPE
    verifier: VerifierSection = Field(default_factory=VerifierSection)

    @model_validator(mode="after")
    def _default_exists(self) -> SpeculatorsSection:
        types = [method.proposal_type for method in self.proposal_methods]
        if self.default_proposal_method not in types:
            raise ValueError(
                f"default_proposal_method {self.default_proposal_method!r} is not "
                f"one of the proposal_methods' proposal_type values {types}"
            )
        return self


class ReDrafterCheckpointConfig(BaseModel):
    """Our ``config.json``, in the speculators layout that vLLM recognises.

    Example (abridged)::

        {"architectures": ["ReDrafterForSpeculation"],
         "speculators_model_type": "redrafter",
         "drafter": {"hidden_size": 4096, "vocab_size": 32000, "exit_dim": 8192,
                     "num_draft_layers": 2, "rnn": true, "draft_vocab": null},
         "speculators_config": {"algorithm": "redrafter",
             "proposal_methods": [{"proposal_type": "redrafter_beam",
                 "speculative_tokens": 3, "beam_width": 4, "beam_length": 4}],
             "default_proposal_method": "redrafter_beam",
             "verifier": {"name_or_path": "lmsys/vicuna-7b-v1.3",
                          "architectures": ["LlamaForCausalLM"]}},
         "transformer_layer_config": {"hidden_size": 4096, "vocab_size": 32000}}

    Unknown top-level keys (``torch_dtype``, ``transformers_version``, ...) are kept.
    """

    model_config = ConfigDict(extra="allow")

    architectures: list[str] = Field(default_factory=lambda: [CHECKPOINT_ARCHITECTURE])
    speculators_model_type: Literal["redrafter"] = SPECULATORS_MODEL_TYPE
    speculators_version: str | None = None
    drafter: DrafterConfig
    speculators_config: SpeculatorsSection
    transformer_layer_config: dict[str, Any]

    @model_validator(mode="after")
    def _consistent(self) -> ReDrafterCheckpointConfig:
        for key in ("hidden_size", "vocab_size"):
            if key in self.transformer_layer_config:
                found = self.transformer_layer_config[key]
                expected = getattr(self.drafter, key)
                if found != expected:
                    raise ValueError(
                        f"transformer_layer_config.{key}={found} disagrees with "
                        f"drafter.{key}={expected}"
                    )
        return self

    @classmethod
    def make(
        cls,
        drafter: DrafterConfig,
        options: ReDrafterOptions | None = None,
        verifier: str | None = None,
        verifier_architectures: list[str] | None = None,
        **extra: Any,
    ) -> ReDrafterCheckpointConfig:
        """Build the ``config.json`` model for ``drafter``.

        Args:
            drafter: the architecture.
            options: default beam settings advertised in ``proposal_methods``
                (``ReDrafterOptions()`` when omitted).
            verifier: the target model's name or path (``None`` when unknown).
            verifier_architectures: the target's HF architectures, e.g.
                ``["LlamaForCausalLM"]``.
            extra: additional top-level keys (e.g. ``torch_dtype="float32"``).
        """
        opts = options if options is not None else ReDrafterOptions()
        method = ProposalMethod(
            proposal_type=PROPOSAL_TYPE,
            speculative_tokens=opts.num_draft_tokens,
            beam_width=opts.beam_width,
            beam_length=opts.beam_length,
        )
        section = SpeculatorsSection(
            proposal_methods=[method],
            default_proposal_method=PROPOSAL_TYPE,
            verifier=VerifierSection(
                name_or_path=verifier, architectures=list(verifier_architectures or [])
            ),
        )
        return cls(
            drafter=drafter,
            speculators_config=section,
            transformer_layer_config={
                "hidden_size": drafter.hidden_size,
                "vocab_size": drafter.vocab_size,
            },
            **extra,
        )

    def default_options(self) -> ReDrafterOptions:
        """The beam settings of the default proposal method (missing ones defaulted)."""
        section = self.speculators_config
        method = next(
            m
            for m in section.proposal_methods
            if m.proposal_type == section.default_proposal_method
        )
        values: dict[str, Any] = {}
        if method.beam_width is not None:
            values["beam_width"] = method.beam_width
        values["beam_length"] = (
            method.beam_length
            if method.beam_length is not None
            else method.speculative_tokens + 1
        )
        return ReDrafterOptions(**values)

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready dict. ``None`` values are kept: vLLM requires the key
        ``speculators_config.verifier.name_or_path`` even when it is null."""
        return self.model_dump(mode="json")

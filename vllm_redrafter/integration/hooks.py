# SPDX-License-Identifier: Apache-2.0
"""The guarded vLLM hooks of ReDrafter's chain mode; each registers itself in the ledger.

==============================  ==================================================  =========
patch                           target                                               applied
==============================  ==================================================  =========
runner-propose-draft-hook       ``GPUModelRunner.propose_draft_token_ids``           proposer
runner-profile-drafter          ``GPUModelRunner.profile_run``                       proposer
runner-step-timer               ``GPUModelRunner.execute_model``                     proposer
runner-sample-without-drafts    ``GPUModelRunner._sample``                           proposer
engine-args-redrafter-config    ``EngineArgs.create_speculative_config``             plugin
cli-speculative-model-arg       ``EngineArgs.add_cli_args``                          plugin
cli-speculative-model-merge     ``EngineArgs.from_cli_args``                         plugin
refusal-guard                   ``EngineArgs.create_speculative_config``             refused
cpu-expand-kernel-fix           ``cpu_triton_utils._expand_kernel_impl`` (CPU only)  plugin
==============================  ==================================================  =========

(The last one lives in :mod:`vllm_redrafter.integration.cpu_fixes`, imported here.)

Each ``apply`` function checks the vLLM version and the exact parameter list of what it
wraps (``compat.require_parameters``), raises :class:`PatchError` on a mismatch, marks the
wrapper so that a second application is a no-op, and keeps the original reachable as
``wrapper.__wrapped__``. ``docs/patches.md`` is the rendered ledger.
"""

from __future__ import annotations

import argparse
import functools
import inspect
from collections.abc import Mapping
from typing import Any

from vllm_redrafter.integration import compat, spec_config
from vllm_redrafter.integration import runner as runner_state
from vllm_redrafter.integration.patches import (
    Patch,
    PatchError,
    is_patched,
    mark_patched,
    register_patch,
    wrap_runner_method,
)
from vllm_redrafter.logger import get_logger

logger = get_logger(__name__)

# --------------------------------------------------------------------------------------
# runner-propose-draft-hook: give the proposer the target's hidden states
# --------------------------------------------------------------------------------------

RUNNER_HOOK = "runner-propose-draft-hook"
RUNNER_PARAMETERS = (
    "self",
    "scheduler_output",
    "sampled_token_ids",
    "sampling_metadata",
    "hidden_states",
    "sample_hidden_states",
    "aux_hidden_states",
    "spec_decode_metadata",
    "common_attn_metadata",
    "slot_mappings",
)


def _apply_runner_hook() -> None:
    def wrap(original: Any, signature: inspect.Signature) -> Any:
        @functools.wraps(original)
        def propose_draft_token_ids(self: Any, *args: Any, **kwargs: Any) -> Any:
            drafter = runner_state.redrafter_of(self)
            if drafter is None:
                return original(self, *args, **kwargs)
            arguments = signature.bind(self, *args, **kwargs).arguments
            # Point-mass acceptance: the beam is a deterministic proposal, so vLLM's
            # rejection sampler must get no draft probabilities (q(x) = 1).
            self._draft_probs = None
            self._draft_prob_req_ids = None
            return runner_state.propose_drafts(
                self,
                drafter,
                sampled_token_ids=arguments["sampled_token_ids"],
                sample_hidden_states=arguments["sample_hidden_states"],
                spec_decode_metadata=arguments["spec_decode_metadata"],
                scheduler_output=arguments["scheduler_output"],
            )

        return propose_draft_token_ids

    wrap_runner_method(RUNNER_HOOK, "propose_draft_token_ids", RUNNER_PARAMETERS, wrap)


register_patch(
    Patch(
        name=RUNNER_HOOK,
        target="vllm.v1.worker.gpu_model_runner.GPUModelRunner.propose_draft_token_ids",
        why="vLLM's custom_class proposer API passes only token ids to propose(); "
        "ReDrafter needs the target's post-norm hidden state of each request's last "
        "accepted token, which only exists inside this method's caller.",
        how="Wrapper bound with the original's signature: when the runner's drafter has "
        "propose_step() and method is custom_class, it clears the draft probabilities "
        "(point-mass acceptance) and hands the step to integration/runner.py, which "
        "builds the vLLM-free DraftStep (context rows, init tokens, tree eligibility), "
        "calls propose_step(step, sample_hidden_states) and registers the proposal's "
        "trees; otherwise it calls the original unchanged. Applied lazily when ReDrafterProposer is built in a model "
        "runner, so front-end processes never import the runner module.",
        remove_when="custom_class proposers receive hidden states / spec-decode metadata "
        "upstream (e.g. a propose(..., target_hidden_states=...) extension), or vLLM "
        "gains a proposer registry with a hidden-state-aware interface.",
        apply=_apply_runner_hook,
        stage="proposer",
    )
)


# --------------------------------------------------------------------------------------
# runner-profile-drafter: the drafter's peak memory inside vLLM's memory profiling
# --------------------------------------------------------------------------------------

PROFILE_HOOK = "runner-profile-drafter"
PROFILE_PARAMETERS = ("self", "randomize_inputs")


def _apply_profile_hook() -> None:
    def wrap(original: Any, _: inspect.Signature) -> Any:
        @functools.wraps(original)
        def profile_run(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            runner_state.profile_drafter(self)
            return result

        return profile_run

    wrap_runner_method(PROFILE_HOOK, "profile_run", PROFILE_PARAMETERS, wrap)


register_patch(
    Patch(
        name=PROFILE_HOOK,
        target="vllm.v1.worker.gpu_model_runner.GPUModelRunner.profile_run",
        why="vLLM's memory profiling (the peak that sizes the KV cache under "
        "gpu_memory_utilization) runs the target and the built-in drafters but never a "
        "custom_class proposer, so the drafter's beam-search working memory at a full "
        "batch would be outside the budget and could run out of memory under load.",
        how="After the original profile run (still inside vLLM's memory_profiling "
        "context, whose peak statistics it reset), integration/runner.py calls the "
        "proposer's profile_run(max_num_seqs): one beam search at the largest batch on "
        "dummy inputs, so its peak is part of what vLLM measures. Other proposers: "
        "nothing. On CPU the same happens when vLLM warms up a compiled model (the "
        "RSS-based KV sizing); eager CPU runs size the KV cache from "
        "VLLM_CPU_KVCACHE_SPACE and never profile.",
        remove_when="vLLM calls custom_class proposers' dummy_run during profile_run "
        "(as it does for EAGLE/MTP drafters).",
        apply=_apply_profile_hook,
        stage="proposer",
    )
)


# --------------------------------------------------------------------------------------
# runner-step-timer: when a step's model execution starts (load-aware drafting)
# --------------------------------------------------------------------------------------

TIMER_HOOK = "runner-step-timer"
TIMER_PARAMETERS = ("self", "scheduler_output", "intermediate_tensors")


def _apply_timer_hook() -> None:
    def wrap(original: Any, _: inspect.Signature) -> Any:
        @functools.wraps(original)
        def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            runner_state.note_step_start()
            return original(self, *args, **kwargs)

        return execute_model

    wrap_runner_method(TIMER_HOOK, "execute_model", TIMER_PARAMETERS, wrap)


register_patch(
    Patch(
        name=TIMER_HOOK,
        target="vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model",
        why="Load-aware drafting needs the measured cost of a target step against the "
        "tokens it verifies; vLLM times no step inside the worker.",
        how="Wrapper records the policy's cost clock (the thread's CPU time on a CPU, "
        "else time.perf_counter()) in integration/runner.py, then calls the "
        "original; the propose hook turns it into the step's forward seconds (with "
        "scheduler_output.total_num_scheduled_tokens) for the proposer's cost model.",
        remove_when="vLLM exposes per-step forward timings to speculative proposers (or "
        "adaptive draft lengths upstream).",
        apply=_apply_timer_hook,
        stage="proposer",
    )
)


# --------------------------------------------------------------------------------------
# runner-sample-without-drafts: steps that carry no draft use vLLM's plain sampler
# --------------------------------------------------------------------------------------

NO_DRAFT_HOOK = "runner-sample-without-drafts"
NO_DRAFT_PARAMETERS = ("self", "logits", "spec_decode_metadata")


def _apply_no_draft_hook() -> None:
    def wrap(original: Any, _: inspect.Signature) -> Any:
        @functools.wraps(original)
        def _sample(self: Any, logits: Any, spec_decode_metadata: Any) -> Any:
            if runner_state.step_has_no_drafts(self, spec_decode_metadata):
                return original(self, logits, None)
            return original(self, logits, spec_decode_metadata)

        return _sample

    wrap_runner_method(NO_DRAFT_HOOK, "_sample", NO_DRAFT_PARAMETERS, wrap)


register_patch(
    Patch(
        name=NO_DRAFT_HOOK,
        target="vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample",
        why="With any speculative config vLLM 0.32 builds spec-decode metadata on every "
        "step and samples through the rejection sampler even when no request carries a "
        "draft; at temperature > 0 that draws exponential noise over [tokens, vocab] "
        "every step (~15-20% of a batch-16 step on CPU), so steps the load-aware policy "
        "leaves undrafted would be slower than plain decoding.",
        how="When the runner's drafter is ReDrafter and the step's metadata has zero draft "
        "tokens for every request, the original is called with spec_decode_metadata=None: "
        "vLLM's plain sampler (the distribution the rejection sampler gives with no "
        "drafts; output [B, 1], which bookkeeping handles in both paths). Steps with "
        "drafts are unchanged.",
        remove_when="vLLM skips the rejection sampler for steps without draft tokens.",
        apply=_apply_no_draft_hook,
        stage="proposer",
    )
)


# --------------------------------------------------------------------------------------
# engine-args-redrafter-config: method="redrafter" -> custom_class + additional_config
# --------------------------------------------------------------------------------------

CONFIG_HOOK = "engine-args-redrafter-config"
CONFIG_PARAMETERS = ("self", "target_model_config", "target_parallel_config")
_FLAG_KEYS = (
    ("spec_method", "method"),
    ("spec_model", "model"),
    ("spec_tokens", "num_speculative_tokens"),
)


def _v2_runner_forced() -> bool:
    """Whether the user forced vLLM's Model Runner V2 on (``VLLM_USE_V2_MODEL_RUNNER=1``;
    unset lets vLLM pick V1 for ``custom_class`` drafting by itself)."""
    import vllm.envs as envs

    return bool(envs.VLLM_USE_V2_MODEL_RUNNER)


def _user_spec_view(engine_args: Any) -> dict[str, Any] | None:
    """The user's speculative config as vLLM would merge it (dict + --spec-* flags)."""
    spec = engine_args.speculative_config
    view = dict(spec) if isinstance(spec, Mapping) else None
    for attr, key in _FLAG_KEYS:
        value = getattr(engine_args, attr, None)
        if value is not None:
            view = {} if view is None else view
            view.setdefault(key, value)
    return view


def _target_sizes(target_model_config: Any) -> tuple[int | None, int | None]:
    """(hidden size, vocabulary size) of the target ModelConfig."""
    return target_model_config.get_hidden_size(), target_model_config.get_vocab_size()


def _check_target_tokenizer(engine_args: Any, target_model_config: Any,
                            drafter_dir: str) -> None:
    """The drafter's recorded tokenizer fingerprint against the target's tokenizer
    (skipped with ``skip_tokenizer_init``: token-id-only serving has no tokenizer)."""
    if getattr(target_model_config, "skip_tokenizer_init", False):
        return
    spec_config.check_tokenizer(
        drafter_dir, getattr(target_model_config, "tokenizer", None),
        revision=getattr(target_model_config, "tokenizer_revision", None),
        trust_remote_code=bool(getattr(target_model_config, "trust_remote_code", False)))


def _store_settings(engine_args: Any, settings: spec_config.ReDrafterSettings) -> None:
    """Put the settings into ``engine_args.additional_config["redrafter"]``."""
    key = compat.ADDITIONAL_CONFIG_KEY
    additional = engine_args.additional_config
    additional = dict(additional) if isinstance(additional, Mapping) else {}
    new = settings.to_dict()
    old = additional.get(key)
    if old is not None and old != new:
        raise spec_config.ReDrafterConfigError(
            f"additional_config[{key!r}]={old!r} conflicts with the ReDrafter settings "
            f"given in speculative_config ({new!r}); give them in one place only"
        )
    additional[key] = new
    engine_args.additional_config = additional


def _apply_config_hook() -> None:
    compat.require_vllm_version(CONFIG_HOOK)
    from vllm.engine.arg_utils import EngineArgs

    current = compat.require_attribute(CONFIG_HOOK, EngineArgs, "create_speculative_config")
    if is_patched(current, CONFIG_HOOK):
        return
    compat.require_parameters(CONFIG_HOOK, current, CONFIG_PARAMETERS)
    fields = getattr(EngineArgs, "__dataclass_fields__", {})
    needed = ["speculative_config", "additional_config"] + [a for a, _ in _FLAG_KEYS]
    missing = [name for name in needed if name not in fields]
    if missing:
        raise PatchError(f"patch {CONFIG_HOOK}: EngineArgs lacks fields {missing}")
    original = current

    @functools.wraps(original)
    def create_speculative_config(
        self: Any, target_model_config: Any, target_parallel_config: Any
    ) -> Any:
        view = _user_spec_view(self)
        if spec_config.is_redrafter_request(view) or spec_config.is_custom_class_request(
            view
        ):
            spec_config.check_engine_options(
                int(getattr(target_parallel_config, "pipeline_parallel_size", 1)),
                getattr(self, "async_scheduling", None), _v2_runner_forced())
        if spec_config.is_redrafter_request(view):
            assert view is not None
            hidden, vocab = _target_sizes(target_model_config)
            vllm_spec, settings = spec_config.translate_speculative_config(
                view, target_hidden_size=hidden, target_vocab_size=vocab
            )
            _check_target_tokenizer(self, target_model_config, settings.drafter_dir)
            _store_settings(self, settings)
            # The --spec-* flags were folded into the view; vLLM must not re-merge them.
            for attr, _ in _FLAG_KEYS:
                setattr(self, attr, None)
            self.speculative_config = vllm_spec
            logger.info(
                "ReDrafter speculative decoding: drafter %s, beam_width=%d, "
                "beam_length=%d, num_speculative_tokens=%d (%s verification)",
                settings.drafter_dir,
                settings.options.beam_width,
                settings.options.beam_length,
                settings.num_speculative_tokens,
                "tree" if settings.options.tree else "chain",
            )
        elif spec_config.is_custom_class_request(view):
            assert view is not None
            hidden, vocab = _target_sizes(target_model_config)
            spec_config.validate_custom_class_settings(
                self.additional_config,
                view.get("num_speculative_tokens"),
                target_hidden_size=hidden,
                target_vocab_size=vocab,
            )
        return original(self, target_model_config, target_parallel_config)

    EngineArgs.create_speculative_config = mark_patched(create_speculative_config, CONFIG_HOOK)


register_patch(
    Patch(
        name=CONFIG_HOOK,
        target="vllm.engine.arg_utils.EngineArgs.create_speculative_config",
        why="SpeculativeConfig is a closed pydantic dataclass (method is a Literal, "
        "extra keys are forbidden), so speculative_config={'method': 'redrafter', "
        "'beam_width': ...} cannot reach vLLM as given.",
        how="Before the original builds SpeculativeConfig from the user's dict (LLM(...), "
        "--speculative-config, --spec-* flags), a ReDrafter request is validated in "
        "process 0 (options, drafter config.json vs target hidden/vocab sizes, "
        "pipeline parallelism and forced async scheduling refused, "
        "num_speculative_tokens == beam_length - 1) and rewritten to method="
        "'custom_class', model=<ReDrafterProposer path>; the settings move to "
        "additional_config['redrafter'], which vLLM hashes and pickles to every worker.",
        remove_when="vLLM lets plugins register speculative methods with their own "
        "config keys (a method registry or an extra-config field on SpeculativeConfig).",
        apply=_apply_config_hook,
    )
)


# --------------------------------------------------------------------------------------
# cli-speculative-model-*: `vllm serve <target> --speculative-model redrafter:<dir>`
# --------------------------------------------------------------------------------------

CLI_ARG_HOOK = "cli-speculative-model-arg"
CLI_MERGE_HOOK = "cli-speculative-model-merge"
CLI_OPTION = "--speculative-model"
CLI_DEST = "speculative_model"


def parse_speculative_model(value: str) -> str:
    """argparse ``type`` of ``--speculative-model``: ``redrafter:<dir>`` -> ``<dir>``."""
    drafter_dir = spec_config.strip_model_prefix(value)
    if not drafter_dir:
        raise argparse.ArgumentTypeError(
            f"expected redrafter:<drafter checkpoint dir>, got {value!r} (other "
            "speculative methods are configured with --speculative-config)"
        )
    return value


def merge_speculative_model(args: argparse.Namespace) -> None:
    """Fold ``args.speculative_model`` into ``args.speculative_config`` (in place).

    Raises:
        ValueError: if ``--speculative-config`` names another method or model.
    """
    value = getattr(args, CLI_DEST, None)
    if value is None:
        return
    drafter_dir = spec_config.strip_model_prefix(value)
    spec = getattr(args, "speculative_config", None)
    spec = dict(spec) if isinstance(spec, Mapping) else {}
    for key, wanted in (("method", spec_config.REDRAFTER_METHOD), ("model", drafter_dir)):
        found = spec.get(key)
        if key == "model" and found is not None:
            found = spec_config.strip_model_prefix(found) or found
        if found is not None and found != wanted:
            raise ValueError(
                f"{CLI_OPTION} {value} conflicts with --speculative-config "
                f"{key}={spec.get(key)!r}"
            )
    spec["method"] = spec_config.REDRAFTER_METHOD
    spec["model"] = drafter_dir
    args.speculative_config = spec
    setattr(args, CLI_DEST, None)


def _apply_cli_arg_hook() -> None:
    compat.require_vllm_version(CLI_ARG_HOOK)
    from vllm.engine.arg_utils import EngineArgs

    raw = EngineArgs.__dict__.get("add_cli_args")
    if not isinstance(raw, staticmethod):
        raise PatchError(
            f"patch {CLI_ARG_HOOK}: EngineArgs.add_cli_args is not a staticmethod"
        )
    current = raw.__func__
    if is_patched(current, CLI_ARG_HOOK):
        return
    compat.require_parameters(CLI_ARG_HOOK, current, ("parser",))
    original = current

    @functools.wraps(original)
    def add_cli_args(parser: Any) -> Any:
        parser = original(parser)
        if CLI_OPTION not in getattr(parser, "_option_string_actions", {}):
            parser.add_argument(
                CLI_OPTION,
                dest=CLI_DEST,
                type=parse_speculative_model,
                default=None,
                metavar="redrafter:DIR",
                help="ReDrafter speculative decoding with the drafter checkpoint in DIR "
                "(vllm-redrafter plugin). Shorthand of --speculative-config "
                "'{\"method\": \"redrafter\", \"model\": \"DIR\"}'; beam settings default "
                "to the checkpoint's and can be set in --speculative-config.",
            )
        return parser

    EngineArgs.add_cli_args = staticmethod(mark_patched(add_cli_args, CLI_ARG_HOOK))


def _apply_cli_merge_hook() -> None:
    compat.require_vllm_version(CLI_MERGE_HOOK)
    from vllm.engine.arg_utils import EngineArgs

    raw = EngineArgs.__dict__.get("from_cli_args")
    if not isinstance(raw, classmethod):
        raise PatchError(
            f"patch {CLI_MERGE_HOOK}: EngineArgs.from_cli_args is not a classmethod"
        )
    current = raw.__func__
    if is_patched(current, CLI_MERGE_HOOK):
        return
    compat.require_parameters(CLI_MERGE_HOOK, current, ("cls", "args"))
    original = current

    @functools.wraps(original)
    def from_cli_args(cls: Any, args: argparse.Namespace) -> Any:
        merge_speculative_model(args)
        return original(cls, args)

    EngineArgs.from_cli_args = classmethod(mark_patched(from_cli_args, CLI_MERGE_HOOK))


register_patch(
    Patch(
        name=CLI_ARG_HOOK,
        target="vllm.engine.arg_utils.EngineArgs.add_cli_args",
        why="The design card's shorthand `vllm serve <target> --speculative-model "
        "redrafter:<dir>` needs a CLI option vLLM 0.32 does not have.",
        how="Wrapper calls the original, then adds --speculative-model (type-checked to "
        "redrafter:<dir>) unless the parser already has it. vLLM loads general plugins "
        "before building the serve parser (AsyncEngineArgs.add_cli_args), so the option "
        "exists for `vllm serve`.",
        remove_when="The shorthand is dropped in favour of --speculative-config, or vLLM "
        "offers a plugin hook for CLI options.",
        apply=_apply_cli_arg_hook,
    )
)
register_patch(
    Patch(
        name=CLI_MERGE_HOOK,
        target="vllm.engine.arg_utils.EngineArgs.from_cli_args",
        why="from_cli_args only copies EngineArgs dataclass fields, so the parsed "
        "--speculative-model value would be dropped.",
        how="Wrapper folds args.speculative_model into args.speculative_config as "
        "{'method': 'redrafter', 'model': <dir>} (error on a conflicting method/model), "
        "then calls the original.",
        remove_when="Same as cli-speculative-model-arg.",
        apply=_apply_cli_merge_hook,
    )
)


# --------------------------------------------------------------------------------------
# refusal-guard: a clear error when the plugin refused this vLLM version
# --------------------------------------------------------------------------------------

REFUSAL_GUARD = "refusal-guard"

_refusal = {"reason": "the vllm-redrafter plugin is not active in this process"}


def set_refusal_reason(reason: str) -> None:
    """The cause the refusal guard's error names (set by the plugin before installing)."""
    _refusal["reason"] = reason


def _apply_refusal_guard() -> None:
    """Installed only when the plugin refused the vLLM version: best effort, no checks
    beyond the attribute's existence (the version is unsupported by definition)."""
    from vllm.engine.arg_utils import EngineArgs

    current = getattr(EngineArgs, "create_speculative_config", None)
    if current is None or is_patched(current, REFUSAL_GUARD):
        return
    original = current

    @functools.wraps(original)
    def create_speculative_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        view = _user_spec_view(self)
        if spec_config.is_redrafter_request(view) or spec_config.is_custom_class_request(
            view
        ):
            raise RuntimeError(
                f"ReDrafter speculative decoding is unavailable: {_refusal['reason']}")
        return original(self, *args, **kwargs)

    EngineArgs.create_speculative_config = mark_patched(create_speculative_config, REFUSAL_GUARD)


register_patch(
    Patch(
        name=REFUSAL_GUARD,
        target="vllm.engine.arg_utils.EngineArgs.create_speculative_config",
        why="On an unsupported vLLM, or when a patch failed at plugin load (all were "
        "rolled back), the plugin applies none of its patches, so a ReDrafter config "
        "would fail with an unrelated pydantic error.",
        how="Only when the plugin refused the vLLM version or failed to load: a wrapper "
        "that raises a RuntimeError naming the cause (versions, or the failed patch) if "
        "the speculative config asks for ReDrafter, and calls the original otherwise.",
        remove_when="Never needed on supported versions; remove with the version gate.",
        apply=_apply_refusal_guard,
        stage="refused",
    )
)


# vLLM CPU-backend bug fixes, registered in the same ledger (see its module docstring).
from vllm_redrafter.integration import cpu_fixes  # noqa: E402,F401
from vllm_redrafter.integration import tree_hooks  # noqa: E402,F401

CPU_REWIND_FIX = cpu_fixes.CPU_REWIND_FIX
"""Applied by the proposer (imported from here so that the ledger keeps its order)."""

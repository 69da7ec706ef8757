# SPDX-License-Identifier: Apache-2.0
"""User-facing configuration: ``speculative_config={"method": "redrafter", ...}``.

vLLM knows nothing about ReDrafter; what it does have is the experimental ``custom_class``
speculative method (a proposer class loaded by dotted path). This module translates the
user's ReDrafter request into that form, validates it, and decides what every process
will see:

* ``speculative_config`` becomes ``{"method": "custom_class", "model":
  PROPOSER_CLASS_PATH, "num_speculative_tokens": L - 1, <other vLLM keys unchanged>}``;
* the ReDrafter settings (drafter directory, beam width and length, ...) travel in
  ``VllmConfig.additional_config["redrafter"]``, a plain JSON-able dict that vLLM hashes
  into the config hash and pickles to every worker, including Ray actors.

Accepted user forms (all equivalent)::

    speculative_config={"method": "redrafter", "model": "/ckpt", "beam_width": 4,
                        "beam_length": 4}                   # num_speculative_tokens derived
    speculative_config={"model": "redrafter:/ckpt", ...}       # shorthand of the above
    --speculative-model redrafter:/ckpt                         # CLI shorthand (hooks.py)
    speculative_config={"method": "custom_class", "model": PROPOSER_CLASS_PATH,
                        "num_speculative_tokens": 3},
    additional_config={"redrafter": {"model": "/ckpt", "beam_width": 4, "beam_length": 4}}

Everything here runs in process 0 (the ``LLM`` / API-server process) before any worker
starts, so a bad setting fails fast with a message naming the field. This module does not
import vLLM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vllm_redrafter.config import DrafterConfig, ReDrafterOptions
from vllm_redrafter.integration.compat import ADDITIONAL_CONFIG_KEY, PROPOSER_CLASS_PATH
from vllm_redrafter.logger import get_logger

REDRAFTER_METHOD = "redrafter"
"""``speculative_config["method"]`` that selects ReDrafter."""

MODEL_PREFIX = "redrafter:"
"""``--speculative-model redrafter:<dir>`` / ``"model": "redrafter:<dir>"`` shorthand."""

OPTION_KEYS: tuple[str, ...] = tuple(ReDrafterOptions.model_fields)
"""ReDrafter knobs accepted inside ``speculative_config`` (beam_width, beam_length, ...)."""

CHAIN_BEAM_WIDTH = 1
"""Chain mode's beam width unless the user gives ``beam_width``: greedy drafting. A chain
verifies one path; the drafter's greedy path is accepted at least as often as the best of
``W`` beams (which maximises the joint draft probability, not the first token's) and costs
one row per step instead of ``W``: offline on all 80 MT-Bench first turns, chain tau 1.66
(W=1), 1.65 (W=2), 1.64 (W=4); the checkpoint's advertised ``W`` serves tree mode."""


class ReDrafterConfigError(ValueError):
    """A ReDrafter setting is invalid or inconsistent with the target model."""


@dataclasses.dataclass(frozen=True)
class ReDrafterSettings:
    """Resolved ReDrafter settings, as carried in ``additional_config["redrafter"]``.

    Attributes:
        drafter_dir: absolute path of the drafter checkpoint directory.
        options: validated runtime options (beam width/length, tree, draft_top_k).
    """

    drafter_dir: str
    options: ReDrafterOptions

    @property
    def num_speculative_tokens(self) -> int:
        """Tokens vLLM must schedule per request and step: ``L - 1`` in chain mode,
        ``W * (L - 1)`` in tree mode (see ``ReDrafterOptions.num_speculative_tokens``)."""
        return self.options.num_speculative_tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form stored in ``additional_config["redrafter"]``."""
        return {"model": self.drafter_dir, **self.options.model_dump(mode="json")}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ReDrafterSettings:
        """Inverse of :meth:`to_dict` (no checkpoint access, no defaults from disk).

        Raises:
            ReDrafterConfigError: missing ``model`` or invalid options.
        """
        values = dict(values)
        drafter_dir = values.pop("model", None)
        if not isinstance(drafter_dir, str) or not drafter_dir:
            raise ReDrafterConfigError(
                f"additional_config[{ADDITIONAL_CONFIG_KEY!r}] needs 'model': the "
                f"drafter checkpoint directory; got {drafter_dir!r}"
            )
        return cls(drafter_dir=drafter_dir, options=_options(values))


def _options(values: Mapping[str, Any]) -> ReDrafterOptions:
    """``ReDrafterOptions.from_mapping`` with errors re-raised as ReDrafterConfigError."""
    try:
        return ReDrafterOptions.from_mapping(values)
    except (ValidationError, ValueError) as err:
        raise ReDrafterConfigError(f"invalid ReDrafter option: {_short(err)}") from err


def _short(err: Exception) -> str:
    """One-line summary of a pydantic error (field name + message), else ``str(err)``."""
    if isinstance(err, ValidationError):
        parts = []
        for item in err.errors():
            loc = ".".join(str(x) for x in item.get("loc", ())) or "value"
            msg = str(item.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}")
        return "; ".join(parts)
    return str(err)


def strip_model_prefix(model: Any) -> str | None:
    """``"redrafter:/ckpt"`` -> ``"/ckpt"``; anything else -> None."""
    if isinstance(model, str) and model.startswith(MODEL_PREFIX):
        return model[len(MODEL_PREFIX):]
    return None


def is_redrafter_request(spec: Mapping[str, Any] | None) -> bool:
    """Whether a user ``speculative_config`` mapping asks for ReDrafter.

    True for ``method == "redrafter"`` and for a ``model`` spelled ``redrafter:<dir>``.
    """
    if not isinstance(spec, Mapping):
        return False
    method = spec.get("method")
    if method == REDRAFTER_METHOD:
        return True
    if method not in (None, REDRAFTER_METHOD):
        return False
    return strip_model_prefix(spec.get("model")) is not None


def is_custom_class_request(spec: Mapping[str, Any] | None) -> bool:
    """Whether ``spec`` names our proposer through vLLM's ``custom_class`` method."""
    return isinstance(spec, Mapping) and spec.get("model") == PROPOSER_CLASS_PATH


def load_drafter_config(
    drafter_dir: str | Path,
) -> tuple[Path, DrafterConfig, ReDrafterOptions]:
    """Read a drafter checkpoint's ``config.json`` (ours or Apple's).

    Returns:
        ``(absolute directory, architecture, beam defaults advertised by the checkpoint)``.

    Raises:
        ReDrafterConfigError: the directory or its config is missing or invalid.
    """
    from vllm_redrafter.checkpoint import load_checkpoint_config

    path = Path(drafter_dir).expanduser()
    if not path.is_dir():
        raise ReDrafterConfigError(
            f"ReDrafter drafter directory {str(drafter_dir)!r} does not exist or is not a "
            "directory (speculative_config['model'] must be a local drafter checkpoint "
            "directory holding config.json and model.safetensors)"
        )
    try:
        checkpoint = load_checkpoint_config(path)
    except (OSError, ValueError) as err:
        raise ReDrafterConfigError(f"cannot read ReDrafter drafter config: {err}") from err
    return path.resolve(), checkpoint.drafter, checkpoint.default_options()


logger = get_logger(__name__)


def check_tokenizer(drafter_dir: str | Path, target_tokenizer: str | None, *,
                    revision: str | None = None, trust_remote_code: bool = False) -> str:
    """Refuse a drafter trained for another tokenizer than the target's.

    The drafter's ``config.json`` records the fingerprint of its target's tokenizer
    (:func:`vllm_redrafter.checkpoint.tokenizer_fingerprint`, written at export); the
    serving target's tokenizer must have the same one. Same vocabulary *size* is not
    enough: another model family's tokenizer numbers its tokens otherwise, and every
    draft would then be wrong (slow, never incorrect).

    Returns:
        What was checked: ``"match"``, or why nothing was (``"no fingerprint"``: the
        drafter records none; ``"no tokenizer"``: the target runs without one).

    Raises:
        ReDrafterConfigError: the fingerprints differ.
    """
    from vllm_redrafter.checkpoint import (
        fingerprint_of_tokenizer,
        read_tokenizer_fingerprint,
    )

    expected = read_tokenizer_fingerprint(drafter_dir)
    if expected is None:
        return "no fingerprint"
    if target_tokenizer is None:
        return "no tokenizer"
    found = fingerprint_of_tokenizer(target_tokenizer, revision=revision,
                                     trust_remote_code=trust_remote_code)
    if found is None:
        logger.warning("ReDrafter: the target tokenizer %s could not be loaded locally to "
                       "check it against the drafter's; not checked", target_tokenizer)
        return "no tokenizer"
    if found != expected:
        raise ReDrafterConfigError(
            f"ReDrafter drafter {str(drafter_dir)!r} was trained for another tokenizer "
            f"(fingerprint {expected}) than the target's {target_tokenizer!r} ({found}): "
            "its drafts would never match the target's tokens. Use a drafter trained for "
            "this target (vllm-redrafter train --target ...), or serve the target it was "
            "trained for")
    return "match"


def check_against_target(
    drafter: DrafterConfig,
    drafter_dir: str | Path,
    target_hidden_size: int | None,
    target_vocab_size: int | None,
) -> None:
    """Reject a drafter trained for a target of another hidden size or vocabulary.

    Raises:
        ReDrafterConfigError: naming both sizes.
    """
    if target_hidden_size is not None and drafter.hidden_size != target_hidden_size:
        raise ReDrafterConfigError(
            f"ReDrafter drafter {drafter_dir} has hidden_size={drafter.hidden_size} but "
            f"the target model's hidden_size is {target_hidden_size}; the drafter must "
            "be trained on this target's hidden states"
        )
    if target_vocab_size is not None and drafter.vocab_size != target_vocab_size:
        raise ReDrafterConfigError(
            f"ReDrafter drafter {drafter_dir} has vocab_size={drafter.vocab_size} but "
            f"the target model's vocab_size is {target_vocab_size}; the drafter must "
            "use the target's vocabulary"
        )


MAX_SPEC_TOKENS = 128
"""vLLM's rejection sampler asserts at most this many draft tokens per request
(``rejection_sampler.MAX_SPEC_LEN``)."""


def _check_tree_size(options: ReDrafterOptions) -> None:
    if options.num_speculative_tokens > MAX_SPEC_TOKENS:
        raise ReDrafterConfigError(
            f"ReDrafter tree mode with beam_width={options.beam_width} and beam_length="
            f"{options.beam_length} can draft {options.num_speculative_tokens} tree nodes "
            f"per step, more than vLLM's limit of {MAX_SPEC_TOKENS}; lower beam_width, "
            "beam_length or lookup.extra_nodes so that beam_width * (beam_length - 1) + "
            "extra_nodes <= 128"
        )


def _check_num_tokens(value: Any, options: ReDrafterOptions, *, derived_from: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReDrafterConfigError(
            f"num_speculative_tokens must be an integer, got {value!r}"
        )
    if value != options.num_speculative_tokens:
        if options.tree:
            rule = (f"in tree mode it must equal beam_width * (beam_length - 1) "
                    f"(+ lookup.extra_nodes) = {options.num_speculative_tokens}")
        else:
            rule = f"in chain mode it must equal beam_length - 1 = {options.num_draft_tokens}"
        raise ReDrafterConfigError(
            f"num_speculative_tokens={value} is inconsistent with ReDrafter "
            f"beam_width={options.beam_width}, beam_length={options.beam_length} "
            f"({derived_from}): {rule}; omit num_speculative_tokens to have it derived"
        )


ASYNC_SCHEDULING_MESSAGE = (
    "ReDrafter needs synchronous scheduling: each step's draft is computed from the "
    "target's hidden state at the token that step accepted, which async scheduling has "
    "not committed yet when it schedules the next step; remove --async-scheduling "
    "(async_scheduling=True). vLLM turns it off by itself for ReDrafter when it is not "
    "forced on")


V2_RUNNER_MESSAGE = (
    "ReDrafter needs vLLM's V1 model runner, but Model Runner V2 is forced on "
    "(VLLM_USE_V2_MODEL_RUNNER=1): V2 has no custom_class speculator API, so the drafter "
    "could not run; unset VLLM_USE_V2_MODEL_RUNNER (vLLM then picks V1 for ReDrafter by "
    "itself) or set it to 0")


def check_engine_options(pipeline_parallel_size: int, async_scheduling: bool | None,
                         v2_model_runner: bool | None = None) -> None:
    """Engine options ReDrafter cannot run with, refused at start-up.

    Args:
        pipeline_parallel_size: the engine's pipeline-parallel size.
        async_scheduling: the user's (or the resolved) async-scheduling setting.
        v2_model_runner: whether vLLM's Model Runner V2 is forced on (or in use).

    Raises:
        ReDrafterConfigError: pipeline parallelism > 1, async scheduling forced on, or
            Model Runner V2 forced on.
    """
    if v2_model_runner:
        raise ReDrafterConfigError(V2_RUNNER_MESSAGE)
    if pipeline_parallel_size > 1:
        raise ReDrafterConfigError(
            f"ReDrafter does not support pipeline parallelism (pipeline_parallel_size="
            f"{pipeline_parallel_size}): the drafter runs on the last pipeline stage and "
            "needs the target's input embedding, which only the first stage holds; use "
            "tensor parallelism (tensor_parallel_size) across the GPUs instead")
    if async_scheduling:
        raise ReDrafterConfigError(ASYNC_SCHEDULING_MESSAGE)


def translate_speculative_config(
    spec: Mapping[str, Any],
    *,
    target_hidden_size: int | None,
    target_vocab_size: int | None,
) -> tuple[dict[str, Any], ReDrafterSettings]:
    """Turn a user ReDrafter ``speculative_config`` into vLLM's ``custom_class`` form.

    Resolution of the beam settings (first that applies): explicit ``beam_width`` /
    ``beam_length`` keys; ``beam_length = num_speculative_tokens + 1`` if only the latter
    is given; in chain mode ``beam_width = 1`` (:data:`CHAIN_BEAM_WIDTH`); the defaults
    advertised by the checkpoint's ``config.json``.

    Args:
        spec: the user mapping (``method``/``model`` plus ReDrafter and vLLM keys).
        target_hidden_size: the target's hidden size (None skips the check).
        target_vocab_size: the target's vocabulary size (None skips the check).

    Returns:
        ``(vLLM speculative_config dict, settings for additional_config)``.

    Raises:
        ReDrafterConfigError: with a message naming the offending key.
    """
    values = {str(k).replace("-", "_"): v for k, v in spec.items()}
    method = values.pop("method", None)
    if method not in (None, REDRAFTER_METHOD):
        raise ReDrafterConfigError(f"not a ReDrafter speculative_config: method={method!r}")
    model = values.pop("model", None)
    drafter_dir = strip_model_prefix(model) or model
    if not isinstance(drafter_dir, str) or not drafter_dir:
        raise ReDrafterConfigError(
            "speculative_config with method='redrafter' needs 'model': the drafter "
            f"checkpoint directory; got {model!r}"
        )
    user_options = {key: values.pop(key) for key in OPTION_KEYS if key in values}
    num_tokens = values.pop("num_speculative_tokens", None)

    path, drafter, defaults = load_drafter_config(drafter_dir)
    merged = defaults.model_dump()
    tree_requested = bool(user_options.get("tree", merged.get("tree", False)))
    if (
        "beam_length" not in user_options
        and not tree_requested
        and isinstance(num_tokens, int)
        and not isinstance(num_tokens, bool)
    ):
        merged["beam_length"] = num_tokens + 1
        source = "derived from num_speculative_tokens"
    else:
        source = "given" if "beam_length" in user_options else "the checkpoint default"
    if not tree_requested:
        merged["beam_width"] = CHAIN_BEAM_WIDTH  # replaced below if the user gave one
    merged.update(user_options)
    options = _options(merged)
    _check_num_tokens(num_tokens, options, derived_from=source)
    _check_tree_size(options)
    from vllm_redrafter.drafter import check_draft_dtype

    try:
        check_draft_dtype(options.draft_dtype, drafter.uses_target_head)
    except ValueError as exc:
        raise ReDrafterConfigError(f"draft_dtype={options.draft_dtype!r}: {exc}") from None
    check_against_target(drafter, path, target_hidden_size, target_vocab_size)

    settings = ReDrafterSettings(drafter_dir=str(path), options=options)
    vllm_spec = {
        **values,
        "method": "custom_class",
        "model": PROPOSER_CLASS_PATH,
        "num_speculative_tokens": settings.num_speculative_tokens,
    }
    return vllm_spec, settings


def validate_custom_class_settings(
    additional_config: Mapping[str, Any] | None,
    num_speculative_tokens: Any,
    *,
    target_hidden_size: int | None,
    target_vocab_size: int | None,
) -> ReDrafterSettings:
    """Validate the ``custom_class`` + ``additional_config["redrafter"]`` form.

    Raises:
        ReDrafterConfigError: missing/invalid settings or a mismatch with the target.
    """
    raw = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if not isinstance(raw, Mapping):
        raise ReDrafterConfigError(
            f"speculative_config model={PROPOSER_CLASS_PATH!r} needs the ReDrafter "
            f"settings in additional_config[{ADDITIONAL_CONFIG_KEY!r}] (e.g. "
            '{"model": "<drafter dir>", "beam_width": 4, "beam_length": 4}); '
            'or use speculative_config={"method": "redrafter", "model": "<drafter dir>"}'
        )
    settings = ReDrafterSettings.from_dict(raw)
    path, drafter, _ = load_drafter_config(settings.drafter_dir)
    _check_num_tokens(num_speculative_tokens, settings.options, derived_from="given")
    _check_tree_size(settings.options)
    check_against_target(drafter, path, target_hidden_size, target_vocab_size)
    return dataclasses.replace(settings, drafter_dir=str(path))


def settings_from_vllm_config(vllm_config: Any) -> ReDrafterSettings:
    """The settings a worker reads back from ``vllm_config.additional_config``.

    Raises:
        ReDrafterConfigError: if the settings are absent or invalid.
    """
    additional = getattr(vllm_config, "additional_config", None)
    raw = additional.get(ADDITIONAL_CONFIG_KEY) if isinstance(additional, Mapping) else None
    if not isinstance(raw, Mapping):
        raise ReDrafterConfigError(
            "ReDrafterProposer found no settings in "
            f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]; configure ReDrafter with "
            'speculative_config={"method": "redrafter", "model": "<drafter dir>"} '
            "(with the vllm-redrafter plugin active) or pass the settings there"
        )
    return ReDrafterSettings.from_dict(raw)

# SPDX-License-Identifier: Apache-2.0
"""Training options: one pydantic model, from which ``vllm-redrafter train``'s flags derive.

Every field of :class:`TrainConfig` carries its command-line flag, argument group and help
text (``json_schema_extra``), so the CLI cannot drift from the trainer: a new option is one
field. The model is saved in the checkpoint and in ``RUN/train_config.json``; resuming with
different options is refused.

Example::

    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    cfg = config_from_args(parser.parse_args(["--steps", "3", "--draft-vocab", "full"]))
    assert cfg.num_steps == 3 and cfg.draft_vocab_size is None
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _opt(default: Any, flag: str, group: str, help: str = "", **kwargs: Any) -> Any:
    """A field with its CLI flag, group and help text."""
    return Field(default, description=help,
                 json_schema_extra={"flag": flag, "group": group}, **kwargs)


class TrainConfig(BaseModel):
    """Hyper-parameters of :func:`~vllm_redrafter.training.trainer.train_drafter`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # drafter
    num_steps: int = _opt(4, "--steps", "drafter", "drafter steps trained (= beam length - 1)",
                          ge=1)
    exit_dim: int | None = _opt(None, "--exit-dim", "drafter", "ResBlock width E (default 2H)")
    num_layers: int = _opt(2, "--layers", "drafter", "ResBlocks", ge=0)
    rnn: bool = _opt(True, "--rnn", "drafter", "Apple's recurrent update (or the running sum)")
    draft_vocab_size: int | None = _opt(
        16384, "--draft-vocab", "drafter",
        "draft vocabulary size by token frequency ('full' = the target's)")
    head: Literal["drafter", "target"] = _opt(
        "drafter", "--head", "drafter",
        "output head: the drafter's own Linear(E, Vd), or a learned Linear(E, H) in front of "
        "the target's frozen head")
    init_from: str | None = _opt(
        None, "--init-from", "drafter",
        "fine-tune: start from this exported drafter's weights and draft vocabulary (its "
        "--layers/--exit-dim/--rnn/--head/--draft-vocab must be the ones given)")
    # optimisation
    soft_weight: float = _opt(
        0.0, "--soft-weight", "optimisation",
        "weight in [0, 1] of the soft-label term (cross-entropy against the target's "
        "distribution from the cached hidden states)", ge=0.0, le=1.0)
    lr: float = _opt(1e-3, "--lr", "optimisation", "peak learning rate (AdamW)", gt=0)
    min_lr_ratio: float = _opt(0.05, "--min-lr-ratio", "optimisation",
                               "final learning rate / peak", ge=0)
    warmup_ratio: float = _opt(0.03, "--warmup-ratio", "optimisation",
                               "share of the run spent warming up", ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = _opt(
        "cosine", "--schedule", "optimisation", "decay after the warm-up")
    weight_decay: float = _opt(0.0, "--weight-decay", "optimisation", "AdamW weight decay", ge=0)
    dropout: float = _opt(0.0, "--dropout", "optimisation", "dropout on the head's input",
                          ge=0, lt=1)
    grad_clip: float = _opt(1.0, "--grad-clip", "optimisation", "gradient norm clip (0: off)",
                            ge=0)
    epochs: float = _opt(1.0, "--epochs", "optimisation", "passes over the data (fractional ok)",
                         gt=0)
    batch_tokens: int = _opt(2048, "--batch-tokens", "optimisation",
                             "positions per optimiser step", ge=1)
    time_budget_min: float | None = _opt(
        None, "--time-budget", "optimisation",
        "also finish (learning rate annealed by elapsed time) after this many minutes")
    amp: bool = _opt(True, "--amp", "optimisation", "bf16 autocast (AMX on CPU)")
    seed: int = _opt(0, "--seed", "optimisation", "split, initialisation, batch order")
    # evaluation / checkpoints
    heldout_fraction: float = _opt(0.05, "--heldout-fraction", "evaluation / checkpoints",
                                   "whole sequences held out for evaluation", ge=0, lt=1)
    eval_every: int = _opt(200, "--eval-every", "evaluation / checkpoints",
                           "optimiser steps between evaluations", ge=1)
    eval_rows: int = _opt(20000, "--eval-rows", "evaluation / checkpoints",
                          "positions per evaluation set", ge=1)
    accept_rows: int = _opt(1000, "--accept-rows", "evaluation / checkpoints",
                            "positions of the acceptance estimate", ge=1)
    beam_width: int = _opt(4, "--beam-width", "evaluation / checkpoints",
                           "beam width of the acceptance estimate (and the exported default)",
                           ge=1)
    topk: int = _opt(5, "--topk", "evaluation / checkpoints", "k of the top-k accuracy", ge=1)
    save_every: int = _opt(100, "--save-every", "evaluation / checkpoints",
                           "optimiser steps between checkpoints", ge=1)
    export_dtype: Literal["bfloat16", "float16", "float32"] = _opt(
        "bfloat16", "--export-dtype", "evaluation / checkpoints",
        "dtype of the exported model.safetensors")


def _none_or_int(text: str) -> int | None:
    return None if text.lower() in ("none", "full", "0") else int(text)


def _none_or_float(text: str) -> float | None:
    return None if text.lower() in ("none", "0") else float(text)


def _argparse_kwargs(annotation: Any, default: Any) -> dict[str, Any]:
    """argparse ``type``/``choices``/``action`` for a field's annotation."""
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is Literal:
        return {"choices": list(typing.get_args(annotation))}
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if inner == [str]:
            return {"type": str}
        return {"type": _none_or_int if inner == [int] else _none_or_float}
    return {"type": annotation}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainConfig` field (``dest`` = the field name)."""
    groups: dict[str, Any] = {}
    for name, info in TrainConfig.model_fields.items():
        extra = info.json_schema_extra
        assert isinstance(extra, dict), name
        group_name = str(extra["group"])
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        default = info.default
        help_text = info.description or ""
        shown = "none" if default is None else default
        groups[group_name].add_argument(
            str(extra["flag"]), dest=name, default=default,
            help=f"{help_text} [{shown}]", **_argparse_kwargs(info.annotation, default))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed flags (validated: a bad value names the field)."""
    return TrainConfig(**{name: getattr(args, name) for name in TrainConfig.model_fields})

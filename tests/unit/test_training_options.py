# SPDX-License-Identifier: Apache-2.0
"""The training options are one pydantic model; ``vllm-redrafter train``'s flags derive from it."""

from __future__ import annotations

import argparse

import pytest

from vllm_redrafter.commands import train as train_command
from vllm_redrafter.training.options import TrainConfig, add_train_flags, config_from_args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    train_command.add_arguments(parser)
    return parser


BASE = ["--target", "t", "--data", "d", "--out", "o"]


def test_every_field_has_a_flag_and_defaults_round_trip():
    args = _parser().parse_args(BASE)
    assert config_from_args(args) == TrainConfig()
    dests = {a.dest for a in _parser()._actions}
    assert set(TrainConfig.model_fields) <= dests


def test_flags_set_the_fields():
    args = _parser().parse_args(BASE + [
        "--steps", "3", "--draft-vocab", "full", "--head", "target", "--soft-weight", "0.5",
        "--no-amp", "--no-rnn", "--time-budget", "12.5", "--exit-dim", "64",
        "--init-from", "runs/a/drafter"])
    cfg = config_from_args(args)
    assert (cfg.num_steps, cfg.draft_vocab_size, cfg.head, cfg.soft_weight) == (
        3, None, "target", 0.5)
    assert (cfg.amp, cfg.rnn, cfg.time_budget_min, cfg.exit_dim) == (False, False, 12.5, 64)
    assert cfg.init_from == "runs/a/drafter"  # a path stays a string


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="soft_weight"):
        config_from_args(_parser().parse_args(BASE + ["--soft-weight", "1.5"]))
    with pytest.raises(argparse.ArgumentError):
        _parser().parse_args(BASE + ["--head", "medusa"])
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(num_stepz=3)


def test_a_new_field_gets_a_flag_without_touching_the_cli():
    class Extended(TrainConfig):
        fancy: int = TrainConfig.model_fields["seed"].__class__(
            default=7, json_schema_extra={"flag": "--fancy", "group": "drafter"})

    import vllm_redrafter.training.options as options

    original = options.TrainConfig
    options.TrainConfig = Extended
    try:
        parser = argparse.ArgumentParser()
        add_train_flags(parser)
        assert parser.parse_args(["--fancy", "9"]).fancy == 9
    finally:
        options.TrainConfig = original

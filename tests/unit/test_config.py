# SPDX-License-Identifier: Apache-2.0
"""Validation, JSON round trips and the speculators layout of the config models."""

import json
import re

import pytest
from pydantic import ValidationError

from vllm_redrafter.config import (
    DrafterConfig,
    ReDrafterCheckpointConfig,
    ReDrafterOptions,
)


def _drafter_config(**overrides):
    values = dict(hidden_size=8, vocab_size=20, exit_dim=16, num_draft_layers=2)
    values.update(overrides)
    return DrafterConfig(**values)


# ----------------------------------------------------------------- ReDrafterOptions


def test_options_defaults_and_num_draft_tokens():
    opts = ReDrafterOptions()
    assert (opts.beam_width, opts.beam_length, opts.tree, opts.draft_top_k) == (
        4,
        4,
        False,
        None,
    )
    assert opts.num_draft_tokens == 3
    assert opts.adaptive is True  # load-aware by default: never slower under load
    assert ReDrafterOptions(adaptive=False).adaptive is False
    assert ReDrafterOptions(beam_length=16).num_draft_tokens == 15


@pytest.mark.parametrize(
    ("field", "value", "bounds"),
    [
        ("beam_width", 0, ("1", "64")),
        ("beam_width", 65, ("1", "64")),
        ("beam_length", 1, ("2", "16")),
        ("beam_length", 17, ("2", "16")),
    ],
)
def test_options_range_errors_name_field_and_bounds(field, value, bounds):
    with pytest.raises(ValidationError) as info:
        ReDrafterOptions(**{field: value})
    message = str(info.value)
    assert field in message
    assert f"[{bounds[0]}, {bounds[1]}]" in message
    assert f"got {value}" in message


def test_options_bounds_are_inclusive():
    assert ReDrafterOptions(beam_width=1, beam_length=2).beam_width == 1
    assert ReDrafterOptions(beam_width=64, beam_length=16).beam_length == 16


def test_options_draft_top_k():
    assert ReDrafterOptions(draft_top_k=1).draft_top_k == 1
    with pytest.raises(ValidationError, match="draft_top_k"):
        ReDrafterOptions(draft_top_k=0)


def test_options_are_frozen_and_strict():
    opts = ReDrafterOptions()
    with pytest.raises(ValidationError):
        opts.beam_width = 8
    with pytest.raises(ValidationError, match="beam_widht"):
        ReDrafterOptions(beam_widht=8)


def test_options_from_mapping():
    opts = ReDrafterOptions.from_mapping({"beam_width": 8, "tree": True})
    assert (opts.beam_width, opts.beam_length, opts.tree) == (8, 4, True)
    with pytest.raises(ValueError) as info:
        ReDrafterOptions.from_mapping({"beam_widht": 8, "zzz": 1, "beam_length": 3})
    message = str(info.value)
    assert "['beam_widht', 'zzz']" in message
    assert ("['adaptive', 'beam_length', 'beam_width', 'draft_bits', 'draft_dtype', "
            "'draft_int8', 'draft_top_k', 'lookup', 'tree']" in message)
    with pytest.raises(ValueError, match="beam_length"):
        ReDrafterOptions.from_mapping({"beam_length": 99})


def test_options_json_round_trip():
    opts = ReDrafterOptions(beam_width=7, beam_length=5, tree=True, draft_top_k=50)
    again = ReDrafterOptions.model_validate_json(opts.model_dump_json())
    assert again == opts
    assert again.num_draft_tokens == 4


# -------------------------------------------------------------------- DrafterConfig


def test_drafter_config_properties():
    cfg = _drafter_config()
    assert cfg.has_input_proj is False  # exit_dim == 2 * hidden_size
    assert cfg.draft_vocab_size == 20
    assert cfg.rnn is True
    cfg = _drafter_config(exit_dim=12, draft_vocab=[0, 3, 19])
    assert cfg.has_input_proj is True
    assert cfg.draft_vocab_size == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", 0), ("vocab_size", -1), ("exit_dim", 0), ("num_draft_layers", -1)],
)
def test_drafter_config_errors_name_field(field, value):
    with pytest.raises(ValidationError) as info:
        _drafter_config(**{field: value})
    assert field in str(info.value)


def test_drafter_config_zero_layers_allowed():
    assert _drafter_config(num_draft_layers=0).num_draft_layers == 0


def test_drafter_config_forbids_unknown_keys_and_is_frozen():
    with pytest.raises(ValidationError, match="emb_norm"):
        _drafter_config(emb_norm=True)
    cfg = _drafter_config()
    with pytest.raises(ValidationError):
        cfg.hidden_size = 4


@pytest.mark.parametrize(
    ("draft_vocab", "expected"),
    [
        ([3, 1, 5], "sorted strictly increasing"),
        ([1, 3, 3], "sorted strictly increasing"),
        ([], "non-empty"),
        ([0, 5, 20], r"\[0, vocab_size=20\); found 20"),
        ([-1, 5], r"\[0, vocab_size=20\); found -1"),
    ],
)
def test_drafter_config_rejects_bad_draft_vocab(draft_vocab, expected):
    with pytest.raises(ValidationError, match=expected) as info:
        _drafter_config(draft_vocab=draft_vocab)
    assert "draft_vocab" in str(info.value)


def test_drafter_config_json_round_trip():
    cfg = _drafter_config(exit_dim=12, rnn=False, draft_vocab=[2, 4, 8, 16])
    again = DrafterConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    assert again.draft_vocab == [2, 4, 8, 16]
    assert again.has_input_proj and again.draft_vocab_size == 4


# ------------------------------------------------------- ReDrafterCheckpointConfig


def test_checkpoint_config_speculators_layout():
    cfg = ReDrafterCheckpointConfig.make(
        _drafter_config(),
        options=ReDrafterOptions(beam_width=6, beam_length=5),
        verifier="some/target",
        verifier_architectures=["LlamaForCausalLM"],
    )
    data = json.loads(json.dumps(cfg.to_json_dict()))
    assert data["architectures"] == ["ReDrafterForSpeculation"]
    assert data["speculators_model_type"] == "redrafter"
    spec = data["speculators_config"]
    assert spec["algorithm"] == "redrafter"
    assert spec["proposal_methods"] == [
        {
            "proposal_type": "redrafter_beam",
            "speculative_tokens": 4,
            "beam_width": 6,
            "beam_length": 5,
        }
    ]
    assert spec["default_proposal_method"] == "redrafter_beam"
    assert spec["verifier"] == {
        "name_or_path": "some/target",
        "architectures": ["LlamaForCausalLM"],
    }
    assert data["transformer_layer_config"] == {"hidden_size": 8, "vocab_size": 20}
    assert data["drafter"]["exit_dim"] == 16


def test_checkpoint_config_keeps_null_verifier_key():
    # vLLM reads speculators_config.verifier.name_or_path unconditionally.
    data = ReDrafterCheckpointConfig.make(_drafter_config()).to_json_dict()
    assert "name_or_path" in data["speculators_config"]["verifier"]
    assert data["speculators_config"]["verifier"]["name_or_path"] is None


def test_checkpoint_config_round_trip_keeps_extra_keys():
    cfg = ReDrafterCheckpointConfig.make(
        _drafter_config(draft_vocab=[1, 2, 3]),
        options=ReDrafterOptions(beam_width=3, beam_length=6),
        torch_dtype="bfloat16",
    )
    text = json.dumps(cfg.to_json_dict())
    again = ReDrafterCheckpointConfig.model_validate_json(text)
    assert again == cfg
    assert again.to_json_dict()["torch_dtype"] == "bfloat16"
    assert again.drafter.draft_vocab == [1, 2, 3]
    assert again.default_options() == ReDrafterOptions(beam_width=3, beam_length=6)


def test_checkpoint_config_rejects_inconsistencies():
    good = ReDrafterCheckpointConfig.make(_drafter_config()).to_json_dict()

    bad = json.loads(json.dumps(good))
    bad["transformer_layer_config"]["vocab_size"] = 21
    with pytest.raises(ValidationError, match="vocab_size=21"):
        ReDrafterCheckpointConfig.model_validate(bad)

    bad = json.loads(json.dumps(good))
    bad["speculators_config"]["default_proposal_method"] = "tree"
    with pytest.raises(ValidationError, match="default_proposal_method 'tree'"):
        ReDrafterCheckpointConfig.model_validate(bad)

    bad = json.loads(json.dumps(good))
    bad["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = 7
    with pytest.raises(ValidationError, match="speculative_tokens=7"):
        ReDrafterCheckpointConfig.model_validate(bad)

    bad = json.loads(json.dumps(good))
    bad["speculators_model_type"] = "eagle3"
    with pytest.raises(ValidationError, match="speculators_model_type"):
        ReDrafterCheckpointConfig.model_validate(bad)


def test_default_options_from_speculative_tokens_only():
    data = ReDrafterCheckpointConfig.make(_drafter_config()).to_json_dict()
    data["speculators_config"]["proposal_methods"] = [
        {"proposal_type": "redrafter_beam", "speculative_tokens": 5}
    ]
    cfg = ReDrafterCheckpointConfig.model_validate(data)
    opts = cfg.default_options()
    assert (opts.beam_length, opts.beam_width) == (6, 4)


def test_lookup_options():
    opts = ReDrafterOptions.from_mapping({"tree": True, "lookup": True})
    assert opts.lookup is not None and opts.lookup.max_candidates == 2
    assert ReDrafterOptions.from_mapping({"tree": True, "lookup": False}).lookup is None
    opts = ReDrafterOptions.from_mapping({"tree": True, "lookup": {"rank": 0,
                                                                   "max_candidates": 4}})
    assert (opts.lookup.rank, opts.lookup.max_candidates) == (0, 4)
    # round trip through the JSON the engine carries in additional_config
    again = ReDrafterOptions.from_mapping(opts.model_dump(mode="json"))
    assert again == opts
    # the tree's node budget: W * (L - 1), plus the look-up branches' extra nodes
    one_beam = ReDrafterOptions.from_mapping({"tree": True, "beam_width": 1, "beam_length": 5,
                                              "lookup": {"extra_nodes": 4}})
    assert one_beam.num_speculative_tokens == 8
    assert ReDrafterOptions(tree=True, beam_width=1, beam_length=5).num_speculative_tokens == 4


@pytest.mark.parametrize("values, needle", [
    ({"lookup": True}, 'set "tree": true'),
    ({"tree": True, "lookup": {"rank": 5}}, "lookup.rank=5 must be <= beam_width=4"),
    ({"tree": True, "lookup": {"min_match": 5, "max_match": 3}},
     "lookup.max_match=3 must be >= lookup.min_match=5"),
    ({"tree": True, "lookup": {"max_candidates": 0}}, "max_candidates"),
    ({"tree": True, "lookup": {"min_macth": 2}}, "min_macth"),
])
def test_lookup_options_refused(values, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        ReDrafterOptions.from_mapping(values)


def test_draft_int8_is_auto_by_default_and_validated():
    assert ReDrafterOptions().draft_int8 == "auto"
    for value in ("auto", True, False):
        assert ReDrafterOptions(draft_int8=value).draft_int8 == value
    with pytest.raises(ValueError, match="draft_int8"):
        ReDrafterOptions(draft_int8="sometimes")


def test_draft_bits_is_4_by_default_and_validated():
    assert ReDrafterOptions().draft_bits == 4
    assert ReDrafterOptions.from_mapping({"draft_bits": 8}).draft_bits == 8
    for bad in (2, 16, "4"):
        with pytest.raises(ValueError, match="draft_bits"):
            ReDrafterOptions.from_mapping({"draft_bits": bad})

# SPDX-License-Identifier: Apache-2.0
"""Translation of ``method="redrafter"`` configs into vLLM's ``custom_class`` form.

Pure checks of ``vllm_redrafter.integration.spec_config`` (no engine, no vLLM import):
option resolution, derived ``num_speculative_tokens`` and every rejection message.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_redrafter.checkpoint import save_drafter
from vllm_redrafter.config import DrafterConfig, ReDrafterOptions
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.integration.compat import PROPOSER_CLASS_PATH
from vllm_redrafter.integration.spec_config import (
    ReDrafterConfigError,
    ReDrafterSettings,
    is_redrafter_request,
    translate_speculative_config,
    validate_custom_class_settings,
)

HIDDEN, VOCAB = 8, 20


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory) -> Path:
    config = DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, exit_dim=16,
                           num_draft_layers=1)
    model = RecurrentDrafter(config, generator=torch.Generator().manual_seed(0))
    return save_drafter(model, tmp_path_factory.mktemp("drafter"),
                        options=ReDrafterOptions(beam_width=5, beam_length=6))


def _translate(spec, hidden=HIDDEN, vocab=VOCAB):
    return translate_speculative_config(spec, target_hidden_size=hidden,
                                        target_vocab_size=vocab)


def test_explicit_settings(drafter_dir):
    vllm_spec, settings = _translate({"method": "redrafter", "model": str(drafter_dir),
                                      "beam_width": 3, "beam_length": 4,
                                      "draft_top_k": 7})
    assert vllm_spec == {"method": "custom_class", "model": PROPOSER_CLASS_PATH,
                         "num_speculative_tokens": 3}
    assert settings.drafter_dir == str(drafter_dir.resolve())
    assert (settings.options.beam_width, settings.options.beam_length,
            settings.options.draft_top_k) == (3, 4, 7)
    assert ReDrafterSettings.from_dict(settings.to_dict()) == settings


def test_defaults_come_from_the_checkpoint(drafter_dir):
    """The checkpoint advertises W=5, L=6: tree mode takes both, chain mode its L and a
    greedy drafter (W=1) unless the user asks for beams."""
    vllm_spec, settings = _translate({"method": "redrafter", "model": str(drafter_dir),
                                      "tree": True})
    assert (settings.options.beam_width, settings.options.beam_length) == (5, 6)
    assert vllm_spec["num_speculative_tokens"] == 25
    vllm_spec, settings = _translate({"method": "redrafter", "model": str(drafter_dir)})
    assert (settings.options.beam_width, settings.options.beam_length) == (1, 6)
    assert vllm_spec["num_speculative_tokens"] == 5
    _, settings = _translate({"method": "redrafter", "model": str(drafter_dir),
                              "beam_width": 4})
    assert settings.options.beam_width == 4  # given: obeyed in chain mode too


def test_beam_length_derived_from_num_speculative_tokens(drafter_dir):
    vllm_spec, settings = _translate({"method": "redrafter", "model": str(drafter_dir),
                                      "num_speculative_tokens": 2})
    assert settings.options.beam_length == 3 and vllm_spec["num_speculative_tokens"] == 2


def test_shorthand_and_passthrough_keys(drafter_dir):
    spec = {"model": f"redrafter:{drafter_dir}", "beam-width": 2,
            "disable_padded_drafter_batch": True}
    assert is_redrafter_request(spec)
    vllm_spec, settings = _translate(spec)
    assert settings.options.beam_width == 2
    assert vllm_spec["disable_padded_drafter_batch"] is True
    assert not is_redrafter_request({"method": "ngram", "model": "redrafter:x"})


def test_consistent_num_speculative_tokens_is_accepted(drafter_dir):
    vllm_spec, _ = _translate({"method": "redrafter", "model": str(drafter_dir),
                               "beam_length": 4, "num_speculative_tokens": 3})
    assert vllm_spec["num_speculative_tokens"] == 3


@pytest.mark.parametrize("extra,needle", [
    ({"beam_width": 0}, "beam_width must be an integer in [1, 64], got 0"),
    ({"beam_width": 65}, "beam_width must be an integer in [1, 64], got 65"),
    ({"beam_length": 1}, "beam_length must be an integer in [2, 16], got 1"),
    ({"beam_length": 17}, "beam_length must be an integer in [2, 16], got 17"),
    ({"draft_top_k": 0}, "draft_top_k"),
    ({"beam_length": 4, "num_speculative_tokens": 5},
     "num_speculative_tokens=5 is inconsistent with ReDrafter beam_width=1, beam_length=4"),
    ({"tree": True, "beam_width": 4, "beam_length": 5, "num_speculative_tokens": 4},
     "in tree mode it must equal beam_width * (beam_length - 1) (+ lookup.extra_nodes) = 16"),
    ({"tree": True, "beam_width": 16, "beam_length": 10},
     "so that beam_width * (beam_length - 1) + extra_nodes <= 128"),
    ({"tree": True, "beam_width": 4, "beam_length": 5, "lookup": {"extra_nodes": 4},
      "num_speculative_tokens": 16}, "(+ lookup.extra_nodes) = 20"),
    ({"lookup": True}, 'set "tree": true'),
    ({"tree": True, "lookup": {"rank": 9}}, "lookup.rank=9 must be <= beam_width"),
    ({"tree": True, "lookup": {"extra_nodes": 65}}, "extra_nodes"),
    ({"draft_dtype": "fp8"}, "draft_dtype"),
])
def test_invalid_settings_name_the_field(drafter_dir, extra, needle):
    with pytest.raises(ReDrafterConfigError) as info:
        _translate({"method": "redrafter", "model": str(drafter_dir), **extra})
    assert needle in str(info.value)


def test_tree_mode_derives_the_largest_tree(drafter_dir):
    vllm_spec, settings = _translate({"method": "redrafter", "model": str(drafter_dir),
                                      "tree": True, "beam_width": 4, "beam_length": 5})
    assert vllm_spec["num_speculative_tokens"] == 16 == settings.num_speculative_tokens
    assert settings.options.tree is True


def test_target_mismatches_are_rejected(drafter_dir):
    with pytest.raises(ReDrafterConfigError, match="hidden_size=8 but the target"):
        _translate({"method": "redrafter", "model": str(drafter_dir)}, hidden=16)
    with pytest.raises(ReDrafterConfigError, match="vocab_size=20 but the target"):
        _translate({"method": "redrafter", "model": str(drafter_dir)}, vocab=32)


def test_draft_dtype_is_validated(drafter_dir, tmp_path):
    _, settings = _translate({"method": "redrafter", "model": str(drafter_dir),
                              "draft_dtype": "bfloat16"})
    assert settings.options.draft_dtype == "bfloat16"
    config = DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, exit_dim=16,
                           num_draft_layers=1, head="target")
    target_head = save_drafter(RecurrentDrafter(config), tmp_path / "target-head")
    with pytest.raises(ReDrafterConfigError, match="runs in the target's dtype"):
        _translate({"method": "redrafter", "model": str(target_head),
                    "draft_dtype": "bfloat16"})
    _translate({"method": "redrafter", "model": str(target_head)})  # auto: accepted


def test_missing_model_and_directory(tmp_path):
    with pytest.raises(ReDrafterConfigError, match="needs 'model'"):
        _translate({"method": "redrafter"})
    with pytest.raises(ReDrafterConfigError, match="does not exist"):
        _translate({"method": "redrafter", "model": str(tmp_path / "nope")})
    with pytest.raises(ReDrafterConfigError, match="cannot read ReDrafter drafter config"):
        _translate({"method": "redrafter", "model": str(tmp_path)})


def test_custom_class_form_is_validated(drafter_dir):
    additional = {"redrafter": {"model": str(drafter_dir), "beam_width": 2,
                                "beam_length": 3}}
    settings = validate_custom_class_settings(additional, 2, target_hidden_size=HIDDEN,
                                              target_vocab_size=VOCAB)
    assert settings.options.beam_length == 3
    with pytest.raises(ReDrafterConfigError, match="additional_config"):
        validate_custom_class_settings({}, 2, target_hidden_size=HIDDEN,
                                       target_vocab_size=VOCAB)
    with pytest.raises(ReDrafterConfigError, match="inconsistent"):
        validate_custom_class_settings(additional, 4, target_hidden_size=HIDDEN,
                                       target_vocab_size=VOCAB)

# SPDX-License-Identifier: Apache-2.0
"""ReDrafter configuration through vLLM's own entry points, without starting an engine.

``LLM(...)`` and ``vllm serve`` both build their ``VllmConfig`` in process 0 with
``EngineArgs.create_engine_config`` before any engine process starts; these tests drive
that path (and the real ``vllm serve`` argument parser) and check what reaches the
workers, and that each misconfiguration of the issue fails there with a clear message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LLAMA
from vllm_redrafter.checkpoint import save_drafter
from vllm_redrafter.config import DrafterConfig, ReDrafterOptions
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.integration.compat import PROPOSER_CLASS_PATH

HIDDEN, VOCAB = TINY_LLAMA["hidden_size"], TINY_LLAMA["vocab_size"]


def _drafter(path: Path, hidden: int = HIDDEN, vocab: int = VOCAB) -> Path:
    config = DrafterConfig(hidden_size=hidden, vocab_size=vocab, exit_dim=32,
                           num_draft_layers=1)
    model = RecurrentDrafter(config, generator=torch.Generator().manual_seed(0))
    return save_drafter(model, path, options=ReDrafterOptions(beam_width=2, beam_length=3))


@pytest.fixture(scope="module")
def drafters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drafters")
    return {
        "ok": _drafter(root / "ok"),
        "hidden": _drafter(root / "hidden", hidden=HIDDEN // 2),
        "vocab": _drafter(root / "vocab", vocab=VOCAB + 64),
    }


def _engine_config(model_dir: Path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True,
                      dtype="float32", max_model_len=256, **kwargs)
    return args.create_engine_config()


def test_llm_config_reaches_workers_as_custom_class(tiny_llama_dir, drafters):
    import pickle

    config = _engine_config(tiny_llama_dir, speculative_config={
        "method": "redrafter", "model": str(drafters["ok"]), "beam_width": 3,
        "beam_length": 4, "draft_top_k": 5})
    spec = config.speculative_config
    assert (spec.method, spec.model, spec.num_speculative_tokens) == (
        "custom_class", PROPOSER_CLASS_PATH, 3)
    expected = {"model": str(drafters["ok"].resolve()), "beam_width": 3,
                "beam_length": 4, "tree": False, "draft_top_k": 5, "adaptive": True,
                "lookup": None, "draft_dtype": "auto", "draft_int8": "auto",
                "draft_bits": 4}
    assert config.additional_config["redrafter"] == expected
    # What the executor ships to workers (mp pickles; Ray cloudpickles the same state).
    clone = pickle.loads(pickle.dumps(config))
    assert clone.additional_config["redrafter"] == expected
    assert clone.speculative_config.model == PROPOSER_CLASS_PATH
    # Async scheduling is off for custom_class proposers (drafts travel every step).
    assert not config.scheduler_config.async_scheduling


def test_additional_config_form_is_validated_too(tiny_llama_dir, drafters):
    from vllm_redrafter.integration.spec_config import ReDrafterConfigError

    additional = {"redrafter": {"model": str(drafters["vocab"]), "beam_length": 3}}
    with pytest.raises(ReDrafterConfigError, match="vocab_size"):
        _engine_config(tiny_llama_dir, additional_config=additional, speculative_config={
            "method": "custom_class", "model": PROPOSER_CLASS_PATH,
            "num_speculative_tokens": 2})


# ------------------------------------------------- start-up errors (one test each)


def _llm_error(model_dir: Path, spec: dict) -> str:
    """The exception ``LLM(...)`` raises in process 0 for ``spec`` (no engine starts)."""
    from vllm import LLM

    with pytest.raises(Exception) as info:
        LLM(model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True,
            dtype="float32", max_model_len=256, speculative_config=spec)
    return str(info.value)


def test_error_invalid_beam_width(tiny_llama_dir, drafters):
    message = _llm_error(tiny_llama_dir, {"method": "redrafter",
                                          "model": str(drafters["ok"]), "beam_width": 0})
    assert "beam_width must be an integer in [1, 64], got 0" in message


def test_error_invalid_beam_length(tiny_llama_dir, drafters):
    message = _llm_error(tiny_llama_dir, {"method": "redrafter",
                                          "model": str(drafters["ok"]), "beam_length": 40})
    assert "beam_length must be an integer in [2, 16], got 40" in message


def test_error_unknown_knob(tiny_llama_dir, drafters):
    message = _llm_error(tiny_llama_dir, {"method": "redrafter",
                                          "model": str(drafters["ok"]), "beam_widht": 4})
    assert "beam_widht" in message


def test_error_inconsistent_num_speculative_tokens(tiny_llama_dir, drafters):
    message = _llm_error(tiny_llama_dir, {"method": "redrafter",
                                          "model": str(drafters["ok"]), "beam_length": 4,
                                          "num_speculative_tokens": 2})
    assert "num_speculative_tokens=2 is inconsistent" in message
    assert "beam_length - 1 = 3" in message


def test_error_drafter_hidden_size_mismatch(tiny_llama_dir, drafters):
    message = _llm_error(tiny_llama_dir, {"method": "redrafter",
                                          "model": str(drafters["hidden"])})
    assert f"hidden_size={HIDDEN // 2} but the target model's hidden_size is {HIDDEN}" in (
        message)


def test_error_drafter_vocab_mismatch(tiny_llama_dir, drafters):
    message = _llm_error(tiny_llama_dir, {"method": "redrafter",
                                          "model": str(drafters["vocab"])})
    assert f"vocab_size={VOCAB + 64} but the target model's vocab_size is {VOCAB}" in (
        message)


def test_error_missing_drafter_directory(tiny_llama_dir, tmp_path):
    message = _llm_error(tiny_llama_dir, {"method": "redrafter",
                                          "model": str(tmp_path / "absent")})
    assert "does not exist" in message


def test_error_unsupported_vllm_version(tiny_llama_dir, drafters):
    """In a fresh interpreter where vLLM reports 0.31.0 the plugin refuses to patch, and a
    ReDrafter config fails with a message naming both versions."""
    code = (
        "import json, sys, vllm\n"
        "vllm.__version__ = '0.31.0'\n"
        "from vllm import LLM\n"
        "try:\n"
        "    LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True,\n"
        "        speculative_config=json.loads(sys.argv[2]))\n"
        "except Exception as err:\n"
        "    print('ERROR:', type(err).__name__, err)\n"
    )
    spec = json.dumps({"method": "redrafter", "model": str(drafters["ok"])})
    env = {**os.environ, "VLLM_CONFIGURE_LOGGING": "0"}
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_llama_dir), spec],
                          capture_output=True, text=True, timeout=600, env=env)
    assert "ERROR: RuntimeError" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "supports vLLM >=0.32.0,<0.33.0, but vLLM 0.31.0 is installed" in proc.stdout


# ------------------------------------------------------------------------ the CLI


def _serve_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def test_serve_cli_speculative_model_shorthand(tiny_llama_dir, drafters):
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = _serve_parser()
    args = parser.parse_args([str(tiny_llama_dir), "--speculative-model",
                              f"redrafter:{drafters['ok']}", "--speculative-config",
                              '{"beam_width": 2}'])
    args.model = args.model_tag
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.speculative_config == {"beam_width": 2, "method": "redrafter",
                                              "model": str(drafters["ok"])}


def test_serve_cli_speculative_config_form(tiny_llama_dir, drafters):
    from vllm.engine.arg_utils import AsyncEngineArgs

    spec = json.dumps({"method": "redrafter", "model": str(drafters["ok"]),
                       "beam_length": 3})
    args = _serve_parser().parse_args([str(tiny_llama_dir), "--speculative-config", spec,
                                       "--skip-tokenizer-init", "--dtype", "float32",
                                       "--max-model-len", "256"])
    args.model = args.model_tag
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert config.speculative_config.num_speculative_tokens == 2
    assert config.additional_config["redrafter"]["beam_length"] == 3


def test_serve_cli_rejects_other_speculative_models(tiny_llama_dir, capsys):
    with pytest.raises(SystemExit):
        _serve_parser().parse_args([str(tiny_llama_dir), "--speculative-model", "ngram"])
    assert "expected redrafter:<drafter checkpoint dir>" in capsys.readouterr().err


def test_serve_cli_conflicting_method(tiny_llama_dir, drafters):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = _serve_parser().parse_args([
        str(tiny_llama_dir), "--speculative-model", f"redrafter:{drafters['ok']}",
        "--speculative-config", '{"method": "ngram"}'])
    with pytest.raises(ValueError, match="conflicts with --speculative-config method"):
        AsyncEngineArgs.from_cli_args(args)


def test_error_pipeline_parallel(tiny_llama_dir, drafters):
    spec = {"method": "redrafter", "model": str(drafters["ok"])}
    with pytest.raises(Exception) as info:
        _engine_config(tiny_llama_dir, speculative_config=spec, pipeline_parallel_size=2)
    message = str(info.value)
    assert "does not support pipeline parallelism (pipeline_parallel_size=2)" in message
    assert "tensor_parallel_size" in message


def test_error_async_scheduling_forced_on(tiny_llama_dir, drafters):
    spec = {"method": "redrafter", "model": str(drafters["ok"])}
    with pytest.raises(Exception) as info:
        _engine_config(tiny_llama_dir, speculative_config=spec, async_scheduling=True)
    assert "ReDrafter needs synchronous scheduling" in str(info.value)
    assert "remove --async-scheduling" in str(info.value)


def test_error_model_runner_v2_forced_on(tiny_llama_dir, drafters, monkeypatch):
    """MRV2 has no custom_class speculator: refused before anything loads, naming the
    variable; unset (vLLM's default) the same config is accepted and runs on V1."""
    spec = {"method": "redrafter", "model": str(drafters["ok"])}
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(Exception) as info:
        _engine_config(tiny_llama_dir, speculative_config=spec)
    assert "Model Runner V2 is forced on" in str(info.value)
    assert "unset VLLM_USE_V2_MODEL_RUNNER" in str(info.value)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    config = _engine_config(tiny_llama_dir, speculative_config=spec)
    assert config.use_v2_model_runner is False


def test_async_scheduling_left_to_vllm_is_off(tiny_llama_dir, drafters, monkeypatch):
    """Not forced: vLLM turns async scheduling off for custom_class drafting, which is
    what the proposer asserts when it is built (proposers.redrafter.check_engine_support)."""
    from vllm_redrafter.proposers.redrafter import check_engine_support

    config = _engine_config(tiny_llama_dir, speculative_config={
        "method": "redrafter", "model": str(drafters["ok"])})
    assert config.scheduler_config.async_scheduling is False
    check_engine_support(config)  # accepted
    config.scheduler_config.async_scheduling = True
    with pytest.raises(Exception, match="ReDrafter needs synchronous scheduling"):
        check_engine_support(config)
    config.scheduler_config.async_scheduling = False
    # an engine that ended up on V2 anyway is refused by the proposer too
    monkeypatch.setattr(type(config), "use_v2_model_runner", property(lambda self: True))
    with pytest.raises(Exception, match="Model Runner V2 is forced on"):
        check_engine_support(config)


def _word_tokenizer(path: Path, words: list[str]) -> Path:
    """A word-level HF tokenizer numbering ``words`` in the given order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0]).save_pretrained(path)
    return path


def test_error_drafter_trained_for_another_tokenizer(tiny_llama_dir, tmp_path):
    """Same vocabulary size, other token numbering: refused at start-up, naming both
    fingerprints and the fix; the tokenizer it was trained for is accepted; a drafter
    without a fingerprint (Apple's format, older exports) is not checked."""
    from vllm_redrafter.checkpoint import fingerprint_of_tokenizer

    words = ["<unk>"] + [f"w{i}" for i in range(VOCAB - 1)]
    trained = _word_tokenizer(tmp_path / "trained-tok", words)
    other = _word_tokenizer(tmp_path / "other-tok", words[:1] + words[1:][::-1])
    drafter = _drafter(tmp_path / "drafter")
    raw = json.loads((drafter / "config.json").read_text())
    raw["tokenizer_fingerprint"] = fingerprint_of_tokenizer(trained)
    (drafter / "config.json").write_text(json.dumps(raw))
    spec = {"method": "redrafter", "model": str(drafter)}

    def build(tokenizer: Path):
        from vllm.engine.arg_utils import EngineArgs

        return EngineArgs(model=str(tiny_llama_dir), tokenizer=str(tokenizer),
                          enforce_eager=True, dtype="float32", max_model_len=256,
                          speculative_config=spec).create_engine_config()

    with pytest.raises(Exception) as info:
        build(other)
    message = str(info.value)
    assert "was trained for another tokenizer" in message
    assert raw["tokenizer_fingerprint"] in message and "vllm-redrafter train" in message
    assert build(trained).speculative_config.method == "custom_class"
    del raw["tokenizer_fingerprint"]
    (drafter / "config.json").write_text(json.dumps(raw))
    assert build(other).speculative_config.method == "custom_class"

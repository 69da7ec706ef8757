# SPDX-License-Identifier: Apache-2.0
"""Checkpoints: our round trip, Apple/TRT-LLM spellings, damaged files, convert."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vllm_redrafter.checkpoint import (
    convert_checkpoint,
    load_checkpoint_config,
    load_drafter,
    rename_apple_keys,
    save_drafter,
)
from vllm_redrafter.config import DrafterConfig, ReDrafterOptions
from vllm_redrafter.drafter import RecurrentDrafter

H, V = 4, 13


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


def _make(*, rnn=True, exit_dim=2 * H, layers=2, draft_vocab=None, seed=0):
    cfg = DrafterConfig(
        hidden_size=H,
        vocab_size=V,
        exit_dim=exit_dim,
        num_draft_layers=layers,
        rnn=rnn,
        draft_vocab=draft_vocab,
    )
    return RecurrentDrafter(cfg, generator=_gen(seed))


def _outputs(model, seed=5):
    hidden = _randn(2, 4, H, seed=seed).to(model.lm_head.weight.dtype)
    embeds = _randn(2, 4, H, seed=seed + 1).to(model.lm_head.weight.dtype)
    with torch.no_grad():
        return model.forward_train(hidden, embeds, num_steps=3)


# ------------------------------------------------------------------ our format


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rnn=True),
        dict(rnn=False, exit_dim=6),
        dict(rnn=True, exit_dim=5, draft_vocab=[0, 3, 4, 12]),
    ],
    ids=["rnn", "sum-proj", "rnn-proj-draftvocab"],
)
def test_save_load_round_trip(tmp_path, kwargs):
    model = _make(**kwargs)
    save_drafter(
        model,
        tmp_path,
        verifier="org/target",
        options=ReDrafterOptions(beam_width=5, beam_length=3),
        verifier_architectures=["LlamaForCausalLM"],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = load_drafter(tmp_path)
    assert loaded.config == model.config
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)
    assert all(p.requires_grad for p in loaded.parameters())

    data = json.loads((tmp_path / "config.json").read_text())
    assert data["speculators_model_type"] == "redrafter"
    assert data["torch_dtype"] == "float32"
    spec = data["speculators_config"]
    assert spec["verifier"] == {
        "name_or_path": "org/target",
        "architectures": ["LlamaForCausalLM"],
    }
    assert spec["proposal_methods"][0]["speculative_tokens"] == 2
    assert spec["proposal_methods"][0]["beam_width"] == 5
    assert load_checkpoint_config(tmp_path).default_options() == ReDrafterOptions(
        beam_width=5, beam_length=3
    )


def test_save_dtype_and_load_dtype(tmp_path):
    model = _make(draft_vocab=[1, 2, 3])
    save_drafter(model, tmp_path, dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert stored["lm_head.weight"].dtype == torch.bfloat16
    assert stored["draft_vocab"].dtype == torch.int64
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    loaded = load_drafter(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.draft_vocab.dtype == torch.int64
    as_fp32 = load_drafter(tmp_path, dtype=torch.float32)
    assert as_fp32.rnn_u.weight.dtype == torch.float32
    torch.testing.assert_close(
        as_fp32.rnn_u.weight, model.rnn_u.weight.to(torch.bfloat16).float()
    )


# --------------------------------------------------------------- Apple format


def _apple_tensors(
    *, exit_dim, layers, rnn, seed=0, spelling="lm_head", proj="input_proj"
):
    """Random tensors under Apple's names (``spelling`` is the Sequential's name)."""
    gen = _gen(seed)
    out = {}

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.5

    if exit_dim != 2 * H:
        out[f"{proj}.weight"] = rnd(exit_dim, 2 * H)
        out[f"{proj}.bias"] = rnd(exit_dim)
    for i in range(layers):
        out[f"{spelling}.{i}.linear.weight"] = rnd(exit_dim, exit_dim)
        out[f"{spelling}.{i}.linear.bias"] = rnd(exit_dim)
    out[f"{spelling}.{layers}.weight"] = rnd(V, exit_dim)
    if rnn:
        out["rnn_u.weight"] = rnd(H, H)
        out["rnn_u.bias"] = rnd(H)
        out["rnn_w.weight"] = rnd(H, H)
    return out


def _apple_config(*, exit_dim, layers, rnn, **extra):
    cfg = {
        "architectures": ["Drafter"],
        "model_type": "recurrent_drafting_drafter",
        "vocab_size": V,
        "hidden_size": H,
        "exit_dim": exit_dim,
        "num_draft_layers": layers,
        "num_lookback_tokens": -1,
        "rnn": rnn,
        "torch_dtype": "float32",
        "transformers_version": "4.40.0",
    }
    cfg.update(extra)
    return cfg


def _write_apple(directory, config, tensors, weights_name="model.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if weights_name.endswith(".safetensors"):
        save_file(tensors, str(directory / weights_name))
    else:
        torch.save(tensors, str(directory / weights_name))


def _apple_reference(
    raw,
    *,
    exit_dim,
    layers,
    rnn,
    hidden,
    embeds_seq,
    spelling="lm_head",
    proj="input_proj",
):
    """Apple's drafter formula straight from the raw tensors: [B, H] -> [B, V]."""
    state = torch.zeros_like(hidden)
    for e in embeds_seq:
        if rnn:
            state = F.silu(
                F.linear(e, raw["rnn_w.weight"])
                + F.linear(state, raw["rnn_u.weight"], raw["rnn_u.bias"])
            )
        else:
            state = e + state
    x = torch.cat([hidden, state], dim=-1)
    if exit_dim != 2 * H:
        x = F.linear(x, raw[f"{proj}.weight"], raw[f"{proj}.bias"])
    for i in range(layers):
        weight = raw[f"{spelling}.{i}.linear.weight"]
        bias = raw[f"{spelling}.{i}.linear.bias"]
        x = x + F.silu(F.linear(x, weight, bias))
    return F.linear(x, raw[f"{spelling}.{layers}.weight"])


APPLE_CASES = {
    "apple-rnn": dict(exit_dim=2 * H, layers=2, rnn=True),
    "apple-proj-sum": dict(exit_dim=6, layers=1, rnn=False),
    "lm_heads-input_projs": dict(
        exit_dim=6, layers=2, rnn=True, spelling="lm_heads", proj="input_projs"
    ),
    "sequential-0": dict(exit_dim=2 * H, layers=3, rnn=True, spelling="0"),
    "model-pt": dict(exit_dim=6, layers=2, rnn=True, weights_name="model.pt"),
    "pytorch-model-bin": dict(
        exit_dim=2 * H, layers=1, rnn=True, weights_name="pytorch_model.bin"
    ),
}


@pytest.mark.parametrize("case", sorted(APPLE_CASES))
def test_apple_format_matches_reference_formula(tmp_path, case):
    params = dict(APPLE_CASES[case])
    weights_name = params.pop("weights_name", "model.safetensors")
    spelling = params.pop("spelling", "lm_head")
    proj = params.pop("proj", "input_proj")
    raw = _apple_tensors(**params, spelling=spelling, proj=proj)
    _write_apple(tmp_path, _apple_config(**params), raw, weights_name)

    model = load_drafter(tmp_path)
    assert model.config.exit_dim == params["exit_dim"]
    assert model.config.rnn == params["rnn"]
    hidden = _randn(3, H, seed=7)
    embeds = [_randn(3, H, seed=8 + k) for k in range(3)]
    state = model.initial_state((3,))
    with torch.no_grad():
        for k, e in enumerate(embeds):
            state = model.update_state(state, e)
            expected = _apple_reference(
                raw,
                **params,
                hidden=hidden,
                embeds_seq=embeds[: k + 1],
                spelling=spelling,
                proj=proj,
            )
            torch.testing.assert_close(model.logits(hidden, state), expected)


def test_apple_trt_prefix_emb_norm_and_our_names(tmp_path):
    # TRT-LLM-converted names: "drafter." prefix plus layers.{i}/lm_head.weight; an
    # unused emb_norm.weight (Apple's MLX/Ajax checkpoints) is ignored.
    raw = _apple_tensors(exit_dim=6, layers=2, rnn=True)
    trt = {}
    for key, value in raw.items():
        key = key.replace("lm_head.2.weight", "lm_head.weight")
        key = key.replace("lm_head.0.linear", "layers.0.linear")
        key = key.replace("lm_head.1.linear", "layers.1.linear")
        trt["drafter." + key] = value
    trt["emb_norm.weight"] = torch.ones(H)
    config = _apple_config(
        exit_dim=6, layers=2, rnn=True, emb_norm=True, rms_norm_eps=1e-6
    )
    _write_apple(tmp_path, config, trt)
    model = load_drafter(tmp_path)
    hidden, e1 = _randn(2, H, seed=1), _randn(2, H, seed=2)
    with torch.no_grad():
        got = model.logits(hidden, model.update_state(model.initial_state((2,)), e1))
    expected = _apple_reference(
        raw, exit_dim=6, layers=2, rnn=True, hidden=hidden, embeds_seq=[e1]
    )
    torch.testing.assert_close(got, expected)


def test_rename_apple_keys_examples():
    t = torch.zeros(1)
    names = {
        "lm_heads.1.linear.bias": t,
        "0.2.weight": t,
        "drafter.rnn_w.weight": t,
        "input_projs.weight": t,
        "emb_norm.weight": t,
        "lm_head.5.weight": t,  # not the final index: left for the shape check
    }
    assert sorted(rename_apple_keys(names, num_draft_layers=2)) == [
        "input_proj.weight",
        "layers.1.linear.bias",
        "lm_head.5.weight",
        "lm_head.weight",
        "rnn_w.weight",
    ]
    with pytest.raises(ValueError, match="both map to 'lm_head.weight'"):
        rename_apple_keys({"lm_head.1.weight": t, "0.1.weight": t}, num_draft_layers=1)


def test_apple_sharded_safetensors(tmp_path):
    raw = _apple_tensors(exit_dim=6, layers=1, rnn=True)
    names = sorted(raw)
    shards = {"model-00001-of-00002.safetensors": names[:3]}
    shards["model-00002-of-00002.safetensors"] = names[3:]
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: raw[k] for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = _apple_config(exit_dim=6, layers=1, rnn=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_drafter(tmp_path)
    assert torch.equal(model.lm_head.weight, raw["lm_head.1.weight"])
    assert torch.equal(model.input_proj.bias, raw["input_proj.bias"])


def test_apple_config_without_rnn_key_infers_from_weights(tmp_path):
    raw = _apple_tensors(exit_dim=2 * H, layers=1, rnn=True)
    config = _apple_config(exit_dim=2 * H, layers=1, rnn=True)
    del config["rnn"]
    _write_apple(tmp_path, config, raw)
    assert load_drafter(tmp_path).config.rnn is True
    assert load_checkpoint_config(tmp_path).drafter.rnn is True


# ------------------------------------------------------------ damaged files


def _apple_dir(tmp_path, mutate=None, **config_extra):
    raw = _apple_tensors(exit_dim=6, layers=2, rnn=True)
    if mutate is not None:
        mutate(raw)
    config = _apple_config(exit_dim=6, layers=2, rnn=True)
    config.update(config_extra)
    _write_apple(tmp_path, config, raw)
    return tmp_path


def test_missing_tensor_is_named(tmp_path):
    _apple_dir(tmp_path, lambda raw: raw.pop("rnn_w.weight"))
    expected = r"missing tensor 'rnn_w.weight' \(expected shape \[4, 4\]\)"
    with pytest.raises(ValueError, match=expected):
        load_drafter(tmp_path)


def test_missing_final_projection_gives_apple_name(tmp_path):
    _apple_dir(tmp_path, lambda raw: raw.pop("lm_head.2.weight"))
    expected = r"'lm_head.weight' \(Apple name 'lm_head.2.weight'\)"
    with pytest.raises(ValueError, match=expected):
        load_drafter(tmp_path)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    def widen(raw):
        raw["lm_head.2.weight"] = torch.zeros(V + 3, 6)

    _apple_dir(tmp_path, widen)
    with pytest.raises(ValueError) as info:
        load_drafter(tmp_path)
    message = str(info.value)
    assert "'lm_head.weight' (stored as 'lm_head.2.weight')" in message
    assert "has shape [16, 6], expected [13, 6]" in message


def test_unexpected_tensor_is_named(tmp_path):
    def add(raw):
        raw["lm_head.3.weight"] = torch.zeros(V, 6)

    _apple_dir(tmp_path, add)
    expected = r"unexpected tensor 'lm_head.3.weight' \(found shape \[13, 6\]\)"
    with pytest.raises(ValueError, match=expected):
        load_drafter(tmp_path)


def test_rnn_flag_disagreeing_with_weights(tmp_path):
    _apple_dir(tmp_path, rnn=False)
    with pytest.raises(ValueError, match="unexpected tensor 'rnn_u.weight'"):
        load_drafter(tmp_path)


def test_truncated_safetensors_names_file(tmp_path):
    model = _make()
    save_drafter(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    expected = r"cannot read drafter weights .*model\.safetensors"
    with pytest.raises(ValueError, match=expected):
        load_drafter(tmp_path)


def test_truncated_model_pt_names_file(tmp_path):
    raw = _apple_tensors(exit_dim=6, layers=1, rnn=True)
    config = _apple_config(exit_dim=6, layers=1, rnn=True)
    _write_apple(tmp_path, config, raw, "model.pt")
    pt = tmp_path / "model.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.pt"):
        load_drafter(tmp_path)


def test_bad_json_names_file(tmp_path):
    save_drafter(_make(), tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": [')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_drafter(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_drafter(tmp_path)
    save_drafter(_make(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_drafter(tmp_path)


def test_invalid_our_config_names_file_and_field(tmp_path):
    save_drafter(_make(), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["drafter"]["num_draft_layers"] = -2
    (tmp_path / "config.json").write_text(json.dumps(data))
    expected = r"config\.json: invalid ReDrafter config"
    with pytest.raises(ValueError, match=expected) as info:
        load_drafter(tmp_path)
    assert "num_draft_layers" in str(info.value)


def test_draft_vocab_length_must_match_lm_head(tmp_path):
    save_drafter(_make(draft_vocab=[0, 3, 4, 12]), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["drafter"]["draft_vocab"] = [0, 3, 4, 7, 12]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        load_drafter(tmp_path)
    message = str(info.value)
    assert "tensor 'lm_head.weight' has shape [4, 8], expected [5, 8]" in message
    assert "tensor 'draft_vocab' has shape [4], expected [5]" in message


def test_draft_vocab_values_must_match_config(tmp_path):
    save_drafter(_make(draft_vocab=[0, 3, 4, 12]), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["drafter"]["draft_vocab"] = [0, 3, 5, 12]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'draft_vocab'.*differs from config"):
        load_drafter(tmp_path)


def test_other_speculators_type_rejected(tmp_path):
    save_drafter(_make(), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["speculators_model_type"] = "eagle3"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'eagle3'"):
        load_drafter(tmp_path)


def test_unrecognised_config_lists_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    expected = r"unrecognised drafter config.*\['model_type'\]"
    with pytest.raises(ValueError, match=expected):
        load_drafter(tmp_path)


# ------------------------------------------------------------------ convert


def test_convert_apple_to_ours_round_trip(tmp_path):
    src, dst = tmp_path / "apple", tmp_path / "ours"
    raw = _apple_tensors(exit_dim=6, layers=2, rnn=True)
    _write_apple(src, _apple_config(exit_dim=6, layers=2, rnn=True), raw, "model.pt")
    convert_checkpoint(src, dst, verifier="org/target")
    data = json.loads((dst / "config.json").read_text())
    assert data["speculators_model_type"] == "redrafter"
    assert data["speculators_config"]["verifier"]["name_or_path"] == "org/target"
    stored = load_file(str(dst / "model.safetensors"))
    assert torch.equal(stored["lm_head.weight"], raw["lm_head.2.weight"])
    assert torch.equal(stored["layers.1.linear.bias"], raw["lm_head.1.linear.bias"])
    torch.testing.assert_close(
        _outputs(load_drafter(dst)), _outputs(load_drafter(src)), rtol=0, atol=0
    )


def test_convert_ours_keeps_verifier_and_options(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "b"
    model = _make(draft_vocab=[2, 5, 6])
    options = ReDrafterOptions(beam_width=9, beam_length=6)
    save_drafter(model, src, verifier="org/t", options=options)
    convert_checkpoint(src, dst)
    cfg = load_checkpoint_config(dst)
    assert cfg.speculators_config.verifier.name_or_path == "org/t"
    assert cfg.default_options() == options
    assert cfg.drafter == model.config
    loaded = load_drafter(dst)
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)


def test_tokenizer_fingerprint_is_recorded_and_tells_numberings_apart(tmp_path):
    from vllm_redrafter.checkpoint import read_tokenizer_fingerprint, tokenizer_fingerprint

    vocab = {"a": 0, "b": 1, "c": 2}
    fingerprint = tokenizer_fingerprint(vocab)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 16
    assert tokenizer_fingerprint(dict(reversed(list(vocab.items())))) == fingerprint
    assert tokenizer_fingerprint({"a": 1, "b": 0, "c": 2}) != fingerprint  # same size
    assert tokenizer_fingerprint({"a": 0, "b": 1, "d": 2}) != fingerprint
    model = RecurrentDrafter(DrafterConfig(hidden_size=4, vocab_size=3, exit_dim=8,
                                           num_draft_layers=0))
    assert read_tokenizer_fingerprint(save_drafter(model, tmp_path / "none")) is None
    out = save_drafter(model, tmp_path / "with", tokenizer_fingerprint=fingerprint)
    assert read_tokenizer_fingerprint(out) == fingerprint
    assert load_drafter(out).config == model.config  # the extra key loads unchanged

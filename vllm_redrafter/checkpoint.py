# SPDX-License-Identifier: Apache-2.0
"""Drafter checkpoints: save/load our format, load Apple's (and TRT-LLM-renamed) format.

Our format (a speculators-style directory)::

    config.json        ReDrafterCheckpointConfig (speculators_model_type "redrafter")
    model.safetensors  RecurrentDrafter.state_dict() keys (see RecurrentDrafter)

Apple's format (``Drafter.save_pretrained`` in ``apple/ml-recurrent-drafter``)::

    config.json        {"model_type": "recurrent_drafting_drafter", "vocab_size": V,
                        "hidden_size": H, "exit_dim": E, "num_draft_layers": N,
                        "rnn": true, ...}
    model.safetensors  (or model.pt / pytorch_model.bin)

Apple tensor names and their spellings accepted here (the same spellings TRT-LLM's
converter accepts; an optional ``drafter.`` prefix, as in TRT-LLM-converted weights, is
stripped first):

==============================================  =================================
Apple / TRT spelling                            our key
==============================================  =================================
``input_proj.*``, ``input_projs.*``             ``input_proj.*``
``{lm_head,lm_heads,0}.{i}.linear.*`` (i < N)   ``layers.{i}.linear.*``
``{lm_head,lm_heads,0}.{N}.weight``             ``lm_head.weight``
``layers.{i}.linear.*``, ``lm_head.weight``     unchanged (TRT-LLM output names)
``rnn_u.*``, ``rnn_w.weight``                   unchanged
``emb_norm.weight``                             ignored (unused by the forward)
==============================================  =================================

Every tensor is checked against the architecture from ``config.json``; a missing,
unexpected or mis-shaped tensor raises ``ValueError`` naming it with the expected and
found shapes. This module never imports vLLM.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from vllm_redrafter.config import (
    DrafterConfig,
    ReDrafterCheckpointConfig,
    ReDrafterOptions,
)
from vllm_redrafter.drafter import RecurrentDrafter
from vllm_redrafter.logger import get_logger

logger = get_logger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHARD_INDEX_NAME = "model.safetensors.index.json"
APPLE_MODEL_TYPE = "recurrent_drafting_drafter"
# Weight files tried for Apple's format, in order.
APPLE_WEIGHT_NAMES = (WEIGHTS_NAME, "model.pt", "pytorch_model.bin")
# Apple config keys that do not change the forward pass.
_APPLE_IGNORED_KEYS = ("emb_norm", "rms_norm_eps", "num_lookback_tokens")

CheckpointFormat = Literal["redrafter", "apple"]

# "<prefix>.<i>.linear.weight|bias" or "<prefix>.<i>.weight" of Apple's Sequential head
_SEQUENTIAL_KEY = re.compile(
    r"^(?:lm_head|lm_heads|0)\.(\d+)\.(linear\.(?:weight|bias)|weight)$"
)


# ---------------------------------------------------------------------- saving


FINGERPRINT_KEY = "tokenizer_fingerprint"
"""Top-level ``config.json`` key: the target tokenizer's :func:`tokenizer_fingerprint`."""


def tokenizer_fingerprint(vocab: Mapping[str, int]) -> str:
    """A short, stable digest of a tokenizer's token -> id table.

    Two tokenizers with the same vocabulary size but other tokens or another numbering
    (a drafter trained for another model family) get different fingerprints.

    Example: ``tokenizer_fingerprint({"a": 0, "b": 1})`` is ``"sha256:"`` + 16 hex
    digits of the SHA-256 of ``"0\ta\n1\tb\n"``; ``{"a": 1, "b": 0}`` differs.
    """
    import hashlib

    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda item: (item[1], item[0])):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    return "sha256:" + digest.hexdigest()[:16]


def fingerprint_of_tokenizer(path: str | os.PathLike[str], *, revision: str | None = None,
                             trust_remote_code: bool = False) -> str | None:
    """:func:`tokenizer_fingerprint` of the tokenizer at ``path`` (a local directory or an
    already cached hub id; nothing is downloaded), or None when none can be loaded."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            str(path), revision=revision, trust_remote_code=trust_remote_code,
            local_files_only=True)
        return tokenizer_fingerprint(tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - no tokenizer there: the caller decides
        logger.debug("no tokenizer fingerprint for %s", path, exc_info=True)
        return None


def read_tokenizer_fingerprint(directory: str | os.PathLike[str]) -> str | None:
    """The fingerprint a drafter checkpoint records (None: not recorded, e.g. Apple's or
    TensorRT-LLM's format, or a drafter exported before fingerprints)."""
    try:
        raw = _read_json(Path(directory) / CONFIG_NAME)
    except (OSError, ValueError):
        return None
    value = raw.get(FINGERPRINT_KEY)
    return value if isinstance(value, str) else None


def save_drafter(
    model: RecurrentDrafter,
    directory: str | os.PathLike[str],
    *,
    verifier: str | None = None,
    options: ReDrafterOptions | None = None,
    dtype: torch.dtype | None = None,
    verifier_architectures: list[str] | None = None,
    tokenizer_fingerprint: str | None = None,
) -> Path:
    """Write ``model`` in our format (``config.json`` + ``model.safetensors``).

    Args:
        model: the drafter.
        directory: created if missing; existing files of the same name are replaced.
        verifier: target model name or path recorded in ``speculators_config.verifier``.
        options: default beam settings recorded in ``proposal_methods``.
        dtype: cast floating-point tensors to this dtype (default: keep).
        verifier_architectures: target's HF architectures (``["LlamaForCausalLM"]``).
        tokenizer_fingerprint: the target tokenizer's :func:`tokenizer_fingerprint`,
            checked against the serving target at start-up.

    Returns:
        The directory as a ``Path``.
    """
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    stored_dtype = _float_dtype(tensors)
    config = ReDrafterCheckpointConfig.make(
        model.config,
        options=options,
        verifier=verifier,
        verifier_architectures=verifier_architectures,
        torch_dtype=str(stored_dtype).removeprefix("torch."),
        **({FINGERPRINT_KEY: tokenizer_fingerprint} if tokenizer_fingerprint else {}),
    )
    _atomic_write(
        out_dir / WEIGHTS_NAME,
        lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
    )
    text = json.dumps(config.to_json_dict(), indent=2) + "\n"
    _atomic_write(out_dir / CONFIG_NAME, lambda path: path.write_text(text))
    logger.info(
        "Saved ReDrafter drafter (%d parameters, %s) to %s",
        model.num_parameters(),
        stored_dtype,
        out_dir,
    )
    return out_dir


def _float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the weights (``lm_head.weight`` or ``head_proj.weight``)."""
    for key in ("lm_head.weight", "head_proj.weight"):
        if key in tensors:
            return tensors[key].dtype
    return next(t.dtype for t in tensors.values() if t.is_floating_point())


def _atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same directory, then rename over target."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"drafter checkpoint config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def detect_format(raw_config: Mapping[str, Any]) -> CheckpointFormat:
    """Tell our format from Apple's by the keys of a parsed ``config.json``.

    Raises:
        ValueError: for a speculators checkpoint of another algorithm or an unknown
            layout.
    """
    spec_type = raw_config.get("speculators_model_type")
    if spec_type is not None:
        if spec_type != "redrafter":
            raise ValueError(
                f"speculators_model_type is {spec_type!r}; this loader only reads "
                "'redrafter' checkpoints"
            )
        return "redrafter"
    if "drafter" in raw_config:
        return "redrafter"
    apple_keys = {"hidden_size", "exit_dim", "num_draft_layers"}
    if raw_config.get("model_type") == APPLE_MODEL_TYPE:
        return "apple"
    if apple_keys <= raw_config.keys():
        return "apple"
    raise ValueError(
        "unrecognised drafter config: expected our speculators format "
        "(speculators_model_type='redrafter') or Apple's format "
        f"(model_type={APPLE_MODEL_TYPE!r}); found keys {sorted(raw_config)}"
    )


def _apple_drafter_config(
    raw: Mapping[str, Any], path: Path, tensor_names: set[str] | None
) -> DrafterConfig:
    """DrafterConfig from Apple's config.json (``rnn`` inferred from the weights if
    absent)."""
    missing = [
        key for key in ("vocab_size", "hidden_size", "exit_dim", "num_draft_layers")
        if key not in raw
    ]
    if missing:
        raise ValueError(f"{path}: Apple drafter config lacks required keys {missing}")
    rnn = raw.get("rnn")
    if rnn is None:
        rnn = tensor_names is not None and any(
            name.removeprefix("drafter.").startswith("rnn_u.") for name in tensor_names
        )
        logger.info("%s has no 'rnn' key; inferred rnn=%s from the weights", path, rnn)
    ignored = [key for key in _APPLE_IGNORED_KEYS if key in raw]
    if ignored:
        logger.debug("Ignoring Apple config keys %s (unused by the forward)", ignored)
    try:
        return DrafterConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            exit_dim=raw["exit_dim"],
            num_draft_layers=raw["num_draft_layers"],
            rnn=rnn,
        )
    except ValidationError as err:
        raise ValueError(f"{path}: invalid Apple drafter config: {err}") from err


def load_checkpoint_config(
    directory: str | os.PathLike[str],
) -> ReDrafterCheckpointConfig:
    """Read ``config.json`` of either format as a :class:`ReDrafterCheckpointConfig`.

    For Apple's format the speculators sections are synthesised with default options and
    no verifier.
    """
    path = Path(directory) / CONFIG_NAME
    raw = _read_json(path)
    fmt = detect_format(raw)
    if fmt == "redrafter":
        try:
            return ReDrafterCheckpointConfig.model_validate(raw)
        except ValidationError as err:
            raise ValueError(f"{path}: invalid ReDrafter config: {err}") from err
    names = None
    if raw.get("rnn") is None:
        names = set(_read_weights(_find_apple_weights(Path(directory))))
    return ReDrafterCheckpointConfig.make(_apple_drafter_config(raw, path, names))


def _find_apple_weights(directory: Path) -> Path:
    if (directory / SHARD_INDEX_NAME).is_file():
        return directory / SHARD_INDEX_NAME
    for name in APPLE_WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no drafter weights in {directory}: expected one of "
        f"{[*APPLE_WEIGHT_NAMES, SHARD_INDEX_NAME]}"
    )


def _find_our_weights(directory: Path) -> Path:
    for name in (WEIGHTS_NAME, SHARD_INDEX_NAME):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"drafter weights not found: {directory / WEIGHTS_NAME}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a weight file onto the CPU; errors name the file."""
    if path.name == SHARD_INDEX_NAME:
        index = _read_json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path} has no 'weight_map' object")
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_weights(path.parent / shard))
        return tensors
    if not path.is_file():
        raise FileNotFoundError(f"drafter weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors/pickle raise assorted types
        raise ValueError(
            f"cannot read drafter weights {path} (truncated or corrupt?): {err}"
        ) from err
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise ValueError(f"{path} does not hold a mapping of tensor names to tensors")
    return dict(loaded)


def rename_apple_keys(
    tensors: Mapping[str, torch.Tensor], num_draft_layers: int
) -> dict[str, torch.Tensor]:
    """Rename Apple / TRT-LLM tensor names to ours (see the module docstring table).

    Unknown names are kept as they are, so the shape check reports them as unexpected.
    ``emb_norm.weight`` is dropped.

    Example (``N = 2``): ``lm_heads.1.linear.bias -> layers.1.linear.bias``,
    ``0.2.weight -> lm_head.weight``, ``drafter.rnn_w.weight -> rnn_w.weight``.
    """
    return _rename_apple_keys(tensors, num_draft_layers)[0]


def _rename_apple_keys(
    tensors: Mapping[str, torch.Tensor], num_draft_layers: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``rename_apple_keys`` plus the map ``our key -> stored name``."""
    renamed: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for name, tensor in tensors.items():
        key = name.removeprefix("drafter.")
        if key == "emb_norm.weight":
            continue
        if key.startswith("input_projs."):
            key = "input_proj." + key.removeprefix("input_projs.")
        match = _SEQUENTIAL_KEY.match(key)
        if match is not None:
            index, tail = int(match.group(1)), match.group(2)
            if index < num_draft_layers and tail.startswith("linear."):
                key = f"layers.{index}.{tail}"
            elif index == num_draft_layers and tail == "weight":
                key = "lm_head.weight"
        if key in renamed:
            raise ValueError(
                f"tensors {sources[key]!r} and {name!r} both map to {key!r}"
            )
        renamed[key] = tensor
        sources[key] = name
    return renamed, sources


def _check_tensors(
    tensors: Mapping[str, torch.Tensor],
    config: DrafterConfig,
    source: Path,
    stored_names: Mapping[str, str] | None = None,
    apple: bool = False,
) -> None:
    """Raise ValueError listing every missing, unexpected or mis-shaped tensor.

    ``stored_names`` maps our key to the name found in the file, when they differ;
    with ``apple`` the messages for missing tensors also give Apple's spelling.
    """
    aliases = stored_names or {}

    def missing_label(key: str) -> str:
        if not apple:
            return repr(key)
        if key == "lm_head.weight":
            apple_key = f"lm_head.{config.num_draft_layers}.weight"
        elif key.startswith("layers."):
            apple_key = "lm_head." + key.removeprefix("layers.")
        else:
            return repr(key)
        return f"{key!r} (Apple name {apple_key!r})"

    def label(key: str) -> str:
        stored = aliases.get(key, key)
        return repr(key) if stored == key else f"{key!r} (stored as {stored!r})"

    with torch.device("meta"):
        reference = RecurrentDrafter(config)
    expected = {key: tuple(v.shape) for key, v in reference.state_dict().items()}
    problems: list[str] = []
    for key in sorted(expected.keys() - tensors.keys()):
        problems.append(
            f"missing tensor {missing_label(key)} "
            f"(expected shape {list(expected[key])})"
        )
    for key in sorted(tensors.keys() - expected.keys()):
        problems.append(
            f"unexpected tensor {label(key)} (found shape {list(tensors[key].shape)})"
        )
    for key in sorted(expected.keys() & tensors.keys()):
        found = tuple(tensors[key].shape)
        if found != expected[key]:
            problems.append(
                f"tensor {label(key)} has shape {list(found)}, "
                f"expected {list(expected[key])}"
            )
    if problems:
        raise ValueError(
            f"drafter weights in {source} do not match the config (hidden_size="
            f"{config.hidden_size}, exit_dim={config.exit_dim}, num_draft_layers="
            f"{config.num_draft_layers}, rnn={config.rnn}, draft_vocab_size="
            f"{config.draft_vocab_size}, head={config.head}): " + "; ".join(problems)
        )
    if config.draft_vocab is not None:
        stored = tensors["draft_vocab"]
        if stored.dtype != torch.int64 or stored.tolist() != config.draft_vocab:
            raise ValueError(
                f"tensor 'draft_vocab' in {source} differs from config draft_vocab"
            )
    for key, tensor in tensors.items():
        if key != "draft_vocab" and not tensor.is_floating_point():
            raise ValueError(
                f"tensor {label(key)} in {source} has dtype {tensor.dtype}, "
                "expected a floating-point dtype"
            )


def load_drafter(
    directory: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> RecurrentDrafter:
    """Load a drafter saved in our format or Apple's (detected from ``config.json``).

    Args:
        directory: checkpoint directory.
        dtype: floating-point dtype of the returned module (default: the stored dtype
            of the output projection).
        device: device of the returned module (default: CPU).

    Raises:
        FileNotFoundError: ``config.json`` or the weights are missing (names the file).
        ValueError: garbled config or weights, or tensors that do not match the config.
    """
    root = Path(directory)
    config_path = root / CONFIG_NAME
    raw = _read_json(config_path)
    fmt = detect_format(raw)
    if fmt == "redrafter":
        try:
            config = ReDrafterCheckpointConfig.model_validate(raw).drafter
        except ValidationError as err:
            raise ValueError(f"{config_path}: invalid ReDrafter config: {err}") from err
        weights_path = _find_our_weights(root)
        tensors = _read_weights(weights_path)
        stored_names: dict[str, str] = {}
    else:
        weights_path = _find_apple_weights(root)
        raw_tensors = _read_weights(weights_path)
        config = _apple_drafter_config(raw, config_path, set(raw_tensors))
        num_layers = config.num_draft_layers
        tensors, stored_names = _rename_apple_keys(raw_tensors, num_layers)
    _check_tensors(tensors, config, weights_path, stored_names, apple=fmt == "apple")

    target_dtype = dtype if dtype is not None else _float_dtype(tensors)
    state = {
        key: value.to(target_dtype) if value.is_floating_point() else value
        for key, value in tensors.items()
    }
    with torch.device("meta"):
        model = RecurrentDrafter(config)
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        model = model.to(device)
    logger.info(
        "Loaded %s-format ReDrafter drafter from %s (%d parameters, %s)",
        fmt,
        root,
        model.num_parameters(),
        target_dtype,
    )
    return model


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    verifier: str | None = None,
    *,
    options: ReDrafterOptions | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Load any supported drafter checkpoint from ``src`` and save it in our format.

    When ``src`` is already in our format its verifier, default options and tokenizer
    fingerprint are kept unless overridden by ``verifier`` / ``options``; otherwise the
    fingerprint is taken from the verifier's tokenizer when it is available locally.

    Returns:
        ``dst`` as a ``Path``.
    """
    source_config = load_checkpoint_config(src)
    model = load_drafter(src, dtype=dtype)
    section = source_config.speculators_config
    if verifier is None:
        verifier = section.verifier.name_or_path
    if options is None:
        options = source_config.default_options()
    fingerprint = read_tokenizer_fingerprint(src)
    if fingerprint is None and verifier:
        fingerprint = fingerprint_of_tokenizer(verifier)
    return save_drafter(
        model,
        dst,
        verifier=verifier,
        options=options,
        verifier_architectures=list(section.verifier.architectures) or None,
        tokenizer_fingerprint=fingerprint,
    )

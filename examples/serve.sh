#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Serve a target with ReDrafter through the OpenAI-compatible server, in both CLI forms.
#
#   examples/serve.sh [config|shorthand] [TARGET] [DRAFTER] [PORT] [extra vllm serve args...]
#
# then, from another shell:  python examples/openai_client.py --port PORT
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
form="${1:-config}"
target="${2:-$(vllm-redrafter demo-target | tail -n 1)}"   # last stdout line = the dir
drafter="${3:-$here/drafters/smollm2-135m-instruct}"
port="${4:-8000}"
shift $(( $# < 4 ? $# : 4 ))   # anything after PORT goes to `vllm serve` as is
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"   # CPU builds need a KV budget

common=(--host 127.0.0.1 --port "$port" --enforce-eager --max-model-len 2048
        --served-model-name demo "$@")
if [[ "$form" == "shorthand" ]]; then
  # Shorthand: beam settings come from the drafter's config.json.
  exec vllm serve "$target" "${common[@]}" --speculative-model "redrafter:$drafter"
else
  # Full form: same JSON keys as LLM(speculative_config=...).
  exec vllm serve "$target" "${common[@]}" --speculative-config \
    "{\"method\": \"redrafter\", \"model\": \"$drafter\", \"beam_width\": 4, \"beam_length\": 4}"
fi

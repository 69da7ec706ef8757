#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
#
# Distil a ReDrafter drafter for a target of your own, end to end, on a small prompt set.
# A few minutes on a laptop CPU with the demo target; the drafter it makes is only a toy
# (see examples/drafters/smollm2-135m-instruct/README.md for the full-size recipe).
#
#   bash examples/train_drafter.sh [TARGET_DIR] [PROMPTS.jsonl] [N_PROMPTS]
#
# Every stage is resumable: rerun the same command after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${1:-$(.venv/bin/vllm-redrafter demo-target)}    # any HF-format causal LM directory
PROMPTS=${2:-../shared/data/train_prompts.jsonl}         # JSONL: prompt | turns | conversations
N=${3:-200}
RUN=runs/example
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}   # vLLM on CPU needs a KV budget

# 1. The target's own greedy responses (token ids), N prompts sampled from the file.
#    Greedy self-generated text is the paper's distillation target: at every position the
#    target's greedy continuation is the rest of the response.
.venv/bin/vllm-redrafter generate --target "$TARGET" --prompts "$PROMPTS" \
    --out "$RUN/gen" --shuffle-seed 0 --limit "$N" --max-tokens 192 --dtype bfloat16

# 2 + 3. Hidden states (cached in $RUN/gen/hidden) and training. Step i predicts token t+i+2
#    from h_t and the embeddings of tokens t+1..t+i+1; the target stays frozen.
#    --steps 4 = beam length 5; a 4k-token draft vocabulary chosen by frequency.
.venv/bin/vllm-redrafter train --target "$TARGET" --data "$RUN/gen" --out "$RUN/train" \
    --steps 4 --layers 2 --draft-vocab 4096 --epochs 2 --batch-tokens 1024 \
    --heldout-fraction 0.1 --eval-every 50

# The drafter (config.json + model.safetensors) is in $RUN/train/drafter; the curves in
# $RUN/train/curves.png; per-step held-out metrics in $RUN/train/metrics.jsonl.

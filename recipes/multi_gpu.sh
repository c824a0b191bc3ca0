#!/usr/bin/env bash
# Recipe: several GPUs on one machine.
#
#   GPUS=4 bash recipes/multi_gpu.sh [more overrides]                       # DDP over 4 GPUs
#   GPUS=8 STRATEGY=deepspeed_zero3 bash recipes/multi_gpu.sh model=qwen2_5_7b
#
# cai starts one process per device itself (no torchrun needed): every rank generates its share of
# the prompts, training stages run data-parallel (ddp) or sharded (deepspeed_zero2, deepspeed_zero3,
# deepspeed_zero3_offload), and rank 0 writes the manifests. The memory plan is per device: stage=check
# prints it. Across machines, use Lightning's launcher (trainer.num_nodes=N, one command per node).
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
python "$CAI/train.py" "strategy=${STRATEGY:-ddp}" "trainer.devices=${GPUS:-2}" "$@" stage=check
python "$CAI/train.py" "strategy=${STRATEGY:-ddp}" "trainer.devices=${GPUS:-2}" "$@"

#!/usr/bin/env bash
# Recipe: the whole method on your own model: a hub id or a local checkpoint directory.
#
#   bash recipes/your_own_model.sh Qwen/Qwen2.5-0.5B-Instruct [more overrides]
#   bash recipes/your_own_model.sh /data/checkpoints/my-sft model.dtype=bfloat16
#
# The labeller and the PM backbone follow the policy unless you pick them on their own
# (model@feedback_model=qwen2_5_7b). A hub id needs network or a populated HF cache. The memory plan
# is checked first (stage=check prints it), so a model too large for the machine stops in seconds.
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
MODEL="${1:?give a hub id or a checkpoint directory}"
shift
python "$CAI/train.py" model=hf "model.name_or_path=$MODEL" "$@" stage=check   # every check and the memory plan; nothing runs
python "$CAI/train.py" model=hf "model.name_or_path=$MODEL" "$@"

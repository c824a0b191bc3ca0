#!/usr/bin/env bash
# Recipe: the paper's scale on GPUs, from public hh-rlhf transcripts.
#
#   bash recipes/paper_scale.sh red_team_attempts.jsonl.gz helpful-base-train.jsonl.gz [more overrides]
#
# experiment=paper needs your own prompt sets (the built-in ones hold about 170 prompts per kind).
# Public sets that fit: the first human turns of Anthropic's hh-rlhf red-team-attempts (38,961
# transcripts) and of hh-rlhf helpful-base. This turns both into prompt files, checks the whole run
# (ranges, files, the memory plan per GPU) and runs it: Qwen2.5-7B on 8 GPUs under ZeRO-3, vLLM rollouts.
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
RED="${1:?give the red-team transcripts (.jsonl[.gz] or .json)}"
HELPFUL="${2:?give the helpfulness transcripts}"
shift 2
OUT="${CAI_ROOT:-.}/prompts"
mkdir -p "$OUT"
python "$CAI/recipes/to_prompts.py" "$RED" "$OUT/red_team.jsonl"
python "$CAI/recipes/to_prompts.py" "$HELPFUL" "$OUT/helpful.jsonl"
RUN=(experiment=paper model=qwen2_5_7b generation=vllm strategy=deepspeed_zero3 trainer.devices=8
     "data.red_team=$OUT/red_team.jsonl" "data.helpful=$OUT/helpful.jsonl")
python "$CAI/train.py" "${RUN[@]}" "$@" stage=check   # the memory plan per GPU, before hours of compute
python "$CAI/train.py" "${RUN[@]}" "$@"

#!/usr/bin/env bash
# Recipe: the paper's scale on GPUs, from public hh-rlhf transcripts.
#
#   bash recipes/paper_scale.sh red_team_attempts.jsonl.gz helpful-base-train.jsonl.gz [more overrides]
#   GENERATION=hf bash recipes/paper_scale.sh ...   # without vLLM
#
# experiment=paper needs your own prompt sets (the built-in ones hold about 170 prompts per kind).
# Public sets that fit: the first human turns of Anthropic's hh-rlhf red-team-attempts (38,961
# transcripts) and of hh-rlhf helpful-base. This turns both into prompt files, checks the whole run
# (ranges, files, the memory plan per GPU) and runs it: Qwen2.5-7B on 8 GPUs under ZeRO-3, vLLM rollouts.
# At that size the memory plan fits 8 x 80 GB with micro-batches of 4 for SFT and the PM (gradient
# accumulation keeps the paper's batches of 128 and 64), PPO's value head instead of a second 7B
# critic, minibatches of 16, and vLLM in a quarter of each GPU; the paper's settings as they are
# need 153 GiB per GPU for SFT.
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
RED="${1:?give the red-team transcripts (.jsonl[.gz] or .json)}"
HELPFUL="${2:?give the helpfulness transcripts}"
shift 2
OUT="${CAI_ROOT:-.}/prompts"
mkdir -p "$OUT"
python "$CAI/recipes/to_prompts.py" "$RED" "$OUT/red_team.jsonl"
python "$CAI/recipes/to_prompts.py" "$HELPFUL" "$OUT/helpful.jsonl"
RUN=(experiment=paper model=qwen2_5_7b strategy=deepspeed_zero3 trainer.devices=8
     sft.batch_size=4 sft.grad_accum=32 pm.batch_size=4 pm.grad_accum=16 ppo.value_model=head ppo.minibatch_size=16
     "data.red_team=$OUT/red_team.jsonl" "data.helpful=$OUT/helpful.jsonl")
if [ "${GENERATION:-vllm}" = vllm ]; then
  RUN+=(generation=vllm generation.gpu_memory_utilization=0.25)
else
  RUN+=("generation=$GENERATION")   # GENERATION=hf: Hugging Face generate, no vLLM needed
fi
python "$CAI/train.py" "${RUN[@]}" "$@" stage=check   # the memory plan per GPU, before hours of compute
python "$CAI/train.py" "${RUN[@]}" "$@"

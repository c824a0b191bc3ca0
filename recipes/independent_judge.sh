#!/usr/bin/env bash
# Recipe: judge a run by an independent preference model, trained on human labels.
#
#   bash recipes/independent_judge.sh harmless-base-train.jsonl.gz helpful-base-train.jsonl.gz \
#        harmless-base-test.jsonl.gz [more overrides]
#
# By default the frontier is judged by the run's own labeller, so it measures agreement with that
# labeller. This trains the paper's HH-RLHF baseline PM on human comparisons (label=human), then
# runs the method judged by that PM, after measuring the judge on held-out human comparisons
# (eval.judge_check: its agreement goes to elo.json, W&B and the plot's corner). Judge every run
# you compare with the same PM.
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
HARMLESS="${1:?give hh-rlhf harmlessness comparisons (train)}"
HELPFUL="${2:?give hh-rlhf helpfulness comparisons (train)}"
CHECK="${3:?give held-out hh-rlhf harmlessness comparisons (test)}"
shift 3
HUMAN=(label=human "label.data=$HARMLESS" "pm.helpful_data=$HELPFUL")
python "$CAI/train.py" stage=label "${HUMAN[@]}" "$@"
python "$CAI/train.py" stage=pm "${HUMAN[@]}" "$@"
JUDGE="$(cd "${CAI_ROOT:-.}/artifacts/pm/latest" && pwd -P)/model"   # the PM just trained, by its lineage directory
echo "judge: $JUDGE"
python "$CAI/train.py" eval.judge=pm "eval.judge_pm=$JUDGE" "eval.judge_check=$CHECK" "$@"

#!/usr/bin/env bash
# Recipe: an ablation grid, label type x constitution, and its frontier.
#
#   bash recipes/ablation_grid.sh [more overrides]
#
# One Hydra multirun: every job shares what is upstream of the axis it changes (the SL data, the SFT
# model and the pairs are computed once), and when the last job ends the multirun callback fits one
# Elo over every job's snapshots: artifacts/frontier/latest/frontier.png. With logger=wandb the jobs
# and the frontier run share one W&B group.
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
LABELS="${LABELS:-hard,soft,cot}"
CONSTITUTIONS="${CONSTITUTIONS:-default}"   # e.g. single,default,ensemble for the paper's 3x3 grid
python "$CAI/train.py" -m "label=$LABELS" "constitution=$CONSTITUTIONS" "$@"

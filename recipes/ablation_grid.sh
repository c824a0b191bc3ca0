#!/usr/bin/env bash
# Recipe: an ablation grid, label type x constitution, and its frontier.
#
#   bash recipes/ablation_grid.sh [more overrides]
#
# One Hydra multirun: every job shares what is upstream of the axis it changes (the SL data, the SFT
# model and the pairs are computed once), and as each job's evaluation ends it fits one Elo over every
# finished job's snapshots: artifacts/frontier/latest/frontier.png. With logger=wandb the jobs share
# one W&B group, and each logs the group's frontier into it (frontier/group/table, frontier/group/plot).
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
LABELS="${LABELS:-hard,soft,cot}"
CONSTITUTIONS="${CONSTITUTIONS:-default}"   # e.g. single,default,ensemble for the paper's 3x3 grid
python "$CAI/train.py" -m "label=$LABELS" "constitution=$CONSTITUTIONS" "$@"

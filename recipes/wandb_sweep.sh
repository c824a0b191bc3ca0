#!/usr/bin/env bash
# Recipe: a W&B sweep over a spec in sweeps/.
#
#   bash recipes/wandb_sweep.sh sweeps/label_x_constitution.yaml            # online: W&B's controller
#   CAI_SWEEP=local bash recipes/wandb_sweep.sh sweeps/seeds.yaml [overrides]  # no account: the grid here
#
# Online, `wandb sweep` registers the spec and prints its id, and `wandb agent` runs
# `python train.py <key=value ...>` for each of its runs (start one agent per GPU, from this folder).
# As each run's evaluation ends it redraws the sweep's frontier over every finished run and logs it
# into the sweep's group (frontier/group/table, frontier/group/plot). Without an account, a grid spec
# is the Hydra multirun of its values: the same runs, offline, in one W&B group.
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
SPEC="${1:?give a sweep spec, e.g. sweeps/label_x_constitution.yaml}"
shift
if [ "${CAI_SWEEP:-online}" = local ]; then
  mapfile -t GRID < <(python "$CAI/recipes/sweep_grid.py" "$SPEC")
  python "$CAI/train.py" -m "${GRID[@]}" "$@"
else
  wandb sweep "$SPEC"
  echo "now run: wandb agent ENTITY/PROJECT/SWEEP_ID   (the id printed above), one per GPU"
fi

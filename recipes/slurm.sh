#!/usr/bin/env bash
# Recipe: a multirun on a SLURM cluster, one SLURM job (one GPU) per run.
#
#   PARTITION=gpu bash recipes/slurm.sh label=hard,soft,cot [overrides]
#
# Needs `pip install -e ".[sweepers]"` (hydra-submitit-launcher) on the login node and a CAI_ROOT that
# every node sees (a shared file system): runs share their finished stages and their group's frontier
# there. conf/hydra/launcher/slurm.yaml holds the job's resources (one GPU, a timeout, memory); set
# any of them with hydra.launcher.<field>=... . Several GPUs per job are not supported under SLURM yet.
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
python "$CAI/train.py" -m hydra/launcher=slurm hydra.launcher.partition="${PARTITION:?set PARTITION to a SLURM partition}" \
  trainer.devices=1 "$@"

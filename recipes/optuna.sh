#!/usr/bin/env bash
# Recipe: tune hyperparameters with Optuna, each trial a whole run scored by its final policy's Elo.
#
#   bash recipes/optuna.sh [overrides]                                # searches SEARCH: the PPO learning rate
#   SEARCH='ppo.kl_coef=interval(0.01,0.2) label=choice(hard,soft)' TRIALS=30 bash recipes/optuna.sh
#
# Needs `pip install -e ".[sweepers]"` (hydra-optuna-sweeper). Each trial returns `objective`
# (default eval/summary/harmless_elo, the final policy's harmlessness Elo; any eval/summary/<field
# of elo.json>; DIRECTION=minimize for refusal_rate), and Optuna proposes the next values. Trials
# share what is upstream of what they change, and form one group with one frontier (frontier/group/*).
set -euo pipefail
CAI="$(cd "$(dirname "$0")/.." && pwd)"   # the checkout: train.py and these recipes
read -r -a SPACE <<< "${SEARCH-ppo.lr=tag(log,interval(1e-6,1e-4))}"
python "$CAI/train.py" -m hydra/sweeper=optuna hydra.sweeper.direction="${DIRECTION:-maximize}" \
  hydra.sweeper.n_trials="${TRIALS:-20}" hydra.sweeper.sampler.seed="${SEED:-0}" "${SPACE[@]}" "$@"

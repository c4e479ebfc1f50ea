#!/usr/bin/env bash
# Train the PANet baseline (global prototypes, n_grid 1, with prototype alignment) in the paper's
# set-up on the four folds. Same variables and arguments as
# local_prototype_network_visceral_1way_1shot_[train].sh (DATA, LOG_DIR, FOLDS, GPUS, PYTHON).
set -euo pipefail
cd "$(dirname "$0")"
CONFIG="${CONFIG:-paper} panet" exec "./local_prototype_network_visceral_1way_1shot_[train].sh" "$@"

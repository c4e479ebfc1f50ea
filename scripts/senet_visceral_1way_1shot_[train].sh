#!/usr/bin/env bash
# Train the SENet baseline (Roy et al. 2020; models/senet.py, named config `senet`: its own network,
# Dice loss, per-arm SGD, 20 epochs x 101 batches of 2 episodes) on the four folds, at 256 x 256 as the
# released models. Same variables and arguments as local_prototype_network_visceral_1way_1shot_[train].sh
# (DATA, LOG_DIR, FOLDS, GPUS, PYTHON); runs are named senet_<class_setting>_fold<F>.
# Evaluate them with
#   NAME=senet_six_organs METHOD=SENet CONFIG=senet \
#       scripts/local_prototype_network_visceral_1way_1shot_[test].sh eval.preset=senet
set -euo pipefail
cd "$(dirname "$0")"
CONFIG="${CONFIG:-senet input_size=256}" exec "./local_prototype_network_visceral_1way_1shot_[train].sh" "$@"

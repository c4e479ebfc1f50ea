#!/usr/bin/env bash
# Train LSLPN in the paper's set-up (1-way 1-shot, 512 x 512, VGG-16, n_grid 8, overlapping, max vote)
# on the four folds: 0 liver, 1 spleen, 2 kidneys, 3 psoas.
#
#   scripts/local_prototype_network_visceral_1way_1shot_[train].sh [extra Sacred overrides ...]
#
# Variables (all optional):
#   DATA=data/prepared        prepared data folder (python scripts/prepare_visceral.py --out DATA)
#   LOG_DIR=runs              Sacred run folders go under LOG_DIR/<name>/<id>/
#   FOLDS="0 1 2 3"           folds to train
#   CONFIG=paper              named config(s) from config.py, e.g. "paper" or "demo"
#   GPUS=1                    > 1: torchrun --nproc_per_node=GPUS (DistributedDataParallel)
#   PYTHON=.venv/bin/python   interpreter (falls back to python3)
# Example: DATA=/data/visceral_prep scripts/...[train].sh class_setting=all_structures amp=True
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DATA=${DATA:-data/prepared}
LOG_DIR=${LOG_DIR:-runs}
FOLDS=${FOLDS:-0 1 2 3}
CONFIG=${CONFIG:-paper}
GPUS=${GPUS:-1}
NUM_WORKERS=${NUM_WORKERS:-4}

if [ "$GPUS" -gt 1 ]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS")
else
  LAUNCH=("$PYTHON")
fi
for FOLD in $FOLDS; do
  echo "=== fold $FOLD: ${LAUNCH[*]} train.py with $CONFIG fold=$FOLD path.data_dir=$DATA $*"
  "${LAUNCH[@]}" train.py with $CONFIG "fold=$FOLD" "path.data_dir=$DATA" "path.log_dir=$LOG_DIR" \
    "num_workers=$NUM_WORKERS" "$@"
done

#!/usr/bin/env bash
# Evaluate the trained snapshots of each fold on the gold volumes (SENet volumetric protocol, next to
# the mask-copy baseline) with test.py.
#
#   scripts/local_prototype_network_visceral_1way_1shot_[test].sh [extra Sacred overrides ...]
#
# For fold F the snapshot is SNAPSHOT (best.pth) of the newest run under LOG_DIR/<NAME>_foldF/*/
# that has one. Variables (all optional):
#   DATA=data/prepared  LOG_DIR=runs  FOLDS="0 1 2 3"  CONFIG=paper  PYTHON=.venv/bin/python
#   NAME=lslpn_six_organs     run-name prefix (train.py names runs <method>_<class_setting>_fold<F>;
#                             use panet_six_organs, lslpn_all_structures, ...)
#   METHOD=LSLPN              method label in the results table
#   SNAPSHOT=best.pth         or last.pth
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DATA=${DATA:-data/prepared}
LOG_DIR=${LOG_DIR:-runs}
FOLDS=${FOLDS:-0 1 2 3}
CONFIG=${CONFIG:-paper}
NAME=${NAME:-lslpn_six_organs}
METHOD=${METHOD:-LSLPN}
SNAPSHOT=${SNAPSHOT:-best.pth}

for FOLD in $FOLDS; do
  runs=$(ls -d "$LOG_DIR/${NAME}_fold$FOLD"/*/ 2>/dev/null | sed 's:/$::' | awk -F/ '{print $NF" "$0}' \
         | sort -n | awk '{print $2}' || true)
  found=""
  for file in "$SNAPSHOT" last.pth; do     # best.pth needs validation; fall back to last.pth
    for run in $runs; do [ -f "$run/$file" ] && found="$run/$file"; done
    [ -n "$found" ] && break
  done
  if [ -n "$found" ] && [ "$(basename "$found")" != "$SNAPSHOT" ]; then
    echo "warning: no $SNAPSHOT for fold $FOLD (no validation?): using $found" >&2
  fi
  if [ -z "$found" ]; then
    echo "error: no $SNAPSHOT under $LOG_DIR/${NAME}_fold$FOLD/*/: train fold $FOLD first" \
         "(scripts/local_prototype_network_visceral_1way_1shot_[train].sh) or set LOG_DIR/NAME" >&2
    exit 2
  fi
  echo "=== fold $FOLD: $found"
  "$PYTHON" test.py with $CONFIG "fold=$FOLD" "path.data_dir=$DATA" "path.log_dir=$LOG_DIR" \
    "eval.snapshots={\"$METHOD\": \"$found\"}" "$@"
done

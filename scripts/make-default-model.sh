#!/usr/bin/env bash
# Rebuilds the shipped default model from scratch: train (seeded), export, calibrate, model card.
# Needs the dev install and the training data: ./scripts/install-data.sh --train --photos
# About 35 minutes of training and 10 of calibration on 2 cores; `--resume` continues a run.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEED=${SEED:-0}
"$BIN/simserve" train --recipe photos --seed "$SEED" --out runs/photos "$@"
"$BIN/simserve" export runs/photos/model.pt -o simserve/bundles/default
cp runs/photos/log.jsonl simserve/bundles/default/training-log.jsonl  # per-epoch losses, for the record
"$BIN/simserve" calibrate simserve/bundles/default  # search score = P(copy), fitted on training scenes' copies
"$BIN/python" -m training.robustness runs/photos  # the model card's "where it fails" table
"$BIN/python" -m training.model_card runs/photos simserve/bundles/default/MODEL_CARD.md
"$BIN/simserve" info

#!/usr/bin/env bash
# Rebuilds the shipped default model from scratch: train (seeded), export, calibrate, model card.
# Needs the dev install and the training data: ./scripts/install-data.sh --train --photos
# About 1 h 50 min of training (32 epochs of ~3.5 min) and 15 of calibration on 2 cores; `--resume`
# continues an interrupted run from its last epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEED=${SEED:-0}
"$BIN/simserve" train --recipe copydetect --seed "$SEED" --out runs/copydetect "$@"
"$BIN/simserve" export runs/copydetect/model.pt -o simserve/bundles/default
cp runs/copydetect/log.jsonl simserve/bundles/default/training-log.jsonl  # per-epoch losses, for the record
"$BIN/simserve" calibrate simserve/bundles/default  # search score = P(copy), fitted on training scenes' copies
"$BIN/python" -m training.robustness runs/copydetect  # the model card's "where it fails" table
"$BIN/python" -m training.model_card runs/copydetect simserve/bundles/default/MODEL_CARD.md
"$BIN/simserve" info

#!/usr/bin/env bash
# Rebuilds the shipped default model from scratch: train (seeded), export, model card.
# Needs the dev install and the training data: ./scripts/install-data.sh --train
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEED=${SEED:-0}
"$BIN/simserve" train --recipe default --seed "$SEED" --out runs/default "$@"
"$BIN/simserve" export runs/default/model.pt -o simserve/bundles/default
cp runs/default/log.jsonl simserve/bundles/default/training-log.jsonl  # per-epoch losses, for the record
"$BIN/python" -m training.robustness runs/default  # the model card's "where it fails" table
"$BIN/python" -m training.model_card runs/default simserve/bundles/default/MODEL_CARD.md
"$BIN/simserve" info

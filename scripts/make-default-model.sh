#!/usr/bin/env bash
# Rebuilds the shipped default model from scratch: train (seeded), export, model card.
# Needs the dev install and the training data: ./scripts/install-data.sh --train
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEED=${SEED:-0}
"$BIN/simserve" train --recipe default --seed "$SEED" --out runs/default "$@"
"$BIN/simserve" export runs/default/model.pt -o simserve/models/default
"$BIN/python" -m training.model_card runs/default simserve/models/default/MODEL_CARD.md
"$BIN/simserve" info

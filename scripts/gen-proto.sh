#!/usr/bin/env bash
# Regenerates the Python stubs from proto/ (the source of truth).
# tests/test_proto.py fails when the committed stubs drift from this output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-.}
"$PY" -m grpc_tools.protoc -Iproto --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" proto/simserve/v1/simserve.proto

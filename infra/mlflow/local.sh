#!/usr/bin/env bash
# Local MLflow tracking server for the demo and laptop runs: sqlite store and artifacts under runs/,
# bound to 127.0.0.1 only (no auth needed when nothing outside this machine can connect).
# Run from the repository root:   bash infra/mlflow/local.sh [extra mlflow server flags]
# Then:                           export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# `make mlflow-ui` runs `mlflow ui` on the same store; the demo itself can also log
# straight to sqlite:///runs/mlflow.db without any server.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS_DIR="${MLFLOW_RUNS_DIR:-runs}"  # tests point this at a temporary folder
mkdir -p "$RUNS_DIR/mlartifacts"
MLFLOW="${MLFLOW:-.venv/bin/mlflow}"
exec "$MLFLOW" server \
    --host 127.0.0.1 \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-1}" \
    --backend-store-uri "sqlite:///$RUNS_DIR/mlflow.db" \
    --default-artifact-root "$RUNS_DIR/mlartifacts" \
    "$@"

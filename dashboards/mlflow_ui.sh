#!/usr/bin/env bash
# Start the MLflow UI on a study's tracking store, bound to 127.0.0.1, and print its URL.
#   dashboards/mlflow_ui.sh [STUDY_DIR] [--port N] [--host H]     (= omgseg ui ...)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
exec "$python" -m omgseg.dashboards.ui "$@"

#!/usr/bin/env bash
# The GPU check, as run on the lent GPU machine (bench/gpu_check.py says what it does):
#   bash bench/gpu_check.sh [gpu_check.py flags]      # report under $OUT (default ./gpu_check_out)
# Installs the carried wheels (gpu_wheels/, from bench/gpu_wheels.sh) into the image's own
# Python without touching what the image has (--no-deps, no index), then runs the check.
# The dry run here: PYTHON=/path/to/py3.12-venv/bin/python JAX_PLATFORMS=cpu \
#   bash bench/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ -d gpu_wheels ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps gpu_wheels/*.whl
fi
exec "$PYTHON" bench/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"

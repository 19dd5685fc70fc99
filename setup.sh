#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with the pinned packages.
# Safe to re-run: an up-to-date environment takes seconds.
set -euo pipefail
cd "$(dirname "$0")"
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "setup.sh: Python 3.11 is required (found $(python3 --version))" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

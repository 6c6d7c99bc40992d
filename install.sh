#!/usr/bin/env bash
# One-command set-up on a fresh clone: a virtual environment in .venv with the pinned CPU stack.
# Usage: bash install.sh            (GPU users: then .venv/bin/pip install "jax[cuda12]==0.10.2")
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv .venv
.venv/bin/pip install --quiet -r requirements.txt
.venv/bin/pip install --quiet --no-deps --no-build-isolation -e .
echo "Installed into .venv ($(du -sh .venv | cut -f1)). Run the tests with: .venv/bin/python -m pytest"

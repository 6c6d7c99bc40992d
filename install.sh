#!/usr/bin/env bash
# One-command set-up on a fresh clone: a virtual environment in .venv with the pinned CPU stack,
# and the ahead-of-time compilation extras in .venv-aot/.
# Usage: bash install.sh            (GPU users: then .venv/bin/pip install "jax[cuda12]==0.10.2")
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
# The web-page test drives Debian's chromium; install it where we may (root with apt), else the
# test tells how to get it.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing chromium (apt) for the browser test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will say how" >&2
fi
"$PYTHON" -m venv .venv
.venv/bin/pip install --quiet -r requirements.txt
.venv/bin/pip install --quiet --no-deps --no-build-isolation -e .
# The pinned set must satisfy pyproject.toml's declared dependencies (what `pip install .` needs).
.venv/bin/pip check
echo "Installed into .venv ($(du -sh .venv | cut -f1))."
# The ahead-of-time compilation extras (libtpu, the CUDA compiler plugin) go into .venv-aot/, which
# only `python -m tvr_jax.aot` and its tests load, so nothing else pays libtpu's device probing.
bash tools/install_aot.sh
echo "Run the tests with: .venv/bin/python -m pytest -n 2"

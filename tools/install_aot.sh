#!/usr/bin/env bash
# Installs the ahead-of-time compilation extras (requirements-aot.txt) into .venv-aot/, a plain
# package folder beside .venv that only `python -m tvr_jax.aot` puts on its path (it re-executes
# itself with it), so the normal install and test run never load libtpu or the CUDA plugin.
# Usage: bash tools/install_aot.sh            (needs .venv from install.sh; ~900 MB, ~1 min)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
TARGET="${AOT_TARGET_DIR:-.venv-aot}"
rm -rf "$TARGET.tmp"
"$PIP" install --quiet --no-deps --target "$TARGET.tmp" -r requirements-aot.txt
rm -rf "$TARGET"
mv "$TARGET.tmp" "$TARGET"
echo "Installed the AOT extras into $TARGET ($(du -sh "$TARGET" | cut -f1))."

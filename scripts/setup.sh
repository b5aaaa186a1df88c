#!/usr/bin/env bash
# Set up the project's Python environment on a bare CPU machine (idempotent).
#
# The venv lives outside the checkout, keyed by the hash of what it installs,
# so a fresh clone (CI) reuses a complete one; ./.venv links to it.
#   MARCONI_VENV=/path   use that venv instead
#   MARCONI_EXTRAS=...   more requirement files to install (space separated)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# cpu-cache: SGLang's cache classes; cpu-server: enough of SGLang to serve a
# hybrid model on this CPU (the live-serving tests and the replay need it).
reqs=(requirements/cpu-cache.txt requirements/cpu-server.txt ${MARCONI_EXTRAS:-})
hash=$(cat "${reqs[@]}" scripts/setup.sh | sha256sum | cut -c1-12)
VENV=${MARCONI_VENV:-$HOME/.cache/sglang-marconi/venv-$hash}
if [ ! -f "$VENV/.complete" ]; then
  echo "setup: creating $VENV (torch 2.14.1 from the local wheel files, sglang 0.5.23 without its CUDA deps)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check $(printf -- '-r %s ' "${reqs[@]}")
  # sglang's own requirement list pulls CUDA-only packages; the list above is
  # what its cache classes and this project import on a CPU.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps sglang==0.5.23
  touch "$VENV/.complete"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
ln -sfn "$VENV" .venv
echo "setup: ready (.venv -> $VENV)"

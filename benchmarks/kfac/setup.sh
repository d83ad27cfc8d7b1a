#!/usr/bin/env bash
# Creates an isolated environment for kfac-jax (0.0.8 breaks on jax 0.10, riemod's jax).
# Usage: benchmarks/kfac/setup.sh [VENV_DIR]   (default /tmp/kfac-venv)
# The pins below are the newest versions found to install and run together on Python 3.11.
set -euo pipefail
VENV="${1:-/tmp/kfac-venv}"
PY="${PYTHON:-python3}"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q \
  'jax>=0.4.30,<0.10' 'jaxlib>=0.4.30,<0.10' 'kfac-jax==0.0.8' 'optax' 'scikit-learn' 'numpy'
"$VENV/bin/python" -c "import jax, kfac_jax; print('jax', jax.__version__, 'kfac_jax', kfac_jax.__version__)"

#!/usr/bin/env bash
# Creates an isolated environment for kfac-jax (0.0.8 breaks on jax 0.10, riemod's jax).
# Usage: benchmarks/kfac/setup.sh [VENV_DIR]   (default /tmp/kfac-venv)
# Pins: jax 0.7.2 is the newest jax on which kfac-jax 0.0.8 runs here: on jax 0.9.2 it installs but
# its graph matcher fails at the first step (tag_graph_matcher.eval_jaxpr_eqn:
# "ValueError: too many values to unpack (expected 2)" from Primitive.get_bind_params), and on
# jax 0.10 it fails likewise (PRIOR_ART.md).
set -euo pipefail
VENV="${1:-/tmp/kfac-venv}"
PY="${PYTHON:-python3}"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q \
  'jax==0.7.2' 'jaxlib==0.7.2' 'kfac-jax==0.0.8' 'optax' 'scikit-learn' 'numpy'
"$VENV/bin/python" -c "import jax, kfac_jax; print('jax', jax.__version__, 'kfac_jax', kfac_jax.__version__)"

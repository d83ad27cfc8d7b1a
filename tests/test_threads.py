"""riemod limits BLAS threads at import, leaves user settings alone, and opts out on request.

The import-time behaviour needs fresh processes: a BLAS library fixes its pool when it loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "RIEMOD_BLAS_THREADS")

# Prints the BLAS pools of the process (and the variables) as JSON; with FIRST=1 numpy and scipy's
# LAPACK are loaded before riemod, so their pools exist before riemod can set any variable.
PROBE = """
import json, os, sys
if os.environ.get("FIRST"):
  import numpy, scipy.linalg
before = None
if os.environ.get("FIRST"):
  import threadpoolctl
  before = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"}
try:
  import riemod
except ValueError as error:
  print(json.dumps({"error": str(error)})); sys.exit(0)
import jax, jax.numpy as jnp
jnp.linalg.cholesky(jnp.eye(3)).block_until_ready()   # jaxlib's LAPACK is loaded by now
import threadpoolctl
def pools():
  return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
          if i["user_api"] == "blas"}
def env():
  return {k: os.environ.get(k) for k in %r}
result = {"pools": pools(), "before": before, "env": env()}
if os.environ.get("SET_THEN_RESTORE"):
  result["returned"] = riemod.set_blas_threads(3)
  result["set"], result["set_env"] = pools(), env()
  riemod.set_blas_threads(None)
  result["restored"], result["restored_env"] = pools(), env()
print(json.dumps(result))
""" % (VARIABLES[:3],)


def _probe(**env_overrides) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
  env.update(env_overrides)
  env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=300, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def _scipy_pool(pools: dict) -> int:
  """Threads of the library jaxlib's LAPACK lives in (scipy's bundled OpenBLAS here)."""
  scipy_libs = [n for path, n in pools.items() if "scipy.libs" in path or "scipy" in Path(path).name]
  assert scipy_libs, f"no scipy BLAS loaded: {pools}"
  return scipy_libs[0]


def test_import_limits_every_blas_pool_to_one_thread():
  result = _probe()
  assert result["pools"] and set(result["pools"].values()) == {1}, result
  assert result["env"]["OPENBLAS_NUM_THREADS"] == "1"
  # An empty variable is no setting (OpenBLAS then takes its default pool): riemod still limits.
  empty = _probe(OPENBLAS_NUM_THREADS="")
  assert set(empty["pools"].values()) == {1}, empty


def test_limit_applies_to_pools_loaded_before_riemod():
  result = _probe(FIRST="1")
  assert set(result["pools"].values()) == {1}, result
  # The pools existed with their default size before riemod; on one core there is nothing to see.
  if (os.cpu_count() or 1) > 1:
    assert max(result["before"].values()) > 1, result


def test_keep_opts_out_and_user_variables_win():
  kept = _probe(RIEMOD_BLAS_THREADS="keep")
  assert all(v is None for v in kept["env"].values()), kept
  if (os.cpu_count() or 1) > 1:
    assert _scipy_pool(kept["pools"]) > 1, kept
  user = _probe(OPENBLAS_NUM_THREADS="2")
  assert user["env"]["OPENBLAS_NUM_THREADS"] == "2"
  assert _scipy_pool(user["pools"]) == 2, user
  forced = _probe(RIEMOD_BLAS_THREADS="2", OPENBLAS_NUM_THREADS="1")
  assert set(forced["pools"].values()) == {2}, forced


def test_bad_setting_names_the_variable():
  result = _probe(RIEMOD_BLAS_THREADS="many")
  assert "RIEMOD_BLAS_THREADS" in result["error"] and "keep" in result["error"]


def test_set_blas_threads_and_restore():
  kept = _probe(RIEMOD_BLAS_THREADS="keep")
  result = _probe(SET_THEN_RESTORE="1")
  assert result["returned"] == result["set"] and set(result["set"].values()) == {3}, result
  assert set(result["set_env"].values()) == {"3"}
  # None restores what riemod found before its import-time limit: default pools, no variables.
  assert result["restored"] == kept["pools"], (result, kept)
  assert result["restored_env"] == kept["env"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_blas_threads_rejects_bad_counts(bad):
  import riemod

  with pytest.raises(ValueError, match="positive integer"):
    riemod.set_blas_threads(bad)

"""Shared fixtures: float32 and float64 runs, dense references built from ``jax.jacrev``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """Runs a test in float32 and again with ``jax_enable_x64`` in float64."""
  if request.param == "float64":
    with jax.enable_x64(True):
      yield jnp.float64
  else:
    yield jnp.float32


def tolerance(dtype) -> dict:
  """Round-off tolerances: float32 ~1e-6 relative per op, float64 ~1e-15."""
  return dict(rtol=2e-4, atol=2e-5) if dtype == jnp.float32 else dict(rtol=1e-9, atol=1e-11)


def dense_factor_rows(apply, params, x, factor_rows):
  """``K = L_o J`` per parameter leaf from the dense Jacobian ``jax.jacrev``.

  Args:
    apply: ``apply(params, x) -> outputs (B, *out)``.
    factor_rows: the scaled output-metric rows ``(B, k, *out)``.

  Returns:
    list over ``jax.tree.leaves(params)`` of ``(k * B, *leaf shape)`` arrays, rows ``r``-major.
  """
  jac = jax.jacrev(apply)(params, x)  # leaves (B, *out, *leaf)
  rows = []
  for leaf, j in zip(jax.tree.leaves(params), jax.tree.leaves(jac)):
    batch = factor_rows.shape[0]
    jf = j.reshape((batch, -1) + leaf.shape)
    ff = factor_rows.reshape(batch, factor_rows.shape[1], -1)
    k = jnp.einsum("bro,bo...->rb...", ff, jf)
    rows.append(k.reshape((-1,) + leaf.shape))
  return rows


def dense_metric(rows_per_leaf, inv_mass_per_leaf):
  """``G = K^T K + D`` as a dense matrix over the concatenated leaves."""
  k = jnp.concatenate([r.reshape(r.shape[0], -1) for r in rows_per_leaf], axis=1)
  d = jnp.concatenate([jnp.broadcast_to(1.0 / m, r.shape[1:]).reshape(-1)
                       for r, m in zip(rows_per_leaf, inv_mass_per_leaf)])
  return k.T @ k + jnp.diag(d)


def flat(tree):
  return jnp.concatenate([jnp.ravel(l) for l in jax.tree.leaves(tree)])


def assert_close(actual, expected, dtype, scale=None):
  tol = tolerance(dtype)
  actual, expected = np.asarray(actual), np.asarray(expected)
  if scale is None:
    scale = max(np.abs(expected).max(), 1e-30)
  np.testing.assert_allclose(actual / scale, expected / scale, rtol=0, atol=tol["rtol"])

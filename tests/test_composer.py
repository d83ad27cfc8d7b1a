"""Kernels, block factorisations and composed-metric products against dense linear algebra."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import riemod
from riemod.composer import cholesky_with_jitter, factorize_block
from riemod.curvature import DenseFactor, RowsFactor
from riemod.nn.structure import DenseStructure
from conftest import assert_close


def _dense_factor(key, structure, batch=3, rows=2, positions=None, dtype=jnp.float32):
  kx, kc = jax.random.split(key)
  if positions is None:
    positions = 1
  x = jax.random.normal(kx, (batch, positions, structure.fan_in), dtype)
  c = jax.random.normal(kc, (rows, batch, positions, structure.fan_out), dtype)
  return DenseFactor(x, c, structure)


def _flat_rows(factor):
  rows = factor.rows()
  return jnp.concatenate([rows[n].reshape(rows[n].shape[0], -1) for n in factor.leaf_names], 1)


# (2, (6, 5)) takes the position-Hadamard branch, (7, (6, 5)) the materialised one.
@pytest.mark.parametrize("positions, fan", [(1, (4, 3)), (2, (6, 5)), (7, (6, 5))])
def test_gram_hadamard_matches_materialised_rows(positions, fan, dtype):
  """Both position paths (Hadamard over positions, materialised rows) against dense ``K D^-1 K^T``."""
  structure = DenseStructure(fan, True)
  factor = _dense_factor(jax.random.key(0), structure, positions=positions, dtype=dtype)
  inv = {"kernel": jnp.asarray(0.7, dtype), "bias": jnp.asarray(2.0, dtype)}
  k = factor.rows()
  dense = 0.7 * k["kernel"].reshape(factor.num_rows, -1) @ k["kernel"].reshape(
      factor.num_rows, -1).T + 2.0 * k["bias"] @ k["bias"].T
  assert_close(factor.gram(inv), dense, dtype)
  # K v and K^T t against the materialised rows.
  v = {"kernel": jax.random.normal(jax.random.key(1), fan, dtype),
       "bias": jax.random.normal(jax.random.key(2), (fan[1],), dtype)}
  flat_v = jnp.concatenate([v["bias"], v["kernel"].ravel()])
  assert_close(factor.matvec(v), _flat_rows(factor) @ flat_v, dtype)
  t = jax.random.normal(jax.random.key(3), (factor.num_rows,), dtype)
  back = factor.rmatvec(t)
  assert_close(jnp.concatenate([back["bias"], back["kernel"].ravel()]), _flat_rows(factor).T @ t,
               dtype)


def test_conv_layout_round_trip():
  structure = DenseStructure((3, 2, 4, 5), True, ((1, 1), "SAME", (1, 1)))
  kernel = jnp.arange(3 * 2 * 4 * 5, dtype=jnp.float32).reshape(3, 2, 4, 5)
  flat = structure.kernel_to_flat(kernel)
  assert flat.shape == (24, 5)
  np.testing.assert_array_equal(structure.flat_to_kernel(flat), kernel)
  batched = jnp.stack([kernel, 2 * kernel])
  np.testing.assert_array_equal(structure.flat_to_kernel(structure.kernel_to_flat(batched)), batched)


@pytest.mark.parametrize("space", ["sample", "parameter"])
def test_block_solve_batched_equals_one_by_one_and_dense(space, dtype):
  f1 = _dense_factor(jax.random.key(0), DenseStructure((3, 2), True), dtype=dtype)
  f2 = RowsFactor({"w": jax.random.normal(jax.random.key(1), (2, 3, 4), dtype)})
  inv = [{"kernel": jnp.asarray(0.5, dtype), "bias": jnp.asarray(0.25, dtype)},
         {"w": jnp.linspace(0.5, 2.0, 4).astype(dtype)}]
  block = factorize_block([f1, f2], inv, space=space)
  assert block.space == space
  rhs = [{"kernel": jax.random.normal(jax.random.key(2), (2, 3, 2), dtype),
          "bias": jax.random.normal(jax.random.key(3), (2, 2), dtype)},
         {"w": jax.random.normal(jax.random.key(4), (2, 4), dtype)}]
  batched, residual = block.solve(rhs)
  assert float(residual) < (1e-5 if dtype == jnp.float32 else 1e-12)
  k = jnp.concatenate([_flat_rows(f1), f2.rows()["w"]], axis=1)
  d = jnp.concatenate([jnp.full(2, 4.0), jnp.full(6, 2.0), 1.0 / inv[1]["w"]]).astype(dtype)
  g_dense = k.T @ k + jnp.diag(d)
  for i in range(2):
    single, _ = block.solve(jax.tree.map(lambda a, i=i: a[i], rhs))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(jax.tree.map(lambda a, i=i: a[i],
                                                                           batched))):
      assert_close(a, b, dtype)
    flat_rhs = jnp.concatenate([rhs[0]["bias"][i], rhs[0]["kernel"][i].ravel(), rhs[1]["w"][i]])
    expected = jnp.linalg.solve(g_dense, flat_rhs)
    ours = jnp.concatenate([single[0]["bias"], single[0]["kernel"].ravel(), single[1]["w"]])
    assert_close(ours, expected, dtype)
    gv = block.matvec(jax.tree.map(lambda a, i=i: a[i], rhs))
    assert_close(jnp.concatenate([gv[0]["bias"], gv[0]["kernel"].ravel(), gv[1]["w"]]),
                 g_dense @ flat_rhs, dtype)


def test_cholesky_jitter_escalates_only_when_needed():
  spd = jnp.array([[4.0, 1.0], [1.0, 3.0]])
  chol, jitter = cholesky_with_jitter(spd)
  assert float(jitter) == 0.0
  np.testing.assert_allclose(chol @ chol.T, spd, rtol=1e-6)
  # Numerically semi-definite in float32: the plain factorisation fails, jitter rescues it.
  v = jnp.array([1.0, 1e-4, 1.0])
  singular = 1e4 * jnp.outer(v, v)
  chol, jitter = cholesky_with_jitter(singular)
  assert float(jitter) > 0 and bool(jnp.all(jnp.isfinite(chol)))
  assert float(jnp.abs(chol @ chol.T - singular).max()) <= 10 * float(jitter) + 1e-2


def test_block_recovers_from_a_failed_factorisation():
  # G = K^T K + D with K^T K = 1e4 v v^T and a negligible mass is numerically semi-definite in
  # float32: the plain factor fails, and every product falls back to a jittered factor.
  v = jnp.array([1.0, 1e-4, 1.0])
  factor = RowsFactor({"w": 100.0 * v[None, None, :]})          # one row: R = B = 1
  block = factorize_block([factor], [{"w": jnp.asarray(1e12)}], space="parameter")
  assert not bool(block.factored)
  jitter = float(block.jitter)
  assert jitter > 0
  b = jnp.array([1.0, -2.0, 0.5])
  x, residual = block.solve([{"w": b}])
  assert bool(jnp.all(jnp.isfinite(x[0]["w"])))
  # x solves the jittered system: (K^T K + D + jitter I) x = b, to float32 accuracy.
  g = np.asarray(1e4 * jnp.outer(v, v), np.float64) + (1e-12 + jitter) * np.eye(3)
  achieved = g @ np.asarray(x[0]["w"], np.float64)
  assert np.linalg.norm(achieved - np.asarray(b)) <= 1e-2 * np.linalg.norm(np.asarray(b))
  # The optimizer's step reports a finite condition estimate from the jittered factor too.
  step = block.step([{"w": b}], None, None, None)
  assert np.isfinite(float(residual)) and np.isfinite(float(step.condition))
  # A healthy block takes the plain factor and reports no jitter.
  healthy = factorize_block([factor], [{"w": jnp.asarray(1.0)}], space="parameter")
  assert bool(healthy.factored) and float(healthy.jitter) == 0.0


def test_composed_metric_products_and_mass():
  f = lambda p, x: jnp.tanh(x @ p["a"]["w"]) @ p["b"]["w"]
  params = {"a": {"w": jax.random.normal(jax.random.key(0), (3, 4))},
            "b": {"w": jax.random.normal(jax.random.key(1), (4, 2))}}
  x = jax.random.normal(jax.random.key(2), (5, 3))
  _, _, curv = riemod.value_grad_and_curvature(f, x, lambda y: 0.5 * jnp.mean(y**2),
                                               riemod.metrics.identity(), params=params)
  geometry = riemod.Geometry(mass=0.3, structure="full")
  metric = geometry.compose(curv, geometry.init(params))
  v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)
  back = metric.solve(metric.matvec(v))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(v)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  for a, b in zip(jax.tree.leaves(metric.mass_times(v)), jax.tree.leaves(v)):
    np.testing.assert_allclose(a, 0.3 * b, rtol=1e-6)
  assert metric.block_names() == ["a+b"]
  with pytest.raises(ValueError, match="structure"):
    riemod.Geometry(structure="diagonal")
  with pytest.raises(ValueError, match="mass"):
    riemod.Geometry(mass=-1.0)
  with pytest.raises(TypeError, match="Curvature"):
    geometry.compose({"not": "curvature"}, geometry.init(params))


def _ill_conditioned_block(d, n, smax, smin, mass, dtype, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(d, d)))
  v, _ = np.linalg.qr(rng.normal(size=(n, d)))
  k = (u * np.logspace(np.log10(smax), np.log10(smin), d)) @ v.T
  g = rng.normal(size=n)
  reference = np.linalg.solve(k.T @ k + mass * np.eye(n), g)  # float64
  factor = RowsFactor({"w": jnp.asarray(k[None], dtype)})
  return factor, g, reference


@pytest.mark.parametrize("space, shape, singular, mass", [
    ("sample", (20, 30), (1e2, 1e-2), 1e-3), ("sample", (40, 60), (1e2, 1e-1), 1e-6),
    ("parameter", (20, 30), (1e2, 1e-2), 1e-3)])
def test_refinement_recovers_digits_lost_to_round_off(space, shape, singular, mass):
  """float32 solves of ill-conditioned ``K^T K + m I`` against a float64 dense solve: one step
  of refinement against the operator is at least 5x closer than the plain Cholesky solve."""
  factor, g, reference = _ill_conditioned_block(*shape, *singular, mass, jnp.float32)

  def error(steps):
    block = factorize_block([factor], [{"w": jnp.asarray(1.0 / mass, jnp.float32)}], space=space,
                            refinement_steps=steps)
    x, _ = block.solve([{"w": jnp.asarray(g, jnp.float32)}])
    return np.linalg.norm(np.asarray(x[0]["w"], np.float64) - reference) / np.linalg.norm(
        reference)

  plain, refined = error(0), error(1)
  assert plain > 1e-3  # the case is ill-conditioned enough for round-off to show
  assert refined <= 0.2 * plain
  with pytest.raises(ValueError, match="refinement_steps"):
    factorize_block([factor], [{"w": jnp.asarray(1.0)}], refinement_steps=-1)

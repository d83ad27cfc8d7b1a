"""Langevin transforms: exact stationary moments, the Riemannian metric mapping and its noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import riemod
from riemod.sampling import (Minibatcher, potential_grad, riemannian_sgld, sample, sgld, sgworld)
from riemod.sampling.diagnostics import langevin_stationary_covariance


def _entry_se(cov, m):
  return np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / m)


def _two_module_problem():
  """A small nonlinear model with two modules, its data and its dense Jacobian."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  params = {"a": {"w": jnp.asarray(rng.normal(size=(3, 2)) * 0.5, jnp.float32)},
            "b": {"w": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}

  def f(p, xs):
    return jnp.tanh(xs @ p["a"]["w"]) @ p["b"]["w"]

  flat, unravel = jax.flatten_util.ravel_pytree(params)
  jac = np.asarray(jax.jacobian(lambda v: f(unravel(v), x))(flat), np.float64)  # (B, n)
  return f, x, params, jac, unravel


@pytest.mark.parametrize("structure", ["layerwise", "full"])
def test_riemannian_drift_and_noise_use_the_metric_of_the_potential(structure):
  import jax.flatten_util  # noqa: F401
  f, x, params, jac, unravel = _two_module_problem()
  n_data, prior, h, temperature = 200, 2.0, 0.3, 1.5
  loss = lambda y: 0.5 * jnp.mean((y - 1.0) ** 2)
  _, grads, curv = riemod.value_grad_and_curvature(f, x, loss, riemod.metrics.identity(),
                                                   params=params)
  # Dense metric of U = N * mean loss + prior: N J^T J / B + P (block diagonal if layerwise).
  ggn = n_data * jac.T @ jac / x.shape[0]
  if structure == "layerwise":
    mask = np.zeros_like(ggn)
    mask[:6, :6] = 1.0
    mask[6:, 6:] = 1.0
    ggn = ggn * mask
  g_u = ggn + prior * np.eye(8)
  g_u_inv = np.linalg.inv(g_u)

  grad_u = potential_grad(grads, params, data_size=n_data, prior_precision=prior)
  flat_grad = np.asarray(jax.flatten_util.ravel_pytree(grad_u)[0], np.float64)
  geometry = riemod.Geometry(mass=prior / n_data, structure=structure)
  drift_tx = riemannian_sgld(h, 0.0, data_size=n_data, prior_precision=prior, geometry=geometry)
  drift, _ = drift_tx.update(grad_u, drift_tx.init(params), params, curvature=curv)
  # Relative to the drift's largest entry (float32 round-off is ~eps cond |x| on every entry,
  # so a per-entry rtol on the smallest ones would test luck, not the solve).
  expected = -h * g_u_inv @ flat_grad
  np.testing.assert_allclose(np.asarray(jax.flatten_util.ravel_pytree(drift)[0]) /
                             np.abs(expected).max(), expected / np.abs(expected).max(), atol=2e-5)

  tx = riemannian_sgld(h, temperature, data_size=n_data, prior_precision=prior,
                       geometry=geometry, key=5)
  zero = jax.tree.map(jnp.zeros_like, params)
  m = 10000

  def draw(count):
    state = tx.init(params)._replace(count=count)
    return jax.flatten_util.ravel_pytree(tx.update(zero, state, params, curvature=curv)[0])[0]

  noise = np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(m)), np.float64)
  expected = 2 * h * temperature * g_u_inv
  estimate = noise.T @ noise / m
  assert np.all(np.abs(estimate - expected) < 5 * _entry_se(expected, m))
  # The error bars are tight enough to reject the batch-mean metric (no factor N).
  assert np.abs(estimate - expected * n_data).max() > 100 * _entry_se(expected, m).max()


def _gaussian_chain_moments(tx, hess, b, h, chains=1000, burn=100, keep=4, spacing=30):
  """Runs many independent full-batch chains on U = theta^T H theta / 2 - b^T theta."""
  hess_j, b_j = jnp.asarray(hess, jnp.float32), jnp.asarray(b, jnp.float32)
  grad_fn = lambda p, idx, key: (hess_j @ p - b_j, {})
  res = sample(tx, jnp.zeros(len(b), jnp.float32), grad_fn, Minibatcher(1, 1), key=1,
               num_samples=keep, burn_in=burn, thin=spacing, num_chains=chains, progress=False)
  return np.asarray(res.samples, np.float64)  # (chains, keep, d)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_full_batch_langevin_has_the_exact_discrete_stationary_law(temperature):
  hess = np.array([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]])
  b = np.array([1.0, -0.5, 0.2])
  h = 0.4  # h * lambda_max ~ 0.9: the discretisation bias is large and must be reproduced
  samples = _gaussian_chain_moments(sgld(h, temperature, key=3), hess, b, h)
  exact = langevin_stationary_covariance(hess, h, temperature)
  mean = np.linalg.solve(hess, b)
  # Samples kept 30 steps apart (relaxation time <= 1 / (h lambda_min) = 5.3 steps): independent.
  flat = samples.reshape(-1, 3)
  m = len(flat)
  est_cov = np.cov(flat, rowvar=False)
  assert np.all(np.abs(est_cov - exact) < 5 * _entry_se(exact, m))
  assert np.all(np.abs(flat.mean(0) - mean) < 5 * np.sqrt(np.diag(exact) / m))
  continuous = temperature * np.linalg.inv(hess)
  assert np.any(np.abs(est_cov - continuous) > 10 * _entry_se(exact, m))


def test_riemannian_chain_with_exact_metric_matches_its_lyapunov_covariance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(20, 3)) @ np.diag([3.0, 1.0, 0.2])
  y = rng.normal(size=20)
  prior, h = 1.0, 0.5
  f = lambda p, batch: batch[0] @ p["w"] - batch[1]
  data = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  params = {"w": jnp.zeros(3, jnp.float32)}
  loss = lambda r: 0.5 * jnp.mean(r ** 2)
  _, _, curv = riemod.value_grad_and_curvature(f, data, loss, riemod.metrics.identity(),
                                               params=params)

  def grad_fn(p, idx, key):
    g = jax.grad(lambda q: loss(f(q, data)))(p)
    return potential_grad(g, p, data_size=20, prior_precision=prior), {"curvature": curv}

  tx = riemannian_sgld(h, 1.0, data_size=20, prior_precision=prior, key=2,
                       geometry=riemod.Geometry(mass=prior / 20, structure="full"))
  # (1 - h)^k: 15 steps of burn-in forget the start, 8 steps between kept samples decorrelate.
  res = sample(tx, params, grad_fn, Minibatcher(20, 20), key=0, num_samples=4, burn_in=15,
               thin=8, num_chains=1000, collect=lambda p: p["w"], progress=False)
  flat = np.asarray(res.samples, np.float64).reshape(-1, 3)
  hess = x.T @ x + prior * np.eye(3)  # exact posterior precision = G_U
  # theta' = (1 - h) theta + ..., noise 2 h G_U^{-1}: S = H^{-1} / (1 - h / 2).
  exact = langevin_stationary_covariance(hess, h, 1.0, preconditioner=np.linalg.inv(hess))
  np.testing.assert_allclose(exact, np.linalg.inv(hess) / (1 - h / 2), rtol=1e-8)
  m = len(flat)
  assert np.all(np.abs(np.cov(flat, rowvar=False) - exact) < 5 * _entry_se(exact, m))
  assert np.all(np.abs(flat.mean(0) - np.linalg.solve(hess, x.T @ y)) <
                5 * np.sqrt(np.diag(exact) / m))


def test_transforms_work_in_jit_scan_and_chain_and_ignore_extra_kwargs():
  params = {"w": jnp.ones(4)}
  tx = optax.chain(optax.clip_by_global_norm(1e6), sgworld(1e-2, key=0))
  state = tx.init(params)

  @jax.jit
  def run(params, state):
    def body(c, _):
      p, s = c
      u, s = tx.update(p, s, p, value=1.0, unknown_extra=3)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, state), None, length=5)[0]

  p1, s1 = run(params, state)
  p2, _ = run(params, state)
  np.testing.assert_array_equal(p1["w"], p2["w"])  # reproducible: the key is in the state
  assert int(s1[1].count) == 5
  # Different step counters give different noise.
  tx2 = sgld(1e-2, key=0)
  u_a, st = tx2.update({"w": jnp.zeros(4)}, tx2.init(params))
  u_b, _ = tx2.update({"w": jnp.zeros(4)}, st)
  assert not np.allclose(u_a["w"], u_b["w"])


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="temperature"):
    sgld(1e-3, temperature=-1.0)
  with pytest.raises(ValueError, match="step_size"):
    sgworld(-1e-3)
  with pytest.raises(ValueError, match="step_size"):
    sgld(0.0)
  with pytest.raises(ValueError, match="data_size"):
    riemannian_sgld(1e-2)
  with pytest.raises(ValueError, match="data_size"):
    potential_grad({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, data_size=None)
  with pytest.raises(ValueError, match="prior_precision"):
    riemannian_sgld(1e-2, data_size=10, prior_precision=0.0)
  tx = riemannian_sgld(1e-2, data_size=10)
  with pytest.raises(ValueError, match="curvature"):
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
  with pytest.raises(ValueError, match="larger than the data set"):
    sample(sgld(1e-2), {"w": jnp.ones(2)}, lambda p, i, k: (p, {}), Minibatcher(5, 10), key=0,
           num_samples=2, progress=False)
  with pytest.raises(FloatingPointError, match="step size"):
    sample(sgld(5.0), {"w": jnp.ones(2)}, lambda p, i, k: (p, {}), Minibatcher(1, 1), key=0,
           num_samples=500, progress=False)

"""Lipschitz estimates against dense Jacobians; composed bounds; the cascade/feedback rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx
from jax.flatten_util import ravel_pytree

import riemod
from riemod.certify import (cascade_weights, certify, composed_rate, network_lipschitz,
                            param_lipschitz, state_lipschitz)


def _dense_state_norm(f, x):
  jac = jax.vmap(jax.jacrev(lambda v: f(v[None])[0]))(x)
  return max(np.linalg.norm(np.asarray(j).reshape(j.shape[0], -1), 2) for j in jac)


def test_state_and_param_lipschitz_match_dense_jacobians():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(4, 3)))
  b = jnp.asarray(rng.normal(size=(3,)))
  f = lambda p, v: jnp.tanh(v @ p["w"] + p["b"])
  params = {"w": w, "b": b}
  x = jnp.asarray(rng.normal(size=(7, 4)))
  got = float(state_lipschitz(lambda v: f(params, v), x, num_iterations=200))
  assert got == pytest.approx(_dense_state_norm(lambda v: f(params, v), x), rel=1e-4)
  flat, unravel = ravel_pytree(params)
  dense = max(np.linalg.norm(np.asarray(jax.jacrev(lambda q: f(unravel(q), xs[None])[0])(flat)),
                             2) for xs in x)
  assert float(param_lipschitz(f, params, x, num_iterations=200)) == pytest.approx(dense, rel=1e-4)


def _network(seed, kind):
  r = lambda i: nnx.Rngs(100 * seed + i)
  d = riemod.nn.Dense
  if kind == "chain":
    return riemod.nn.Sequential(d(3, 6, rngs=r(0)), jnp.tanh, d(6, 5, rngs=r(1)), jnp.tanh,
                                d(5, 2, rngs=r(2)))
  combine = "sum" if kind == "sum" else "concat"
  width = 4 if kind == "sum" else 2
  return riemod.nn.Sequential(
      d(3, 4, rngs=r(0)), jnp.tanh,
      riemod.nn.Parallel(d(4, width, rngs=r(1)),
                         riemod.nn.Sequential(d(4, 5, rngs=r(2)), jnp.sin, d(5, width, rngs=r(3))),
                         combine=combine),
      jnp.tanh, d(4, 2, rngs=r(4)))


@pytest.mark.parametrize("seed,kind", [
    (0, "chain"), (1, "sum"), (2, "concat"),
    pytest.param(3, "chain", marks=pytest.mark.slow), pytest.param(4, "sum", marks=pytest.mark.slow),
    pytest.param(5, "concat", marks=pytest.mark.slow)])
def test_composed_bound_never_below_measured(seed, kind):
  model = _network(seed, kind)
  x = 2.0 * jax.random.normal(jax.random.key(seed), (6, 3))
  names = []

  def measure(v):
    summary = network_lipschitz(model, v, num_iterations=300)
    names.extend(m.name for m in summary.modules)  # static, recorded while tracing
    return summary._replace(modules=())

  s = jax.jit(measure)(x)
  # The measured constants are the true ones (dense Jacobians) ...
  assert float(s.measured_state) == pytest.approx(_dense_state_norm(model, x), rel=1e-4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat, unravel = ravel_pytree(params)
  dense_param = max(np.linalg.norm(np.asarray(jax.jacrev(
      lambda q: nnx.merge(graphdef, unravel(q), rest)(xs[None])[0])(flat)), 2) for xs in x)
  assert float(s.measured_param) == pytest.approx(dense_param, rel=1e-4)
  # ... and the composed bounds are never below them.
  assert float(s.composed_state) >= float(s.measured_state) * (1 - 1e-6)
  assert float(s.composed_param) >= float(s.measured_param) * (1 - 1e-6)
  assert "layers/0" in names and len(names) == len(set(names))


def _scaled_orthogonal(n, rate, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return rate * q


def test_cascade_of_two_contracting_maps_has_the_predicted_rate():
  rho1, rho2 = 0.5, 0.8
  f1, f2 = _scaled_orthogonal(3, rho1, 0), _scaled_orthogonal(4, rho2, 1)
  coupling = 5.0 * np.random.default_rng(2).normal(size=(4, 3))  # large but bounded
  full = np.block([[f1, np.zeros((3, 4))], [coupling, f2]])
  n = [[rho1, 0.0], [np.linalg.norm(coupling, 2), rho2]]
  predicted = composed_rate(n)
  assert predicted == pytest.approx(max(rho1, rho2), rel=1e-12)
  # The composite's asymptotic rate is the predicted one ...
  assert np.max(np.abs(np.linalg.eigvals(full))) == pytest.approx(predicted, rel=1e-9)
  # ... and in the weighted block norm the composite contracts at the certified rate.
  d, rate = cascade_weights(n, slack=1e-6)
  assert rate == pytest.approx(predicted, rel=1e-3)
  x = np.random.default_rng(3).normal(size=7)
  norm = lambda v: max(np.linalg.norm(v[:3]) / d[0], np.linalg.norm(v[3:]) / d[1])
  for _ in range(60):
    y = full @ x
    assert norm(y) <= rate * norm(x) * (1 + 1e-9)
    x = y


def test_feedback_rule_bounds_the_coupled_rate():
  rng = np.random.default_rng(4)
  for _ in range(20):
    f1, f2 = _scaled_orthogonal(3, 0.4, rng.integers(1000)), _scaled_orthogonal(2, 0.6, 7)
    c12, c21 = 0.2 * rng.normal(size=(3, 2)), 0.2 * rng.normal(size=(2, 3))
    full = np.block([[f1, c12], [c21, f2]])
    n = np.array([[0.4, np.linalg.norm(c12, 2)], [np.linalg.norm(c21, 2), 0.6]])
    rate = composed_rate(n)
    assert np.max(np.abs(np.linalg.eigvals(full))) <= rate + 1e-12
    d, certified = cascade_weights(n)
    assert certified == pytest.approx(rate, rel=1e-6)
    x = rng.normal(size=5)
    norm = lambda v: max(np.linalg.norm(v[:3]) / d[0], np.linalg.norm(v[3:]) / d[1])
    assert norm(full @ x) <= certified * norm(x) * (1 + 1e-9)


def test_certify_blocks_match_dense_and_compose_above_whole_network():
  with jax.enable_x64(True):
    model = riemod.nn.Sequential(riemod.nn.Dense(2, 3, rngs=nnx.Rngs(0)), jnp.tanh,
                                 riemod.nn.Dense(3, 2, rngs=nnx.Rngs(1)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    model = nnx.merge(graphdef, params, rest)
    x = jax.random.normal(jax.random.key(0), (6, 2), jnp.float64)
    t = jax.random.normal(jax.random.key(1), (6, 2), jnp.float64)
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
    mass, lr = 0.5, 0.3
    report = certify(model, x, loss_fn, riemod.metrics.identity(), learning_rate=lr,
                     geometry=riemod.Geometry(mass=mass), num_lanczos=9, num_power_iterations=300)
    # Dense references: H by jax.hessian, G = J^T J / B + mass per layer block.
    flat, unravel = ravel_pytree(params)
    apply = lambda f: nnx.merge(graphdef, unravel(f), rest)(x)
    h = np.asarray(jax.hessian(lambda f: loss_fn(apply(f)))(flat))
    jac = np.asarray(jax.jacrev(lambda f: apply(f).ravel())(flat)) / np.sqrt(x.shape[0])
    sizes = [l.size for l in jax.tree.leaves(params)]
    edges = np.cumsum([0] + sizes)
    blocks = [np.arange(edges[0], edges[2]), np.arange(edges[2], edges[4])]  # (bias, kernel) x2
    g = np.zeros_like(h)
    for idx in blocks:
      g[np.ix_(idx, idx)] = jac[:, idx].T @ jac[:, idx] + mass * np.eye(len(idx))
    whole = scipy.linalg.eigh(h, g, eigvals_only=True)
    np.testing.assert_allclose(report.network["lam_max"], whole[-1], rtol=1e-4)
    np.testing.assert_allclose(report.network["lam_min"], whole[0], rtol=1e-4)
    rows = {m["name"]: m for m in report.modules}
    for name, idx in zip(("layers/0", "layers/2"), blocks):
      sub = scipy.linalg.eigh(h[np.ix_(idx, idx)], g[np.ix_(idx, idx)], eigvals_only=True)
      # 8 Lanczos steps on the 9-parameter block: extremes to 1e-4.
      np.testing.assert_allclose(rows[name]["lam_max"], sub[-1], rtol=1e-4)
    # Composed rate >= the whole-network factor (the rule is conservative).
    exact = np.max(np.abs(1 - lr * whole))
    assert report.composition["composed_rate"] >= exact * (1 - 1e-6)
    coupling = np.linalg.norm(
        scipy.linalg.sqrtm(np.linalg.inv(g[np.ix_(blocks[0], blocks[0])]))
        @ h[np.ix_(blocks[0], blocks[1])]
        @ scipy.linalg.sqrtm(np.linalg.inv(g[np.ix_(blocks[1], blocks[1])])), 2)
    np.testing.assert_allclose(report.composition["block_matrix"][0][1], lr * coupling, rtol=1e-4)

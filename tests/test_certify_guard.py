"""The guard: Levenberg-Marquardt mass adaptation and step rejection on a known quadratic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import riemod
from riemod.certify import GuardState, guarded


def _problem(weight=1.0):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)))
  t = jnp.asarray(rng.normal(size=(8, 2)))
  f = lambda p, v: v @ p["w"]
  scale = jnp.asarray([weight, 1.0])  # weight != 1: the loss Hessian exceeds the metric
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum(scale * (y - t) ** 2, -1))
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)))}
  loss_of = lambda p: loss_fn(f(p, x))
  return f, x, loss_fn, params, loss_of


def _guarded(lr, mass):
  """The guard around the layerwise transform, both with the same geometry."""
  geometry = riemod.Geometry(mass=mass)
  return guarded(riemod.layerwise_natural_gradient(lr, geometry=geometry), geometry)


def _mass_scale(state):
  """The mass scale the guard adapts: it lives in the inner transform's geometry state."""
  return float(riemod.find_state(state, riemod.MetricState).geometry.mass_scale)


def _step(tx, f, x, loss_fn, loss_of):
  @jax.jit
  def step(p, state):
    loss, grads, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                        params=p)
    u, state = tx.update(grads, state, p, curvature=curv, value=loss, value_fn=loss_of)
    return optax.apply_updates(p, u), state, u
  return step


def test_reduction_ratio_matches_the_quadratic_model_and_lm_rule():
  with jax.enable_x64(True):
    f, x, loss_fn, params, loss_of = _problem()
    mass, lr = 0.05, 0.5
    tx = _guarded(lr, mass)
    step = _step(tx, f, x, loss_fn, loss_of)
    state = tx.init(params)
    # Dense check of rho: H = I_2 (x) X^T X / B, G = H + mass * scale (row-major w).
    xs = np.asarray(x)
    h = np.kron(xs.T @ xs / xs.shape[0], np.eye(2))
    for _ in range(4):
      scale = _mass_scale(state)
      g = np.asarray(jax.grad(loss_of)(params)["w"]).ravel()
      gm = h + mass * scale * np.eye(6)
      s = -lr * np.linalg.solve(gm, g)
      predicted = -(g @ s + 0.5 * s @ gm @ s)
      actual = -(g @ s + 0.5 * s @ h @ s)  # exact for a quadratic
      new_params, state, _ = step(params, state)
      rho = actual / predicted
      assert float(state.last_ratio) == pytest.approx(rho, rel=1e-8)
      expected_scale = scale * (2.0 if rho < 0.25 else 0.5 if rho > 0.75 else 1.0)
      assert _mass_scale(state) == pytest.approx(min(max(expected_scale, 1e-4), 1e6))
      np.testing.assert_allclose(np.asarray(new_params["w"]).ravel(),
                                 np.asarray(params["w"]).ravel() + s, rtol=1e-8)
      params = new_params
    assert int(state.rejected_steps) == 0
    assert int(state.adapted_steps) == 4  # rho ~ 0.75 / (1 - lr/2) > 0.75: damping falls each step


def test_failed_certificate_rejects_the_step_and_raises_the_mass():
  f, x, loss_fn, params, loss_of = _problem(weight=6.0)
  mass = 1e-3
  # lam_max(G^{-1} H) ~ 6: lr = 1.5 overshoots until the mass has grown.
  tx = _guarded(1.5, mass)
  step = _step(tx, f, x, loss_fn, loss_of)
  state = tx.init(params)
  new_params, new_state, update = step(params, state)
  assert isinstance(new_state, GuardState)
  assert float(new_state.last_ratio) < 0
  assert int(new_state.rejected_steps) == 1 and int(new_state.adapted_steps) == 1
  assert _mass_scale(new_state) == pytest.approx(2.0)
  np.testing.assert_array_equal(np.asarray(update["w"]), 0.0)
  np.testing.assert_array_equal(np.asarray(new_params["w"]), np.asarray(params["w"]))
  inner = riemod.find_state(new_state, riemod.MetricState)
  assert int(inner.geometry.count) == 0  # the inner state is rolled back
  # More mass shortens the step until it is accepted and the loss falls.
  start = float(loss_of(params))
  p, s = new_params, new_state
  for _ in range(40):
    p, s, _ = step(p, s)
  assert int(s.rejected_steps) >= 1
  assert int(riemod.find_state(s, riemod.MetricState).geometry.count) == (
      40 - int(s.rejected_steps) + 1)
  assert float(loss_of(p)) < start


def _set_momentum(state, value):
  def visit(node):
    if isinstance(node, riemod.MetricState):
      return node._replace(momentum=jax.tree.map(lambda m: jnp.full_like(m, value), node.momentum))
    return node
  return jax.tree.map(visit, state, is_leaf=lambda n: isinstance(n, riemod.MetricState))


def test_a_rejected_step_restarts_spring_momentum():
  """The buffer enters the next direction as G^{-1} mu D phi -> mu phi as the mass grows, so the
  guard's larger mass could not shorten a retried step that carries it: a rejection zeroes it,
  an accepted step keeps its own."""
  f, x, loss_fn, params, loss_of = _problem(weight=6.0)
  for lr, rejected in ((1.5, True), (0.1, False)):
    geometry = riemod.Geometry(mass=1e-3)
    tx = guarded(riemod.layerwise_natural_gradient(lr, geometry=geometry, momentum=0.9), geometry)
    state = _set_momentum(tx.init(params), 0.01)
    _, state, update = _step(tx, f, x, loss_fn, loss_of)(params, state)
    buffer = np.asarray(riemod.find_state(state, riemod.MetricState).momentum["w"])
    assert (int(state.rejected_steps) == 1) == rejected
    if rejected:
      np.testing.assert_array_equal(buffer, 0.0)
      np.testing.assert_array_equal(np.asarray(update["w"]), 0.0)
    else:   # the step's own direction, which the buffer entered
      assert np.all(buffer != 0.0) and np.all(buffer != 0.01)


def test_guard_needs_value_and_value_fn():
  f, x, loss_fn, params, loss_of = _problem()
  tx = _guarded(0.5, 0.1)
  loss, grads, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                      params=params)
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(grads, tx.init(params), params, curvature=curv, value=loss)
  with pytest.raises(ValueError, match="curvature"):
    tx.update(grads, tx.init(params), params, value=loss, value_fn=loss_of)
  # The guard takes the inner transform's geometry, which refuses an invalid mass itself.
  with pytest.raises(ValueError, match="mass"):
    riemod.Geometry(mass=-1.0)
  with pytest.raises(TypeError, match="geometry"):
    guarded(riemod.layerwise_natural_gradient(0.5), 0.1)

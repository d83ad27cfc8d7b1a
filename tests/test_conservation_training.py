"""Drift monitors under optax training and computational inertia (docs/conservation.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scipy.linalg

from conservation_helpers import record_laws, run_heavy_ball
from riemod.conservation import (ChargeMonitorState, DriftMonitorState, HeavyBallState, charge_monitor,
                                 diagonal_mass, drift_monitor, find_state, heavy_ball, operator_mass,
                                 factorization, stationary_velocity_sq)


def _regression(rep, seed=0):
  rng = np.random.default_rng(seed)
  inputs, targets = jnp.asarray(rng.normal(size=(6, 3))), jnp.asarray(rng.normal(size=(6, 3)))
  return lambda p: jnp.mean(jnp.log(jnp.cosh(inputs @ rep.phi(p) - targets)))


def test_gradient_step_drift_matches_second_order_closed_form():
  with jax.enable_x64(True):
    rep = factorization(3, 3, 2)
    loss = _regression(rep)
    params = rep.sample(jax.random.PRNGKey(0), jnp.float64)
    rates = [4e-2, 2e-2, 1e-2]
    grads = jax.grad(loss)(params)
    drifts = [float(jnp.max(jnp.abs(rep.known_laws(jax.tree_util.tree_map(lambda p, g: p - rate * g, params,
                                                                         grads)) - rep.known_laws(params))))
              for rate in rates]
    assert abs(np.polyfit(np.log(rates), np.log(drifts), 1)[0] - 2.0) < 1e-6
    # Quadratic laws: the drift is exactly eta^2 / 2 g^T (Hess h) g, e.g. for (U^T U - V^T V)_00.
    g = jax.grad(loss)(params)
    closed = jnp.sum(g["U"][:, 0] ** 2) - jnp.sum(g["V"][:, 0] ** 2)
    moved = jax.tree_util.tree_map(lambda p, d: p - rates[0] * d, params, g)
    drift = rep.known_laws(moved)[0] - rep.known_laws(params)[0]
    np.testing.assert_allclose(drift, rates[0] ** 2 * closed, rtol=1e-10)


def test_drift_monitor_in_optax_chain():
  rep = factorization(3, 3, 2)
  loss = _regression(rep)
  params = rep.sample(0)
  lr = 0.05
  opt = optax.chain(optax.sgd(lr), drift_monitor(rep.known_laws))
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = step(params, state)
  monitor = find_state(state, DriftMonitorState)
  assert int(monitor.count) == 3
  np.testing.assert_allclose(monitor.current, rep.known_laws(params), rtol=1e-6, atol=1e-6)
  assert 0 < float(monitor.max_step_drift) < 10 * lr ** 2
  with pytest.raises(ValueError, match="params"):
    opt.update(jax.grad(loss)(params), state)


def test_heavy_ball_keeps_decaying_charge_and_breaks_gradient_flow_laws():
  with jax.enable_x64(True):
    rep = factorization(3, 3, 2)
    loss = _regression(rep)
    params = rep.sample(jax.random.PRNGKey(1), jnp.float64)
    beta, lr, steps = 0.9, 0.05, 60
    opt = optax.chain(optax.sgd(lr, momentum=beta), charge_monitor(beta), drift_monitor(rep.known_laws))
    # Start with a non-zero velocity: from rest the charge is exactly zero (W^T grad E is symmetric).
    velocity = rep.sample(jax.random.PRNGKey(5), jnp.float64)
    state = jax.tree_util.tree_map(
        lambda s: s._replace(trace=velocity) if isinstance(s, optax.TraceState) else s, opt.init(params),
        is_leaf=lambda s: isinstance(s, optax.TraceState))

    @jax.jit
    def step(params, state):
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    charges = []
    for _ in range(steps):
      params, state = step(params, state)
      charges.append(float(find_state(state, ChargeMonitorState).charge[0]))
    charges = np.asarray(charges)
    assert abs(charges[0]) > 1e-3
    assert np.abs(charges - charges[0]).max() / abs(charges[0]) < 1e-8
    drift = find_state(state, DriftMonitorState)
    gram_change = np.abs(np.asarray(drift.current - drift.initial)).max()
    # Plain GD over the same number of steps keeps the gram difference far better.
    gd = record_laws(loss, optax.sgd(lr), rep.sample(jax.random.PRNGKey(1), jnp.float64), rep.known_laws,
                     steps)
    gd_change = np.abs(np.asarray(gd[-1] - gd[0])).max()
    assert gram_change > 5 * gd_change


def _quadratic_plus_quartic(w):
  return 0.5 * jnp.sum(jnp.array([1.0, 2.0, 0.5]) * w ** 2) + 0.1 * jnp.sum(w ** 4)


@pytest.mark.parametrize("mass", [None, diagonal_mass(jnp.array([1.0, 2.0, 0.5]))])
def test_frictionless_inertia_is_conserved_without_drift(mass):
  with jax.enable_x64(True):
    start = jnp.array([1.0, -0.5, 2.0])
    deviations = []
    for dt in (0.05, 0.025):
      out = run_heavy_ball(_quadratic_plus_quartic, start, int(40 / dt), time_step=dt, mass=mass)
      inertia = np.asarray(out["inertia"])
      deviations.append(np.abs(inertia - inertia[0]).max())
      # No secular drift: the last quarter deviates no more than the first quarter (bounded oscillation).
      quarter = len(inertia) // 4
      assert np.abs(inertia[-quarter:] - inertia[0]).max() < 1.5 * np.abs(inertia[:quarter] - inertia[0]).max()
    assert deviations[0] < 1e-2
    assert 3.5 < deviations[0] / deviations[1] < 4.5  # O(dt^2)


@pytest.mark.parametrize("mass", [None, operator_mass(matvec=lambda v: 2.0 * v, solve=lambda p: p / 2.0)])
def test_damped_identity_holds(mass):
  with jax.enable_x64(True):
    start = jnp.array([1.0, -0.5, 2.0])
    errors = []
    for dt in (0.05, 0.025):
      out = run_heavy_ball(_quadratic_plus_quartic, start, int(20 / dt), time_step=dt, friction=0.3,
                           mass=mass)
      total = np.asarray(out["inertia"] + out["dissipated"])
      errors.append(np.abs(total - total[0]).max())
      assert float(out["inertia"][-1]) < 0.2 * float(out["inertia"][0])  # friction really acted
    assert errors[0] < 1e-2 and errors[0] / errors[1] > 3.0


def test_noisy_stationary_velocity_matches_temperature_prediction():
  with jax.enable_x64(True):
    masses = jnp.array([1.0, 2.0, 0.5, 1.5])
    mass = diagonal_mass(masses)
    friction, noise, dt = 1.0, 1.2, 0.05
    loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 0.5, 2.0, 1.0]) * w ** 2)
    burn, keep, chains = 400, 2000, 64

    def chain_mean(seed):
      out = run_heavy_ball(loss, jnp.zeros(4), burn + keep, time_step=dt, friction=friction,
                           noise=noise, mass=mass, seed=seed)
      return jnp.mean(out["velocity_sq"][burn:])

    means = np.asarray(jax.vmap(chain_mean)(jnp.arange(chains)))
    prediction = stationary_velocity_sq(noise, friction, float(jnp.sum(1.0 / masses)))
    standard_error = means.std(ddof=1) / np.sqrt(chains)
    assert abs(means.mean() - prediction) < 4 * standard_error + 0.01 * prediction


def test_heavy_ball_is_an_optax_transform_under_jit():
  params = {"w": jnp.ones(3)}
  opt = heavy_ball(0.1, friction=0.5)
  state = opt.init(params)
  loss = lambda p: 0.5 * jnp.sum(p["w"] ** 2)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  for _ in range(5):
    params, state = step(params, state)
  inner = find_state(state, HeavyBallState)
  assert int(inner.count) == 5 and float(inner.inertia) > 0
  with pytest.raises(ValueError, match="time_step"):
    heavy_ball(0.0)


def _exact_damped_inertia(hessian, masses, friction, start, times):
  """``H(t)`` of ``theta' = M^{-1} p``, ``p' = -A theta - gamma M^{-1} p`` from rest, by expm."""
  d = hessian.shape[0]
  inverse_mass = np.diag(1.0 / masses)
  generator = np.block([[np.zeros((d, d)), inverse_mass], [-hessian, -friction * inverse_mass]])
  state0 = np.concatenate([start, np.zeros(d)])
  values = []
  for t in times:
    theta, p = np.split(scipy.linalg.expm(t * generator) @ state0, 2)
    values.append(0.5 * p @ inverse_mass @ p + 0.5 * theta @ hessian @ theta)
  return np.asarray(values)


@pytest.mark.parametrize("masses", [np.ones(3), np.array([1.0, 2.0, 0.5])])
def test_damped_inertia_matches_the_exact_solution_to_second_order(masses):
  # Damped linear system: the matrix exponential gives H(t_k) exactly; the recorded H_k must match
  # it to O(dt^2) (errors drop 4x when dt halves), not with the half-step lag of friction at t_k.
  with jax.enable_x64(True):
    hessian = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.5]])
    start, friction, horizon = np.array([1.0, -0.5, 2.0]), 0.4, 5.0
    loss = lambda w: 0.5 * w @ jnp.asarray(hessian) @ w
    mass = diagonal_mass(jnp.asarray(masses))
    errors = []
    for dt in (0.05, 0.025, 0.0125):
      steps = int(round(horizon / dt))
      out = run_heavy_ball(loss, jnp.asarray(start), steps, time_step=dt, friction=friction, mass=mass)
      exact = _exact_damped_inertia(hessian, masses, friction, start, dt * np.arange(steps))
      errors.append(np.abs(np.asarray(out["inertia"]) - exact).max() / exact[0])
    assert errors[0] < 1e-3, errors
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, errors

"""Diagnostics: Lyapunov closed forms, probability current, entropy production and the IFT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from riemod.sampling import diagnostics as dg


def test_lyapunov_solutions_satisfy_their_equations():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 4))
  hess = a @ a.T / 4 + np.eye(4)
  c = np.cov(rng.normal(size=(50, 4)), rowvar=False)
  eta = 0.1
  s = dg.sgd_stationary_covariance(hess, eta, c)
  np.testing.assert_allclose(hess @ s + s @ hess - eta * hess @ s @ hess, eta * c, atol=1e-12)
  # Iterating the covariance recursion converges to the same matrix.
  f, q = dg.langevin_transition(hess, eta, 1.0, c)
  it = np.zeros((4, 4))
  for _ in range(3000):
    it = f @ it @ f.T + q
  np.testing.assert_allclose(dg.discrete_lyapunov(f, q), it, rtol=1e-9)
  d = np.diag([1.0, 2.0, 0.5, 1.0])
  s_ou = dg.ou_stationary_covariance(hess, d)
  np.testing.assert_allclose(hess @ s_ou + s_ou @ hess, 2 * d, atol=1e-12)
  with pytest.raises(ValueError, match="unstable"):
    dg.discrete_lyapunov(2 * np.eye(2), np.eye(2))


def test_probability_current_vanishes_iff_hessian_and_diffusion_commute():
  hess = np.array([[2.0, 0.5], [0.5, 1.0]])
  assert np.abs(dg.ou_current_matrix(hess, 0.7 * np.eye(2))).max() < 1e-12
  assert np.abs(dg.ou_current_matrix(hess, np.diag([1.0, 0.1]))).max() > 0.1


def test_area_rate_of_an_out_of_equilibrium_chain_matches_the_closed_form():
  # SGD-like chain with anisotropic noise that does not commute with H: a stationary current.
  hess = np.array([[2.0, 0.8], [0.8, 1.0]])
  noise = np.diag([1.0, 0.05])
  h = 0.1
  f, q = dg.langevin_transition(hess, h, 0.0, noise)
  s = dg.discrete_lyapunov(f, q)
  exact = dg.stationary_area_rate(f, s, h)
  chol = np.linalg.cholesky(q)
  f_j, chol_j = jnp.asarray(f), jnp.asarray(chol)

  def step(x, key):
    x = f_j @ x + chol_j @ jax.random.normal(key, (2,))
    return x, x

  keys = jax.random.split(jax.random.key(0), 400000)
  traj = np.asarray(jax.jit(lambda k: jax.lax.scan(step, jnp.zeros(2), k)[1])(keys))[1000:]
  estimate, se = dg.area_rate(traj, h, center=np.zeros(2))
  # Neighbouring terms are correlated; 8 standard errors leave room for that.
  assert abs(estimate - exact) < 8 * se
  assert abs(exact) > 8 * se  # the current is resolved: the chain is out of equilibrium
  # At equilibrium (isotropic Langevin noise) the closed form is zero.
  f0, q0 = dg.langevin_transition(hess, h, 1.0)
  assert abs(dg.stationary_area_rate(f0, dg.discrete_lyapunov(f0, q0), h)) < 1e-10
  cx, cy, current = dg.probability_current_2d(traj, h, bins=8)
  assert current.shape == (8, 8, 2) and np.all(np.isfinite(current))


def _cyclic_chain(num_steps, seed=0):
  p = np.array([[0.1, 0.7, 0.2], [0.2, 0.1, 0.7], [0.7, 0.2, 0.1]])
  w, v = np.linalg.eig(p.T)
  pi = np.real(v[:, np.argmin(np.abs(w - 1))])
  pi = pi / pi.sum()
  rng = np.random.default_rng(seed)
  u = rng.random(num_steps)
  cum = np.cumsum(p, axis=1)
  states = np.empty(num_steps, np.int64)
  states[0] = rng.choice(3, p=pi)
  for t in range(1, num_steps):
    states[t] = np.searchsorted(cum[states[t - 1]], u[t])
  return p, pi, states


def test_integral_fluctuation_theorem_and_entropy_production_rate():
  p, pi, states = _cyclic_chain(200000)
  length = 3
  delta_s = dg.segment_entropy_production(states, p, pi, length)
  mean, se = dg.integral_fluctuation_check(delta_s)
  assert abs(mean - 1.0) < 5 * se
  rate = dg.entropy_production_rate(p, pi)
  assert rate > 0.5  # strongly driven cycle
  assert abs(delta_s.mean() / length - rate) < 5 * delta_s.std() / np.sqrt(len(delta_s)) / length
  # Fitted from the trajectory, the estimates agree with the truth.
  p_hat, pi_hat = dg.transition_matrix(states, 3)
  np.testing.assert_allclose(p_hat, p, atol=0.01)
  assert abs(dg.entropy_production_rate(p_hat, pi_hat) - rate) < 0.02
  # A reversible chain produces no entropy.
  p_rev = np.array([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]])
  assert abs(dg.entropy_production_rate(p_rev, np.array([0.25, 0.5, 0.25]))) < 1e-12


def test_moment_errors_and_coarse_graining():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5000, 2))
  e = dg.moment_errors(x, np.array([0.5, 0.0]), np.eye(2))
  assert abs(e["mean_error"] - 0.5) < 0.05
  states = dg.coarse_grain(x, bins=3)
  assert set(np.unique(states)) == set(range(9))


def _ar1_chains(num_chains, num_draws, rho, seed=0, shifts=None, scales=None):
  rng = np.random.default_rng(seed)
  noise = rng.normal(size=(num_chains, num_draws))
  x = np.zeros((num_chains, num_draws))
  x[:, 0] = noise[:, 0] / np.sqrt(1 - rho ** 2)
  for t in range(1, num_draws):
    x[:, t] = rho * x[:, t - 1] + noise[:, t]
  if scales is not None:
    x = x * np.asarray(scales, np.float64)[:, None]
  if shifts is not None:
    x = x + np.asarray(shifts, np.float64)[:, None]
  return x


@pytest.mark.parametrize("shape, rho", [((4, 1000), 0.7), ((3, 999), -0.4), ((1, 501), 0.95), ((8, 64), 0.0)])
def test_ess_and_rhat_match_arviz(shape, rho):
  array_stats = pytest.importorskip("arviz_stats.base").array_stats
  draws = _ar1_chains(*shape, rho, seed=shape[1])
  cases = [draws, draws + np.arange(shape[0])[:, None] * 0.3, np.exp(draws)]
  for x in cases:
    for method in ("bulk", "mean"):
      np.testing.assert_allclose(dg.effective_sample_size(x, method), array_stats.ess(x, method=method),
                                 rtol=1e-10)
    np.testing.assert_allclose(dg.effective_sample_size(x, "tail"), array_stats.ess(x, method="tail", prob=0.05),
                               rtol=1e-10)
    if shape[0] > 1:
      np.testing.assert_allclose(dg.rhat(x), array_stats.rhat(x), rtol=1e-12)


def test_ess_matches_the_ar1_closed_form_and_rhat_flags_disagreeing_chains():
  # AR(1): the integrated autocorrelation of the mean is (1 + rho) / (1 - rho).
  for rho in (0.0, 0.5, 0.9):
    x = _ar1_chains(4, 40000, rho, seed=1)
    expected = x.size * (1 - rho) / (1 + rho)
    assert abs(dg.effective_sample_size(x, "mean") / expected - 1) < 0.1
    assert abs(dg.effective_sample_size(x, "bulk") / expected - 1) < 0.1
  # Antithetic chains are more efficient than independent draws.
  assert dg.effective_sample_size(_ar1_chains(4, 4000, -0.5, seed=2), "mean") > 16000
  mixed = _ar1_chains(4, 2000, 0.5, seed=3)
  assert dg.rhat(mixed) < 1.01
  assert dg.rhat(_ar1_chains(4, 2000, 0.5, seed=3, shifts=[0, 0, 0, 1.0])) > 1.05
  # Same location, different scale: only the folded part of R-hat sees it.
  scaled = _ar1_chains(4, 2000, 0.5, seed=3, scales=[1, 1, 1, 3.0])
  assert dg.rhat(scaled) > 1.05


def test_ess_and_rhat_errors_name_the_fix():
  with pytest.raises(ValueError, match="at least 2"):
    dg.rhat(np.zeros((1, 100)))
  with pytest.raises(ValueError, match="at least 4"):
    dg.effective_sample_size(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="method"):
    dg.effective_sample_size(np.zeros((2, 10)), method="median")
  with pytest.raises(ValueError, match="NaN"):
    dg.rhat(np.full((2, 10), np.nan))
  with pytest.raises(ValueError, match="one parameter"):
    dg.effective_sample_size(np.zeros((2, 10, 3)))

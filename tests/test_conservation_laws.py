"""Finding polynomial laws, and flows that keep (or break) them (docs/conservation.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from riemod.conservation import (factorization, find_polynomial_laws, integrate_gradient_flow,
                                 integrate_momentum_flow, monomial_exponents)


def _coefficients_of(function, num_variables, degree, seed=0):
  """Exact monomial coefficients of a polynomial function, by least squares on random points."""
  exponents = monomial_exponents(num_variables, degree)
  points = np.random.default_rng(seed).normal(size=(4 * len(exponents), num_variables))
  design = np.prod(points[:, None, :] ** exponents[None], axis=2)
  values = np.stack([np.asarray(function(p)) for p in points])
  return np.linalg.lstsq(design, values, rcond=None)[0].T


def _same_span(a, b):
  # Coefficients are O(1); the reference fit carries float32 round-off of ~1e-7.
  rank = lambda m: np.linalg.matrix_rank(m, tol=1e-5)
  return rank(a) == rank(b) == rank(np.concatenate([a, b]))


def test_product_of_three_laws_span_squares_differences():
  found = find_polynomial_laws(lambda x: jnp.prod(x)[None], 3, degree=2)
  assert len(found) == 2 and found.num_independent == 2
  got = np.stack([law.coefficients for law in found.laws])
  expected = _coefficients_of(lambda x: np.array([x[2] ** 2 - x[0] ** 2, x[1] ** 2 - x[0] ** 2]), 3, 2)
  assert _same_span(got, expected)
  assert found.check() < 1e-10
  x = jnp.array([1.0, 2.0, 3.0])
  values = found.as_function()(x)
  assert values.shape == (2,)
  assert "x1^2" in str(found)


def test_factorization_finds_entries_of_gram_difference():
  rep = factorization(3, 2, 2)
  found = find_polynomial_laws(rep, degree=2)
  assert len(found) == 3 and found.num_independent == 3
  got = np.stack([law.coefficients for law in found.laws])
  expected = _coefficients_of(lambda z: np.asarray(rep.known_laws(rep.unravel(jnp.asarray(z)))),
                              rep.num_parameters, 2)
  assert _same_span(got, expected)
  params = rep.sample(3)
  np.testing.assert_allclose(found.as_function()(params).shape, (3,))


def test_nmf_mirror_flow_degree_one_laws_are_column_balances():
  rep = factorization(3, 2, 2, positive=True)
  found = find_polynomial_laws(rep, degree=1, metric="entropic")
  got = np.stack([law.coefficients for law in found.laws])
  balances = lambda z: np.asarray(jnp.sum(rep.unravel(jnp.asarray(z))["U"], 0)
                                  - jnp.sum(rep.unravel(jnp.asarray(z))["V"], 0))
  assert _same_span(got, _coefficients_of(balances, rep.num_parameters, 1))


def test_degree_below_one_is_rejected():
  with pytest.raises(ValueError, match="degree"):
    find_polynomial_laws(lambda x: jnp.prod(x)[None], 3, degree=0)


def _non_quadratic_loss(rep, seed=0):
  rng = np.random.default_rng(seed)
  inputs, targets = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  # log-cosh residuals: smooth and not quadratic.
  return lambda p: jnp.mean(jnp.log(jnp.cosh(inputs @ rep.phi(p) - targets)))


def test_accurate_gradient_flow_keeps_gram_difference():
  with jax.enable_x64(True):
    rep = factorization(3, 3, 2)
    params = rep.sample(jax.random.PRNGKey(1), jnp.float64)
    _, laws = integrate_gradient_flow(_non_quadratic_loss(rep), params, time=2.0, steps=400,
                                      observe=rep.known_laws)
    laws = np.asarray(laws)
    scale = np.abs(laws[0]).max()
    assert np.abs(laws - laws[0]).max() / scale < 1e-8
    # The loss really moved the parameters (otherwise the check is empty).
    _, moved = integrate_gradient_flow(_non_quadratic_loss(rep), params, time=2.0, steps=400)
    assert float(jnp.abs(moved["U"][-1] - params["U"]).max()) > 1e-2


def test_momentum_flow_keeps_decaying_charge_and_breaks_gram_difference():
  with jax.enable_x64(True):
    rep = factorization(3, 3, 2)
    tau = 0.5
    params = rep.sample(jax.random.PRNGKey(2), jnp.float64)

    def observe(t, p, v):
      stacked = jnp.concatenate([p["U"], p["V"]])
      velocity = jnp.concatenate([v["U"], v["V"]])
      charge = jnp.exp(t / tau) * (stacked.T @ velocity - velocity.T @ stacked)
      return charge[0, 1], rep.known_laws(p)

    velocity = jax.tree_util.tree_map(lambda x: 0.3 * jnp.ones_like(x).at[0].set(-0.2), params)
    _, (charge, gram) = integrate_momentum_flow(_non_quadratic_loss(rep), params, velocity, tau=tau,
                                                time=2.0, steps=800, observe=observe)
    charge, gram = np.asarray(charge), np.asarray(gram)
    assert abs(charge[0]) > 1e-2
    assert np.abs(charge - charge[0]).max() / abs(charge[0]) < 1e-8
    assert np.abs(gram - gram[0]).max() / np.abs(gram[0]).max() > 1e-3


def test_nmf_mirror_flow_conserves_column_balances():
  with jax.enable_x64(True):
    rep = factorization(3, 3, 2, positive=True)
    params = rep.sample(jax.random.PRNGKey(3), jnp.float64)
    target = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, size=(3, 3)))
    loss = lambda p: 0.5 * jnp.sum((rep.phi(p) - target) ** 2)
    balances = lambda p: jnp.sum(p["U"], 0) - jnp.sum(p["V"], 0)
    _, values = integrate_gradient_flow(loss, params, time=1.0, steps=400, metric="entropic",
                                        observe=balances)
    values = np.asarray(values)
    assert np.abs(values - values[0]).max() / np.abs(values[0]).max() < 1e-8
    _, euclidean = integrate_gradient_flow(loss, params, time=1.0, steps=400, observe=balances)
    assert np.abs(np.asarray(euclidean) - values[0]).max() > 1e-3


@pytest.mark.slow
def test_momentum_search_finds_exactly_the_decaying_charge():
  rep = factorization(3, 3, 2)
  found = find_polynomial_laws(rep, degree=2, flow="momentum", tau=0.5)
  assert len(found) == 1 and found.laws[0].rate == 1
  assert found.check() < 1e-10
  text = str(found.laws[0])
  assert text.startswith("exp(t/tau)") and "v_U[0,1]" in text

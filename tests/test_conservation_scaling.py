"""Exact polynomial brackets: the fields match JAX's, and counts match the nested-derivative counter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from riemod.conservation import (count_laws, factorization, gradient_fields, linear_network, momentum_lift,
                                 relu_network, two_layer_relu)
from riemod.conservation import polyfields


@pytest.mark.parametrize("rep", [linear_network((2, 3, 3, 2)), relu_network((2, 3, 2, 2), bias=True),
                                 factorization(3, 2, 2)], ids=["linear", "relu-bias", "factorization"])
@pytest.mark.parametrize("flow", ["gradient", "mirror", "momentum"])
def test_polynomial_fields_and_brackets_match_jax(rep, flow):
  with jax.enable_x64(True):
    theta = np.abs(np.random.default_rng(0).normal(size=rep.num_parameters)) + 0.1
    np.testing.assert_allclose(polyfields.polynomial_values(rep.polynomial(), theta),
                               rep.flat_phi(jnp.asarray(theta)), rtol=1e-12, atol=1e-12)
    family = (momentum_lift(rep, tau=0.7) if flow == "momentum"
              else gradient_fields(rep, metric="entropic" if flow == "mirror" else None))
    poly = family.polynomial
    assert poly is not None
    z = np.asarray(family.sample_point(jax.random.PRNGKey(3)))
    eye = jnp.eye(family.num_fields)
    dense = jax.jit(jax.vmap(family.field, in_axes=(None, 0)))(jnp.asarray(z), eye)
    np.testing.assert_allclose(polyfields.evaluate(poly, z), dense, rtol=1e-12, atol=1e-12)
    # A depth-2 bracket [X_a, [X_b, X_c]] by nested jvp against the exact polynomial bracket.
    a, b, c = 0, family.num_fields // 2, family.num_fields - 1
    field = lambda i: (lambda x: family.field(x, eye[i]))

    def lie(f, g):
      return lambda x: jax.jvp(g, (x,), (f(x),))[1] - jax.jvp(f, (x,), (g(x),))[1]

    # Compiled once: evaluated op by op, the nested derivatives of the path-lifting took ~20 s.
    expected = jax.jit(lie(field(a), lie(field(b), field(c))))(jnp.asarray(z))
    inner = polyfields.bracket(poly, b, poly, c)
    exact = polyfields.evaluate(polyfields.bracket(poly, a, inner, 0), z)[0]
    np.testing.assert_allclose(exact, expected, rtol=1e-10, atol=1e-10 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize("rep, flow", [pytest.param(factorization(2, 2, 2), "momentum", marks=pytest.mark.slow),
                                       (two_layer_relu(3, 2, 2), "momentum"),
                                       (factorization(3, 3, 2, positive=True), "mirror"),
                                       (linear_network((2, 3, 2)), "gradient")])
def test_polynomial_and_nested_derivative_counts_agree(rep, flow):
  exact = count_laws(rep, flow=flow, num_points=2, method="polynomial")
  nested = count_laws(rep, flow=flow, num_points=2, method="jvp")
  assert exact.count == nested.count and exact.rank_history == nested.rank_history
  assert not exact.ambiguous


def test_deep_linear_momentum_keeps_only_the_decaying_charges():
  # 1-2-2-1 under momentum: the nested-derivative counter ran out of memory here (6.4 GB after 33 min).
  # Each hidden layer of width 2 keeps one charge exp(t/tau)(W^T W' - W'^T W): 2 laws of 17 coordinates.
  result = count_laws(linear_network((1, 2, 2, 1)), flow="momentum")
  assert result.count == 2 and result.dimension == 17 and not result.ambiguous
  assert len(result.rank_history[0]) > 5  # many bracket rounds: the depth the old counter could not reach


def test_polynomial_method_needs_polynomial_fields():
  with pytest.raises(ValueError, match="polynomial"):
    count_laws(lambda x: jnp.prod(x)[None], 3, method="polynomial")
  with pytest.raises(ValueError, match="method"):
    count_laws(factorization(2, 2, 1), method="symbolic")


def _jax_field(poly, field_index):
  """A single polynomial field written in jax.numpy (an independent evaluation of the same terms)."""
  single = polyfields.select(poly, [field_index])
  mono, comp, coef = (jnp.asarray(single.mono.astype(np.int64)), jnp.asarray(single.comp),
                      jnp.asarray(single.coef))

  def field(x):
    extended = jnp.append(x, 1.0)
    terms = coef * jnp.prod(extended[mono], axis=1) if mono.shape[1] else coef
    return jnp.zeros(poly.dimension, x.dtype).at[comp].add(terms)

  return single, field


@pytest.mark.parametrize("rep, flow", [(linear_network((2, 3, 3, 2)), "gradient"),
                                       (relu_network((2, 3, 2), bias=True), "momentum"),
                                       (factorization(3, 2, 2, positive=True), "mirror")],
                         ids=["linear-gradient", "relu-bias-momentum", "factorization-mirror"])
def test_second_derivatives_and_unexpanded_brackets_match_the_expanded_ones(rep, flow):
  with jax.enable_x64(True):
    family = (momentum_lift(rep) if flow == "momentum"
              else gradient_fields(rep, metric="entropic" if flow == "mirror" else None))
    poly = family.polynomial
    z = np.asarray(family.sample_point(jax.random.PRNGKey(5)), np.float64)
    n = poly.dimension
    # A depth-1 bracket as the parent, and the generators X_i bracketed with it.
    parent = polyfields.bracket(poly, 0, poly, poly.num_fields - 1)
    indices = [0, poly.num_fields // 2, poly.num_fields - 1]
    singles = [polyfields.select(poly, [i]) for i in indices]
    values = polyfields.evaluate(poly, z)[indices]
    # hessian_along against forward-over-forward differentiation of the same polynomial in JAX.
    single, jax_field = _jax_field(poly, indices[1])
    direction = np.random.default_rng(1).normal(size=n)
    expected = jax.jacfwd(lambda x: jax.jvp(jax_field, (x,), (jnp.asarray(direction),))[1])(jnp.asarray(z))
    np.testing.assert_allclose(polyfields.hessian_along(single, z, direction)[0], expected, rtol=1e-12,
                               atol=1e-12 * float(jnp.abs(expected).max()))
    terms = polyfields.second_derivative_terms(single, z)[0]
    contracted = np.zeros(n * n)
    np.add.at(contracted, terms[0], terms[2] * direction[terms[1]])
    np.testing.assert_allclose(contracted.reshape(n, n), expected, rtol=1e-12,
                               atol=1e-12 * float(jnp.abs(expected).max()))
    sparse = polyfields.jacobian(polyfields.select(poly, indices), z)
    for jacobians in ([polyfields.dense_jacobian(s, z)[0] for s in singles],
                      [sparse[k * n:(k + 1) * n] for k in range(len(indices))]):
      for i, (value, jac) in zip(indices, polyfields.brackets_at(singles, values, jacobians, parent, z)):
        exact = polyfields.bracket(poly, i, parent, 0)
        scale = max(1.0, float(np.abs(polyfields.dense_jacobian(exact, z)).max()))
        np.testing.assert_allclose(value, polyfields.evaluate(exact, z)[0], rtol=1e-12, atol=1e-12 * scale)
        np.testing.assert_allclose(jac, polyfields.dense_jacobian(exact, z)[0], rtol=1e-12, atol=1e-12 * scale)


def test_rank_tracker_decisions_match_a_dense_svd():
  from riemod.conservation._rank import _RankTracker  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  n, rtol = 30, 1e-8
  tracker = _RankTracker(n, rtol, 1e2)
  tracker.basis, _ = np.linalg.qr(rng.normal(size=(n, 6)))
  # 200 rows spanning the current 6 directions and 9 new ones, plus round-off-sized noise.
  rows = (rng.normal(size=(200, 6)) @ tracker.basis.T + rng.normal(size=(200, 9)) @ rng.normal(size=(9, n))
          + 1e-14 * rng.normal(size=(200, n)))
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  old = tracker.basis.copy()
  residual = rows - rows @ old @ old.T
  expected = int(np.sum(np.linalg.svd(residual, compute_uv=False) > rtol))
  kept = tracker.add(rows)
  assert expected == 9 and len(kept) == 9 and tracker.rank == 15
  np.testing.assert_allclose(tracker.basis.T @ tracker.basis, np.eye(15), atol=1e-12)
  # The kept rows (with the old basis) span every row: nothing is left outside the new span.
  span, _ = np.linalg.qr(np.concatenate([old, rows[kept].T], axis=1))
  assert np.abs(rows - rows @ span @ span.T).max() < 1e-10
  assert tracker.largest_dropped < 1e-11 and tracker.smallest_kept > 1e-3
  # A second pass adds nothing.
  assert tracker.add(rows).size == 0 and tracker.rank == 15


def test_brackets_past_max_terms_raise_an_error_that_names_the_fix():
  # 1-3-3-1 under momentum needs ten rounds of growing brackets; a small budget stops it early. (The
  # default method counts it by the orbit method, which forms no polynomial: exact brackets are forced.)
  with pytest.raises(ValueError, match="max_rounds"):
    count_laws(linear_network((1, 3, 3, 1)), flow="momentum", num_points=1, max_terms=2_000, method="polynomial")
  assert count_laws(linear_network((1, 3, 3, 1)), flow="momentum", num_points=1).count == 6

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
    dense = jax.vmap(family.field, in_axes=(None, 0))(jnp.asarray(z), eye)
    np.testing.assert_allclose(polyfields.evaluate(poly, z), dense, rtol=1e-12, atol=1e-12)
    # A depth-2 bracket [X_a, [X_b, X_c]] by nested jvp against the exact polynomial bracket.
    a, b, c = 0, family.num_fields // 2, family.num_fields - 1
    field = lambda i: (lambda x: family.field(x, eye[i]))

    def lie(f, g):
      return lambda x: jax.jvp(g, (x,), (f(x),))[1] - jax.jvp(f, (x,), (g(x),))[1]

    expected = lie(field(a), lie(field(b), field(c)))(jnp.asarray(z))
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

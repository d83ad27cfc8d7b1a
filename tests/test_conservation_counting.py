"""Counting conservation laws against the known answers (docs/conservation.md)."""


import jax.numpy as jnp
import numpy as np
import pytest

from riemod.conservation import (AmbiguousRankWarning, count_laws, factorization, gradient_fields,
                                 homogeneous_neuron, relu_network,
                                 residual_block, two_layer_relu, verify_laws)


def test_product_of_three_has_two_laws():
  result = count_laws(lambda x: jnp.prod(x)[None], 3)
  assert result.count == 2
  assert result.lie_dimension == 1
  assert result.dimension == 3
  assert len(result.points) == 3 and all(h[-1] == 1 for h in result.rank_history)
  assert not result.ambiguous


@pytest.mark.parametrize("n, m, r", [(3, 2, 2), (2, 2, 3), (3, 3, 3)])
def test_factorization_has_r_r_plus_1_over_2_laws(n, m, r):
  assert r <= n + m
  result = count_laws(factorization(n, m, r), num_points=2)
  assert result.count == r * (r + 1) // 2
  # Brackets are needed: the generators alone span less than the Lie algebra when r > 1.
  assert result.generator_rank < result.lie_dimension


def test_known_factorization_laws_are_annihilated():
  rep = factorization(4, 3, 3)
  assert verify_laws(gradient_fields(rep), lambda z: rep.known_laws(rep.unravel(z))) < 1e-10


@pytest.mark.parametrize("hidden", [2, 3])
def test_two_layer_relu_has_one_law_per_neuron(hidden):
  assert count_laws(two_layer_relu(3, hidden, 2)).count == hidden


@pytest.mark.parametrize("dims, bias", [((2, 3, 3, 2), False), ((2, 3, 3, 2), True), ((2, 2, 2, 2, 1), True)])
def test_deep_relu_has_one_law_per_hidden_neuron(dims, bias):
  rep = relu_network(dims, bias=bias)
  result = count_laws(rep, num_points=2)
  hidden = sum(dims[1:-1])
  assert result.count == hidden
  assert verify_laws(gradient_fields(rep), lambda z: rep.known_laws(rep.unravel(z))) < 1e-10


def test_residual_block_and_homogeneous_neuron():
  assert count_laws(residual_block(2, 3), num_points=2).count == 3
  rep = homogeneous_neuron(3.0)
  assert count_laws(rep, num_points=2).count == 1
  assert verify_laws(gradient_fields(rep), lambda z: rep.known_laws(rep.unravel(z))) < 1e-10


def test_pytree_phi_and_given_point():
  params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}
  result = count_laws(lambda p: {"y": p["a"] * p["b"]}, params, num_points=2)
  # phi = (a1 b, a2 b): D = 3, rank 2, one law a1^2 + a2^2 - 2 b^2... 3 - 2 = 1.
  assert result.count == 1
  np.testing.assert_allclose(result.points[0], [1.0, 2.0, 0.5])


def test_two_layer_relu_under_momentum_has_no_law():
  result = count_laws(two_layer_relu(3, 2, 2), flow="momentum", num_points=2)
  assert result.dimension == 2 * 10 + 1
  assert result.count == 0


def test_momentum_keeps_fewer_laws_than_gradient_flow_for_factorization():
  rep = factorization(2, 2, 2)
  momentum = count_laws(rep, flow="momentum", num_points=2)
  gradient = count_laws(rep, num_points=2)
  # At least the r(r-1)/2 decaying charges survive, but fewer than the r(r+1)/2 gradient-flow laws.
  assert 1 <= momentum.count < gradient.count


def test_nmf_mirror_flow_keeps_column_balances():
  rep = factorization(3, 3, 2, positive=True)
  family = gradient_fields(rep, metric="entropic")
  balances = lambda z: (jnp.sum(rep.unravel(z)["U"], axis=0) - jnp.sum(rep.unravel(z)["V"], axis=0))
  assert verify_laws(family, balances) < 1e-10
  euclidean = gradient_fields(rep)
  with pytest.raises(AssertionError):
    verify_laws(euclidean, balances)
  assert count_laws(rep, metric="entropic", num_points=2).count >= 2


def test_agreement_warning_when_first_point_is_not_generic():
  # At theta = 0 every field of x1 x2 x3 vanishes: a non-generic point, lower rank than elsewhere.
  with pytest.warns(AmbiguousRankWarning):
    result = count_laws(lambda x: jnp.prod(x)[None], jnp.zeros(3), num_points=2)
  assert result.count == 2 and result.ambiguous


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="theta_or_shapes"):
    count_laws(lambda p: p["W"] @ p["V"], {"W": (2, 3), "V": (4, 2)})
  with pytest.raises(ValueError, match="not differentiable"):
    count_laws(lambda x: jnp.sqrt(jnp.abs(x) - jnp.abs(x)), 3, num_points=1)
  with pytest.raises(TypeError, match="floating"):
    count_laws(lambda x: (x > 0).astype(jnp.int32), 3)
  with pytest.raises(TypeError, match="callable"):
    count_laws("not a function", 3)
  with pytest.raises(ValueError, match="theta_or_shapes"):
    count_laws(factorization(2, 2, 1), {"U": (3, 1), "V": (2, 1)})
  with pytest.raises(ValueError, match="dims"):
    relu_network((3,))
  with pytest.raises(ValueError, match="flow"):
    count_laws(factorization(2, 2, 1), flow="newton")

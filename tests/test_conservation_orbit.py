"""The orbit method: closed-form flows, and counts equal to the exact bracket counter and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from riemod.cli.laws import closed_form
from riemod.conservation import count_laws, factorization, linear_network, momentum_lift, two_layer_relu
from riemod.conservation.orbit import orbit_rank


def test_heavy_ball_flows_are_the_generators_flows():
  # d/ds Phi^j_s(z) = X_j(Phi^j_s(z)), Phi^j_0 = id and Phi^j_s o Phi^j_r = Phi^j_{s+r}: the exact flows.
  family = momentum_lift(linear_network((2, 3, 2)), tau=0.7)
  with jax.enable_x64(True):
    z = family.sample_point(jax.random.PRNGKey(0))
    eye = jnp.eye(family.num_fields)
    for j in range(family.num_fields):
      moved, velocity = jax.jvp(lambda s: family.flow(z, j, s), (0.4,), (1.0,))
      np.testing.assert_allclose(velocity, family.field(moved, eye[j]), rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(family.flow(z, j, 0.0), z, rtol=0, atol=1e-15)
      np.testing.assert_allclose(family.flow(family.flow(z, j, 0.4), j, -0.15), family.flow(z, j, 0.25),
                                 rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rep", [linear_network((1, 2, 2, 1)), linear_network((2, 3, 3, 2)),
                                 linear_network((1, 7, 2)), factorization(3, 2, 2), two_layer_relu(3, 2, 2)],
                         ids=["linear-1-2-2-1", "linear-2-3-3-2", "linear-1-7-2", "factorization", "relu"])
def test_orbit_counts_equal_exact_brackets(rep):
  orbit = count_laws(rep, flow="momentum", num_points=2, method="orbit")
  exact = count_laws(rep, flow="momentum", num_points=2, method="polynomial")
  assert orbit.count == exact.count
  assert not orbit.ambiguous
  # The certificate: every kept direction is >= rtol (1e-3), the last round's candidates are round-off.
  assert min(orbit.smallest_kept) >= 1e-3 and max(orbit.largest_dropped) < 1e-8


def test_deep_linear_momentum_by_orbit_equals_closed_form():
  # 1-3-3-3-1: the exact brackets took 52 s and 1.9 GB (ten rounds of degree-growing polynomials).
  dims = (1, 3, 3, 3, 1)
  result = count_laws(linear_network(dims), flow="momentum")
  assert result.count == closed_form("linear", dims, False, "momentum") == 9
  assert not result.ambiguous and len(result.rank_history[0]) > 6 and result.method == "orbit"
  # Many generators for the dimension (wide layers): exact brackets stay the choice.
  assert count_laws(linear_network((3, 4, 3)), flow="momentum", num_points=1).method == "polynomial"


def test_orbit_rank_refuses_a_family_without_flows():
  from riemod.conservation import gradient_fields  # pylint: disable=g-import-not-at-top
  family = gradient_fields(lambda x: jnp.prod(x)[None], 3)
  with pytest.raises(ValueError, match="closed-form flows"):
    orbit_rank(family, np.ones(3))

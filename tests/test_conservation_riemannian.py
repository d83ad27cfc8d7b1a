"""Riemannian heavy ball: the composer's layerwise metric as the mass operator."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import riemod
from conservation_helpers import run_heavy_ball
from riemod.conservation import operator_mass


def _metric_and_loss():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 3)))
  t = jnp.asarray(rng.normal(size=(6, 2)))
  f = lambda p, v: v @ p["w"] + p["b"]
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=1))
  params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.zeros(2)}
  _, _, curvature = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(), params=params)
  geometry = riemod.Geometry(mass=0.5)
  metric = geometry.compose(curvature, geometry.init(params))
  return metric, (lambda p: loss_fn(f(p, x))), params


def test_layerwise_metric_mass_matches_dense_inverse_and_keeps_damped_identity():
  with jax.enable_x64(True):
    metric, loss, params = _metric_and_loss()
    mass = operator_mass(metric)
    flat, unravel = ravel_pytree(params)
    columns = jnp.eye(flat.size)
    dense = jax.vmap(lambda e: ravel_pytree(mass.matvec(unravel(e)))[0])(columns).T
    inverse = jax.vmap(lambda e: ravel_pytree(mass.solve(unravel(e)))[0])(columns).T
    np.testing.assert_allclose(dense, dense.T, atol=1e-10)
    np.testing.assert_allclose(inverse, np.linalg.inv(np.asarray(dense)), rtol=1e-8, atol=1e-10)
    errors = []
    for dt in (0.05, 0.025):
      out = run_heavy_ball(loss, params, int(10 / dt), time_step=dt, friction=0.5, mass=mass)
      total = np.asarray(out["inertia"] + out["dissipated"])
      errors.append(np.abs(total - total[0]).max())
    assert errors[0] < 1e-2 and errors[0] / errors[1] > 3.0

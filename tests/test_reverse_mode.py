"""Reverse-mode differentiation through a step (meta-learning, tuning the mass by gradient):
``jax.grad`` of the loss after one riemod step equals ``jax.grad`` of the same step written as a
dense solve, for both structures and through the jitter escalation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import riemod
from riemod.composer.woodbury import cholesky_with_jitter

LR = 0.7


def _problem():
  k = jax.random.split(jax.random.key(3), 4)
  params = {"a": {"kernel": 0.8 * jax.random.normal(k[0], (3, 4), jnp.float64),
                  "bias": jnp.zeros(4, jnp.float64)},
            "b": {"kernel": 0.5 * jax.random.normal(k[1], (4, 2), jnp.float64)}}
  x = jax.random.normal(k[2], (6, 3), jnp.float64)
  t = jax.random.normal(k[3], (6, 2), jnp.float64)
  f = lambda p, x: jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
  return f, params, x, loss_fn


def _riemod_after_step(structure, f, x, loss_fn):
  alias = riemod.natural_gradient if structure == "full" else riemod.layerwise_natural_gradient

  def after(mass, params):
    opt = alias(LR, mass=mass)
    _, grads, curvature = riemod.value_grad_and_curvature(
        f, x, loss_fn, riemod.metrics.identity(), params=params)
    updates, _ = opt.update(grads, opt.init(params), params, curvature=curvature)
    return loss_fn(f(optax.apply_updates(params, updates), x))
  return after


def _dense_after_step(structure, f, x, loss_fn, params0):
  """The same step as an explicit solve with the Gauss-Newton matrix from ``jax.jacrev``."""
  flat0, unravel = jax.flatten_util.ravel_pytree(params0)
  # Block boundaries of the layerwise structure: module "a" (kernel + bias), then module "b".
  split = params0["a"]["kernel"].size + params0["a"]["bias"].size

  def after(mass, params):
    flat, _ = jax.flatten_util.ravel_pytree(params)
    out = lambda v: f(unravel(v), x)
    jac = jax.jacrev(out)(flat).reshape(-1, flat.size) / np.sqrt(x.shape[0])
    gauss_newton = jac.T @ jac
    if structure == "layerwise":
      block = jnp.zeros_like(gauss_newton).at[:split, :split].set(1.0).at[split:, split:].set(1.0)
      gauss_newton = gauss_newton * block
    grad = jax.grad(lambda v: loss_fn(out(v)))(flat)
    step = jnp.linalg.solve(gauss_newton + mass * jnp.eye(flat.size), grad)
    return loss_fn(out(flat - LR * step))
  return after


@pytest.mark.parametrize("structure", ["full", "layerwise"])
def test_grad_through_a_step_matches_the_dense_solve(structure):
  with jax.enable_x64(True):
    f, params, x, loss_fn = _problem()
    mass = jnp.asarray(1e-2, jnp.float64)
    ours = jax.jit(jax.grad(_riemod_after_step(structure, f, x, loss_fn), argnums=(0, 1)))
    dense = jax.grad(_dense_after_step(structure, f, x, loss_fn, params), argnums=(0, 1))
    (d_mass, d_params), (d_mass_ref, d_params_ref) = ours(mass, params), dense(mass, params)
    np.testing.assert_allclose(d_mass, d_mass_ref, rtol=1e-9)
    for a, b in zip(jax.tree.leaves(d_params), jax.tree.leaves(d_params_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
    assert abs(float(d_mass_ref)) > 1e-6  # the mass matters: the check is not vacuous


def test_grad_through_the_jitter_escalation():
  """A singular matrix needs jitter; the factor's gradient is that of ``cholesky(A + jitter I)``
  with the jitter held fixed (the escalation itself is a while loop, outside the gradient)."""
  with jax.enable_x64(True):
    v = jnp.array([1.0, 2.0, -1.0])
    a = jnp.outer(v, v) + jnp.diag(jnp.array([0.0, 0.0, 0.0]))  # rank one: plain factor fails
    _, jitter = cholesky_with_jitter(a)
    assert float(jitter) > 0
    weights = jnp.arange(1.0, 10.0).reshape(3, 3)
    ours = jax.grad(lambda m: jnp.sum(weights * cholesky_with_jitter(m)[0]))(a)
    reference = jax.grad(lambda m: jnp.sum(weights * jnp.linalg.cholesky(
        m + jitter * jnp.eye(3))))(a)
    assert np.all(np.isfinite(ours))
    # Only the symmetric part acts on a symmetric matrix (jnp.linalg.cholesky symmetrises).
    np.testing.assert_allclose(0.5 * (ours + ours.T), reference, rtol=1e-6)

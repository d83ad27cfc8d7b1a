"""The action functional: zero gap on the exact flow, positive and O(lr) gap for discrete runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import riemod
from riemod.certify import action_terms, path_action


def _linear_quadratic():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(10, 3)))
  t = jnp.asarray(rng.normal(size=(10, 2)))
  weight = jnp.asarray([[2.0, 0.5], [0.5, 1.0]])
  f = lambda p, v: v @ p["w"]
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.einsum("bi,ij,bj->b", y - t, weight, y - t))
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)))}
  return f, x, loss_fn, params


def test_exact_flow_has_zero_action_gap_and_other_paths_do_not():
  with jax.enable_x64(True):
    f, x, loss_fn, params, = _linear_quadratic()
    _, _, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                 params=params)
    geometry = riemod.Geometry(mass=0.1)  # constant: the model is linear
    metric = geometry.compose(curv, geometry.init(params))
    flat0, unravel = ravel_pytree(params)
    loss = lambda w: loss_fn(f(unravel(w), x))
    solve = lambda w, v: ravel_pytree(metric.solve(unravel(v)))[0]
    matvec = lambda w, v: ravel_pytree(metric.matvec(unravel(v)))[0]
    # Dense G^{-1} H from the composer's own products, then the flow by a matrix exponential.
    eye = jnp.eye(flat0.size)
    hess = jax.hessian(loss)(flat0)
    rate = jax.vmap(lambda h_col: solve(None, h_col), in_axes=1, out_axes=1)(hess)
    w_star = flat0 - jnp.linalg.solve(hess, jax.grad(loss)(flat0))
    flow = lambda s: w_star + jax.scipy.linalg.expm(-rate * s) @ (flat0 - w_star)
    duration = 1.5
    action = path_action(loss, solve, matvec, flow, duration, num_segments=6, order=12)
    decrease = loss(flat0) - loss(flow(duration))
    assert float(decrease) > 0.1
    assert abs(float(action - decrease)) < 1e-10 * float(action)

    line = lambda s: flat0 + (s / duration) * (flow(duration) - flat0)
    line_action = path_action(loss, solve, matvec, line, duration, num_segments=6, order=12)
    assert float(line_action - decrease) > 1e-3 * float(decrease)
    del eye


def _tanh_regression():
  model = riemod.nn.Sequential(riemod.nn.Dense(3, 8, rngs=nnx.Rngs(0)), jnp.tanh,
                               riemod.nn.Dense(8, 2, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(0), (16, 3))
  t = jnp.sin(x[:, :2])
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
  return model, x, loss_fn


def _run(lr, steps, mass=0.1):
  model, x, loss_fn = _tanh_regression()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = riemod.layerwise_natural_gradient(lr, mass=mass)
  loss_of = lambda p: loss_fn(nnx.merge(graphdef, p, rest)(x))

  def step(carry, _):
    p, state = carry
    loss, grads, curv = riemod.value_grad_and_curvature(nnx.merge(graphdef, p, rest), x, loss_fn,
                                                        riemod.metrics.identity())
    u, state = tx.update(grads, state, p, curvature=curv, value=loss)
    return (optax.apply_updates(p, u), state), loss

  (params, state), losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
      (params, tx.init(params)))
  return state, float(loss_of(params)), np.asarray(losses)


def _loss_tracking_works() -> bool:
  """Whether the transform records ``value=`` (see the xfail below)."""
  f = lambda p, v: v @ p["w"]
  params = {"w": jnp.zeros((2, 1))}
  _, g, curv = riemod.value_grad_and_curvature(f, jnp.eye(2), lambda y: 0.5 * jnp.mean(y ** 2),
                                               riemod.metrics.identity(), params=params)
  tx = riemod.track_action(riemod.scale_by_metric(riemod.Geometry(mass=1.0)), learning_rate=1.0)
  _, state = tx.update(g, tx.init(params), params, curvature=curv, value=0.5)
  return float(state.last_loss) == 0.5


_TRACKING = pytest.mark.xfail(
    not _loss_tracking_works(), strict=True,
    reason="riemod.track_action does not record the loss passed as `value=`.")


def test_discrete_action_gap_positive_and_first_order_in_lr():
  horizon, lr = 2.0, 0.1
  gaps = []
  for rate in (lr, lr / 2):
    state, final, losses = _run(rate, int(round(horizon / rate)))
    terms = action_terms(state, final_loss=final, initial_loss=losses[0])
    assert terms.loss_decrease > 0.05
    gaps.append(terms.gap)
  assert all(g > 0 for g in gaps)
  # O(lr): halving the step halves the gap (first-order time discretisation).
  assert 1.7 < gaps[0] / gaps[1] < 2.3


@_TRACKING
def test_state_form_pairs_the_action_with_the_tracked_losses():
  lr, steps = 0.2, 6
  state, _, losses = _run(lr, steps)
  inner = riemod.find_state(state, riemod.ActionState)
  terms = action_terms(state, learning_rate=lr)
  assert terms.num_steps == steps - 1
  assert terms.initial_loss == pytest.approx(losses[0], rel=1e-6)
  assert terms.final_loss == pytest.approx(losses[-1], rel=1e-6)
  expected = float(inner.action) - lr * float(inner.metric_grad_norm_sq)
  assert terms.action == pytest.approx(expected, rel=1e-6)
  assert terms.gap == pytest.approx(expected - (losses[0] - losses[-1]), rel=1e-5, abs=1e-7)


def test_action_terms_errors():
  f, x, loss_fn, params = _linear_quadratic()
  tx = riemod.layerwise_natural_gradient(0.1, mass=0.1)
  state = tx.init(params)
  _, grads, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                   params=params)
  _, state = tx.update(grads, state, params, curvature=curv)  # no value=
  with pytest.raises(ValueError, match="value=loss"):
    action_terms(state, learning_rate=0.1)
  with pytest.raises(ValueError, match="ActionState"):
    action_terms(optax.sgd(0.1).init(params))

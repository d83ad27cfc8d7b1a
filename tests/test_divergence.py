"""The divergence check: a run whose loss grows past ``max_loss_growth`` times its first loss is
refused under the non-finite policy, where every value stays finite and nothing else would say so
(a low-rank metric at too small a mass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import riemod


def _classifier():
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[2], (256, 64))
  y = jnp.argmax(x @ jax.random.normal(k[3], (64, 10)), -1)
  params = {"a": {"kernel": jax.random.normal(k[0], (64, 32)) / 8, "bias": jnp.zeros(32)},
            "b": {"kernel": jax.random.normal(k[1], (32, 10)) / np.sqrt(32),
                  "bias": jnp.zeros(10)}}
  f = lambda p, x: (jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
                    + p["b"]["bias"])
  return f, params, x, y


def _train(tx, metric, steps=20, pass_value=True):
  f, params, x, y = _classifier()
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    idx = jax.random.choice(jax.random.key(i), x.shape[0], (32,), replace=False)
    loss_fn = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y[idx]).mean()
    loss, grads, curvature = riemod.value_grad_and_curvature(
        f, x[idx], loss_fn, metric, params=params, key=jax.random.key(1000 + i))
    extra = dict(value=loss) if pass_value else {}
    updates, state = tx.update(grads, state, params, curvature=curvature, **extra)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for i in range(steps):
    params, state, loss = step(params, state, i)
    losses.append(float(loss))
  return losses, state


@pytest.mark.parametrize("pass_value", [True, False])
def test_a_diverging_run_is_refused(pass_value):
  # Sampled Fisher at the default mass: the gradient outside the sampled rows' span is stepped
  # 1 / mass = 100 times; the loss climbs while every value stays finite.
  metric = riemod.metrics.sampled_softmax_fisher()
  unchecked = riemod.natural_gradient(0.3, max_error=None, max_loss_growth=None)
  losses, _ = _train(unchecked, metric, pass_value=pass_value)
  assert np.all(np.isfinite(losses)) and max(losses) > 5 * losses[0]  # the silent failure
  # Refused with value= and without it (the loss recorded in the curvature).
  with pytest.raises(Exception, match="loss is diverging"):
    _train(riemod.natural_gradient(0.3, max_error=None), metric, pass_value=pass_value)


def test_a_converging_run_is_not_refused():
  losses, state = _train(riemod.natural_gradient(0.05, mass=1e-1), riemod.metrics.softmax_fisher())
  assert losses[-1] < 0.7 * losses[0]
  assert int(state.skipped_steps) == 0
  np.testing.assert_allclose(float(state.first_value), losses[0], rtol=1e-6)


def test_skip_freezes_the_parameters_and_counts():
  metric = riemod.metrics.sampled_softmax_fisher()
  losses, state = _train(riemod.natural_gradient(0.3, max_error=None, on_nonfinite="skip"),
                         metric, steps=12)
  assert int(state.skipped_steps) > 0
  # Once refused, the parameters no longer move: the remaining batch losses are those of one
  # parameter vector (different batches), and no later step takes them past the refusal.
  assert max(losses) < 50 * losses[0]


def _feed(values, growth=3.0):
  tx = riemod.apply_if_valid(optax.with_extra_args_support(optax.identity()), "error", max_error=None, max_loss_growth=growth)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  for v in values:
    _, state = tx.update({"w": jnp.ones(2)}, state, params, curvature=None, value=v)
  return state


def test_moving_average_in_closed_form():
  # One batch 20x the first loss: average 0.9 * 1 + 0.1 * 20 = 2.9 < 3, accepted.
  state = _feed([1.0, 20.0])
  np.testing.assert_allclose(float(state.smoothed_value), 2.9, rtol=1e-6)
  # Two such batches: 0.9 * 2.9 + 2 = 4.61 > 3, refused.
  with pytest.raises(riemod.StepRefusedError, match="moving average 4.61"):
    _feed([1.0, 20.0, 20.0])
  # A negative first loss (a log-likelihood) is not checked.
  _feed([-1.0, 20.0, 20.0])
  _feed([1.0, 20.0, 20.0], growth=None)


def test_max_loss_growth_is_validated():
  with pytest.raises(ValueError, match="max_loss_growth"):
    riemod.natural_gradient(0.1, max_loss_growth=1.0)
  with pytest.raises(ValueError, match="scalar loss"):
    _feed([jnp.ones(3)])

"""Minibatch schedules: coverage per epoch, independence, reproducibility, Monte-Carlo covariance."""

import jax
import numpy as np
import pytest

from riemod.sampling import Minibatcher, batch_indices, minibatches
from riemod.sampling.diagnostics import minibatch_gradient_covariance


def _draw(batcher, key, num_batches):
  def body(state, _):
    indices, state = batcher.next(state)
    return state, indices
  return np.asarray(jax.jit(lambda s: jax.lax.scan(body, s, None, length=num_batches)[1])(
      batcher.init(key)))


def test_without_replacement_visits_every_sample_once_per_epoch():
  batcher = Minibatcher(60, 12, replace=False)
  batches = _draw(batcher, jax.random.key(3), 5 * batcher.steps_per_epoch)
  epochs = batches.reshape(5, -1)
  for epoch in epochs:
    assert sorted(epoch.tolist()) == list(range(60))
  # A fresh permutation each epoch, not the same order again.
  assert not np.array_equal(epochs[0], epochs[1])
  # The stateful schedule and the pure function agree step by step.
  pure = np.stack([batch_indices(jax.random.key(3), t, data_size=60, batch_size=12, replace=False)
                   for t in range(len(batches))])
  np.testing.assert_array_equal(batches, pure)


def test_with_replacement_batches_are_distinct_and_independent():
  n, b, steps = 40, 8, 20000
  batches = _draw(Minibatcher(n, b, replace=True), jax.random.key(0), steps)
  assert all(len(set(row.tolist())) == b for row in batches[:200])
  # Each index appears with probability B / N per batch.
  freq = np.bincount(batches.reshape(-1), minlength=n) / steps
  expected = b / n
  sd = np.sqrt(expected * (1 - expected) / steps)
  assert np.max(np.abs(freq - expected)) < 5 * sd
  # Overlap of consecutive batches is hypergeometric (mean B^2/N) if batches are independent;
  # without replacement, batches of one epoch never overlap.
  overlap = np.array([len(np.intersect1d(batches[t], batches[t + 1])) for t in range(2000)])
  mean = b * b / n
  var = b * (b / n) * (1 - b / n) * (n - b) / (n - 1)
  assert abs(overlap.mean() - mean) < 5 * np.sqrt(var / len(overlap))
  no_rep = _draw(Minibatcher(n, b, replace=False), jax.random.key(0), 5)
  assert len(np.unique(no_rep)) == 5 * b


@pytest.mark.parametrize("replace", [True, False])
def test_schedules_are_reproducible_from_the_key(replace):
  a = _draw(Minibatcher(30, 5, replace), jax.random.key(7), 12)
  b = _draw(Minibatcher(30, 5, replace), jax.random.key(7), 12)
  c = _draw(Minibatcher(30, 5, replace), jax.random.key(8), 12)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  eager = np.stack(list(minibatches(jax.random.key(7), 30, 5, replace=replace, num_batches=12)))
  np.testing.assert_array_equal(a, eager)


@pytest.mark.parametrize("replace", [True, False])
def test_minibatch_gradient_covariance_matches_finite_population_formula(replace):
  n, b, d, draws = 50, 10, 3, 30000
  rng = np.random.default_rng(0)
  per_sample = rng.normal(size=(n, d)) @ np.diag([1.0, 2.0, 0.5])
  c = np.cov(per_sample, rowvar=False, bias=True)
  batches = _draw(Minibatcher(n, b, replace), jax.random.key(1), draws)
  if not replace:  # batches of one epoch are dependent; keep one batch per epoch
    batches = batches[::n // b]
  means = per_sample[batches].mean(axis=1)
  estimate = np.cov(means, rowvar=False)
  exact = minibatch_gradient_covariance(c, n, b)
  m = len(means)
  # Standard error of each entry of a sample covariance (Gaussian approximation).
  se = np.sqrt((np.outer(np.diag(exact), np.diag(exact)) + exact ** 2) / m)
  assert np.all(np.abs(estimate - exact) < 5 * se)
  # The naive C / B (independent draws) is ruled out by the same error bars.
  assert np.any(np.abs(estimate - c / b) > 5 * se)


def test_bad_sizes_raise_clear_errors():
  with pytest.raises(ValueError, match="larger than the data set"):
    Minibatcher(10, 20).init(0)
  with pytest.raises(ValueError, match="data_size is missing"):
    Minibatcher(None, 5).init(0)
  with pytest.raises(ValueError, match="must divide data_size"):
    Minibatcher(10, 3, replace=False).init(0)
  with pytest.raises(ValueError, match="batch_size"):
    batch_indices(jax.random.key(0), 0, data_size=10, batch_size=0)

"""Output metrics: factor rows ``L_o`` per sample, ``M_o = L_o^T L_o`` on the network output.

An output metric is called as ``metric(outputs, key)`` with the batch of outputs ``(B, *out)`` and
returns the unscaled factor rows ``(B, k, *out)``; ``value_grad_and_curvature`` divides them by
``sqrt(B)`` so that the metric matches a batch-mean loss. The choice of metric is problem dependent
(Pehle & Slotine, arXiv 2603.03610, sec. 2); each one here documents the loss it matches.

Example:
  >>> import jax, jax.numpy as jnp
  >>> rows = softmax_fisher()(jnp.zeros((2, 3)), None)
  >>> rows.shape   # (batch, rows per sample, classes)
  (2, 3, 3)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class OutputMetric:
  """A named output metric: ``factor(outputs, key) -> (B, k, *out)`` rows.

  Attributes:
    name: readable name, shown in diagnostics.
    factor: the factor-row function.
    needs_key: whether ``factor`` draws random numbers (then a PRNG key is required).
    coordinates: ``(outputs, cotangent) -> (B, k)``: coordinates ``e_s`` of a loss cotangent in
      the unscaled rows, ``L_s^T e_s = c_s``, for metrics that are the loss's exact
      Gauss-Newton factor (``None`` otherwise). With them the step is computed in the
      range-aware form, free of the ``1 / mass`` cancellation (see :class:`riemod.Geometry`).
      Where a cotangent is not in the rows' span (another loss), the remainder is solved by
      Woodbury, so the step stays exact.
  """

  name: str
  factor: Callable[[jax.Array, jax.Array | None], jax.Array]
  needs_key: bool = False
  coordinates: Callable[[jax.Array, jax.Array], jax.Array] | None = None

  def __call__(self, outputs: jax.Array, key: jax.Array | None = None) -> jax.Array:
    if self.needs_key and key is None:
      raise ValueError(
          f"The output metric {self.name!r} draws random rows and needs a PRNG key: pass "
          "key=jax.random.key(...) to value_grad_and_curvature (a fresh one every step).")
    rows = self.factor(outputs, key)
    if rows.ndim != outputs.ndim + 1 or rows.shape[0] != outputs.shape[0] or (
        rows.shape[2:] != outputs.shape[1:]):
      raise ValueError(
          f"The output metric {self.name!r} returned rows of shape {rows.shape}; expected "
          f"(batch, k, *output) = ({outputs.shape[0]}, k, {', '.join(map(str, outputs.shape[1:]))}).")
    return rows


def _eye_rows(outputs: jax.Array) -> jax.Array:
  batch, size = outputs.shape[0], math.prod(outputs.shape[1:])
  eye = jnp.eye(size, dtype=outputs.dtype).reshape((size,) + outputs.shape[1:])
  return jnp.broadcast_to(eye, (batch,) + eye.shape)


def identity() -> OutputMetric:
  """``M_o = I``: the Gauss-Newton metric of ``0.5 * mean_s ||r_s||^2`` (sum over outputs).

  For squared errors ``r_s = y_s - t_s``, and for any residual model (PINNs, least squares) whose
  function returns the residuals ``r`` themselves. One row per output coordinate, so ``k`` is the
  output size. A loss that averages over output coordinates too (``jnp.mean((y - t) ** 2)``) has
  the metric ``I / out_size``: declare it with a matching mass, or sum over outputs.

  Example:
    >>> import jax.numpy as jnp
    >>> identity()(jnp.zeros((2, 3))).shape   # (batch, rows per sample, outputs)
    (2, 3, 3)
  """
  return OutputMetric("identity", lambda outputs, key: _eye_rows(outputs),
                      coordinates=lambda outputs, c: c.reshape(c.shape[0], -1))


def _check_logits(outputs: jax.Array, name: str) -> None:
  if outputs.ndim != 2:
    raise ValueError(f"{name} expects logits of shape (batch, classes); got {outputs.shape}.")


def softmax_fisher() -> OutputMetric:
  """Exact Fisher of softmax cross-entropy: per sample, rows ``sqrt(p_i) (e_i - p)``.

  ``sum_i`` of the outer products is ``diag(p) - p p^T`` (rank ``C - 1``): the Hessian of
  ``mean_s CE(softmax(y_s), t_s)`` with respect to the logits, so the step is the exact block
  Gauss-Newton/natural gradient step.
  """

  def factor(logits, key):
    _check_logits(logits, "softmax_fisher")
    p = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    eye = jnp.eye(p.shape[-1], dtype=p.dtype)
    return jnp.sqrt(p)[:, :, None] * (eye[None] - p[:, None, :])

  def coordinates(logits, cotangent):
    # sum_i e_i sqrt(p_i) (e_i - p) = c - p sum(c) = c for e = c / sqrt(p), since a
    # cross-entropy cotangent p - y sums to zero. A class with p = 0 has a zero row: its
    # coordinate is set to 0 (what remains is solved outside the rows' span).
    p = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    root = jnp.sqrt(p)
    return jnp.where(root > 0, cotangent / jnp.where(root > 0, root, 1), 0)

  return OutputMetric("softmax_fisher", factor, coordinates=coordinates)


def sampled_softmax_fisher(num_samples: int = 1) -> OutputMetric:
  """Monte-Carlo softmax Fisher: ``k`` rows ``(e_yhat - p) / sqrt(k)``, ``yhat ~ softmax(y)``.

  The labels ``yhat`` are drawn from the model (not the data), so the expectation is
  ``diag(p) - p p^T``. Needs a PRNG key.
  """
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples}: draw at least one probe per sample.")

  def factor(logits, key):
    _check_logits(logits, "sampled_softmax_fisher")
    logits = jax.lax.stop_gradient(logits)
    p = jax.nn.softmax(logits, axis=-1)
    draws = jax.random.categorical(key, logits[:, None, :],
                                   shape=(logits.shape[0], num_samples))
    onehot = jax.nn.one_hot(draws, p.shape[-1], dtype=p.dtype)
    return (onehot - p[:, None, :]) / jnp.sqrt(jnp.asarray(num_samples, p.dtype))

  return OutputMetric(f"sampled_softmax_fisher(k={num_samples})", factor, needs_key=True)


def gaussian_sketch(num_rows: int) -> OutputMetric:
  """A random sketch of the identity metric: ``k`` Gaussian rows scaled by ``1/sqrt(k)``.

  ``E[L_o^T L_o] = I``: for large outputs (autoencoders, dense regression) where ``k`` rows are
  much cheaper than one row per output. Needs a PRNG key.
  """
  if num_rows < 1:
    raise ValueError(f"num_rows={num_rows}: the sketch needs at least one row.")

  def factor(outputs, key):
    z = jax.random.normal(key, (outputs.shape[0], num_rows) + outputs.shape[1:], outputs.dtype)
    return z / jnp.sqrt(jnp.asarray(num_rows, outputs.dtype))

  return OutputMetric(f"gaussian_sketch(k={num_rows})", factor, needs_key=True)


def custom(per_sample_factor: Callable[..., jax.Array], *, name: str = "custom",
           needs_key: bool = False) -> OutputMetric:
  """A user metric from a per-sample factor ``f(y_s) -> (k, *out)`` (or ``f(y_s, key)``).

  Example:
    >>> import jax.numpy as jnp
    >>> weighted = custom(lambda y: jnp.diag(jnp.array([1.0, 2.0])))
    >>> weighted(jnp.zeros((4, 2))).shape
    (4, 2, 2)
  """
  if needs_key:
    def factor(outputs, key):
      keys = jax.random.split(key, outputs.shape[0])
      return jax.vmap(per_sample_factor)(outputs, keys)
  else:
    def factor(outputs, key):
      return jax.vmap(per_sample_factor)(outputs)
  return OutputMetric(name, factor, needs_key=needs_key)

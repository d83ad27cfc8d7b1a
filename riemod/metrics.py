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
import functools
import math
import warnings
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
    bind_loss: for metrics computed from the loss (:func:`from_loss`):
      ``(loss_fn, outputs, num_samples) -> OutputMetric`` at those outputs;
      :func:`riemod.value_grad_and_curvature` calls it through :meth:`bind`.
  """

  name: str
  factor: Callable[[jax.Array, jax.Array | None], jax.Array]
  needs_key: bool = False
  coordinates: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  bind_loss: Callable[..., "OutputMetric"] | None = None

  def bind(self, loss_fn: Callable[[jax.Array], jax.Array], outputs: jax.Array,
           num_samples: int | None = None, check: bool = True) -> "OutputMetric":
    """This metric at ``outputs`` of ``loss_fn`` (itself unless it is derived from the loss).

    Args:
      loss_fn: the batch loss ``outputs -> scalar``.
      outputs: the whole batch of outputs ``(B, *out)`` the loss is evaluated at.
      num_samples: the factor rows are for the first ``m`` samples (``None``: all ``B``).
      check: test (one more Hessian product) that the loss does not couple samples.
    """
    if self.bind_loss is None:
      return self
    return self.bind_loss(loss_fn, outputs, num_samples, check)

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


def _token_weights(outputs: jax.Array, mask: jax.Array | None, name: str) -> jax.Array | None:
  """Per (sequence, position) factor ``sqrt(w_p / mean_s sum_p w_sp)`` of outputs ``(B, *P, F)``.

  The rows of a per-token output carry it so that ``K^T K`` matches a loss that is the mean over
  the (unmasked) tokens of the batch: ``sum_{s,p} w_sp l_sp / sum_{s,p} w_sp``. ``None`` for
  outputs ``(B, F)`` without positions. The normaliser is taken over the whole mask given (it may
  cover more sequences than the outputs, as with ``curvature_batch``).
  """
  positions = outputs.shape[1:-1]
  if not positions:
    if mask is not None:
      raise ValueError(f"{name}: mask= weighs the tokens of per-token outputs (batch, tokens, "
                       f"...); these outputs have shape {outputs.shape}, with no token axis.")
    return None
  count = math.prod(positions)
  if mask is None:
    return jnp.full((outputs.shape[0],) + positions, 1 / math.sqrt(count), outputs.dtype)
  mask = jnp.asarray(mask)
  if mask.shape[1:] != positions or mask.shape[0] < outputs.shape[0]:
    raise ValueError(f"{name}: mask= has shape {mask.shape}; it must be (batch, "
                     f"{', '.join(map(str, positions))}), one weight per token of the outputs "
                     f"{outputs.shape}.")
  weights = mask.astype(outputs.dtype)
  tokens = jnp.sum(weights) / mask.shape[0]  # valid tokens per sequence, over the whole batch
  scale = jnp.where(tokens > 0, 1 / jnp.where(tokens > 0, tokens, 1), 0)
  return jnp.sqrt(weights[:outputs.shape[0]] * scale)


def _weigh(rows: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Rows ``(B, k, *P, F)`` times per-position weights ``(B, *P)``."""
  return rows if weights is None else rows * weights[:, None, ..., None]


def _unweigh(cotangent: jax.Array, weights: jax.Array | None) -> jax.Array:
  """``c / w`` per position (0 where a token's weight is 0: its cotangent is 0 too)."""
  if weights is None:
    return cotangent
  w = weights[..., None]
  return jnp.where(w > 0, cotangent / jnp.where(w > 0, w, 1), 0)


def _token_blocks(per_token: jax.Array, weights: jax.Array, out_shape: tuple[int, ...]):
  """Exact per-token rows ``(B, *P, k, F)`` as ``(B, P k, *P, F)``: row ``(p, i)`` lives at ``p``."""
  batch, k, f = per_token.shape[0], per_token.shape[-2], per_token.shape[-1]
  count = math.prod(out_shape[1:-1])
  per_token = per_token.reshape(batch, count, k, f) * weights.reshape(batch, count, 1, 1)
  eye = jnp.eye(count, dtype=per_token.dtype)
  blocks = jnp.einsum("bpkf,pq->bpkqf", per_token, eye)
  return blocks.reshape((batch, count * k) + out_shape[1:])


def identity(per_token: bool = False, *, mask: jax.Array | None = None) -> OutputMetric:
  """``M_o = I``: the Gauss-Newton metric of ``0.5 * mean_s ||r_s||^2`` (sum over outputs).

  For squared errors ``r_s = y_s - t_s``, and for any residual model (PINNs, least squares) whose
  function returns the residuals ``r`` themselves. One row per output coordinate, so ``k`` is the
  output size. A loss that averages over output coordinates too (``jnp.mean((y - t) ** 2)``) has
  the metric ``I / out_size``: declare it with a matching mass, or sum over outputs.

  Args:
    per_token: outputs ``(B, T, F)`` (any number of position axes before the last) of a loss that
      is the mean over tokens, ``0.5 * mean_{s,t} ||r_st||^2``: every token is a sample. Exact,
      ``k = T F`` rows per sequence (use :func:`gaussian_sketch` with ``per_token=True`` when
      that is large).
    mask: with ``per_token``, ``(B, T)`` token weights (``1`` real, ``0`` padding) of a loss
      ``sum_{s,t} mask_st l_st / sum mask``.

  Example:
    >>> import jax.numpy as jnp
    >>> identity()(jnp.zeros((2, 3))).shape   # (batch, rows per sample, outputs)
    (2, 3, 3)
    >>> identity(per_token=True)(jnp.zeros((2, 4, 3))).shape   # k = 4 tokens x 3 features
    (2, 12, 4, 3)
  """
  name = "identity(per_token)" if per_token else "identity"
  if not per_token:
    if mask is not None:
      raise ValueError("identity(mask=...) weighs tokens: pass per_token=True with outputs "
                       "(batch, tokens, features).")
    return OutputMetric(name, lambda outputs, key: _eye_rows(outputs),
                        coordinates=lambda outputs, c: c.reshape(c.shape[0], -1))

  def weights_of(outputs):
    if outputs.ndim < 3:
      raise ValueError(f"identity(per_token=True) expects outputs (batch, tokens, features); got "
                       f"{outputs.shape}.")
    return _token_weights(outputs, mask, name)

  def factor(outputs, key):
    return _weigh(_eye_rows(outputs), weights_of(outputs))

  def coordinates(outputs, c):
    return _unweigh(c, weights_of(outputs)).reshape(c.shape[0], -1)

  return OutputMetric(name, factor, coordinates=coordinates)


def _check_logits(outputs: jax.Array, name: str) -> None:
  if outputs.ndim < 2:
    raise ValueError(f"{name} expects logits of shape (batch, classes) or per-token logits "
                     f"(batch, tokens, classes); got {outputs.shape}.")


def softmax_fisher(*, mask: jax.Array | None = None) -> OutputMetric:
  """Exact Fisher of softmax cross-entropy: per sample, rows ``sqrt(p_i) (e_i - p)``.

  ``sum_i`` of the outer products is ``diag(p) - p p^T`` (rank ``C - 1``): the Hessian of
  ``mean_s CE(softmax(y_s), t_s)`` with respect to the logits, so the step is the exact block
  Gauss-Newton/natural gradient step.

  Per-token logits ``(B, T, C)`` (a language model; any number of position axes before the
  classes) are for the mean over tokens, ``mean_{s,t} CE_st`` (what ``jnp.mean`` of optax's
  per-token cross-entropy gives). The rows are exact per token, ``T C`` of them per sequence, each
  nonzero at its own token and scaled by ``1 / sqrt(T)``, so ``K^T K`` is the exact Gauss-Newton
  matrix; :func:`sampled_softmax_fisher` keeps ``k`` rows per sequence instead.

  Args:
    mask: for per-token logits, ``(B, T)`` weights (``1`` a real token, ``0`` padding) of the loss
      ``sum_{s,t} mask_st CE_st / sum mask``.

  Example:
    >>> import jax.numpy as jnp
    >>> softmax_fisher()(jnp.zeros((2, 4, 3))).shape   # 4 tokens x 3 classes rows per sequence
    (2, 12, 4, 3)
  """
  name = "softmax_fisher"

  def factor(logits, key):
    _check_logits(logits, name)
    p = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    eye = jnp.eye(p.shape[-1], dtype=p.dtype)
    per_token = jnp.sqrt(p)[..., :, None] * (eye - p[..., None, :])  # (B, *P, C, C)
    weights = _token_weights(logits, mask, name)
    if weights is None:
      return per_token
    return _token_blocks(per_token, weights, logits.shape)

  def coordinates(logits, cotangent):
    # sum_i e_i sqrt(p_i) (e_i - p) = c - p sum(c) = c for e = c / sqrt(p), since a
    # cross-entropy cotangent p - y sums to zero. A class with p = 0 has a zero row: its
    # coordinate is set to 0 (what remains is solved outside the rows' span). Per token, the
    # rows carry the token's weight, and so the coordinates its inverse.
    p = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    root = jnp.sqrt(p)
    e = jnp.where(root > 0, cotangent / jnp.where(root > 0, root, 1), 0)
    return _unweigh(e, _token_weights(logits, mask, name)).reshape(logits.shape[0], -1)

  return OutputMetric(name, factor, coordinates=coordinates)


def sampled_softmax_fisher(num_samples: int = 1, *, mask: jax.Array | None = None
                           ) -> OutputMetric:
  """Monte-Carlo softmax Fisher: ``k`` rows ``(e_yhat - p) / sqrt(k)``, ``yhat ~ softmax(y)``.

  The labels ``yhat`` are drawn from the model (not the data), so the expectation is
  ``diag(p) - p p^T``. Needs a PRNG key.

  Per-token logits ``(B, T, C)`` (any number of position axes before the classes): a label is
  drawn at every token, and row ``r`` of a sequence carries all its tokens' rows at once,
  ``((e_yhat_rt - p_t) / sqrt(k T))_t``. Labels at different tokens are independent with mean
  ``p_t``, so the cross-token terms vanish in expectation: the expectation is the block-diagonal
  token Fisher of ``mean_{s,t} CE_st``, with ``d = k B`` rows whatever ``T``.

  Args:
    num_samples: ``k``, labels drawn per sample (per token).
    mask: for per-token logits, ``(B, T)`` weights (``1`` a real token, ``0`` padding) of the loss
      ``sum_{s,t} mask_st CE_st / sum mask``; padded tokens contribute nothing.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> rows = sampled_softmax_fisher(2)(jnp.zeros((3, 5, 4)), jax.random.key(0))
    >>> rows.shape   # (batch, k, tokens, classes)
    (3, 2, 5, 4)
  """
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples}: draw at least one probe per sample.")
  name = f"sampled_softmax_fisher(k={num_samples})"

  def factor(logits, key):
    _check_logits(logits, "sampled_softmax_fisher")
    logits = jax.lax.stop_gradient(logits)
    p = jax.nn.softmax(logits, axis=-1)
    draws = jax.random.categorical(key, logits[:, None],
                                   shape=(logits.shape[0], num_samples) + logits.shape[1:-1])
    onehot = jax.nn.one_hot(draws, p.shape[-1], dtype=p.dtype)
    rows = (onehot - p[:, None]) / jnp.sqrt(jnp.asarray(num_samples, p.dtype))
    return _weigh(rows, _token_weights(logits, mask, "sampled_softmax_fisher"))

  return OutputMetric(name, factor, needs_key=True)


def gaussian_sketch(num_rows: int, *, per_token: bool = False,
                    mask: jax.Array | None = None) -> OutputMetric:
  """A random sketch of the identity metric: ``k`` Gaussian rows scaled by ``1/sqrt(k)``.

  ``E[L_o^T L_o] = I``: for large outputs (autoencoders, dense regression) where ``k`` rows are
  much cheaper than one row per output. Needs a PRNG key.

  Args:
    num_rows: ``k``.
    per_token: outputs ``(B, T, F)`` of a loss that is the mean over tokens (see
      :func:`identity`): rows scaled by ``1 / sqrt(T)``; their expectation is the identity
      metric of that mean, with ``d = k B`` rows whatever ``T``.
    mask: with ``per_token``, ``(B, T)`` token weights (``0`` padding).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> gaussian_sketch(2, per_token=True)(jnp.zeros((3, 5, 4)), jax.random.key(0)).shape
    (3, 2, 5, 4)
  """
  if num_rows < 1:
    raise ValueError(f"num_rows={num_rows}: the sketch needs at least one row.")
  if mask is not None and not per_token:
    raise ValueError("gaussian_sketch(mask=...) weighs tokens: pass per_token=True with outputs "
                     "(batch, tokens, features).")
  name = f"gaussian_sketch(k={num_rows}{', per_token' if per_token else ''})"

  def factor(outputs, key):
    z = jax.random.normal(key, (outputs.shape[0], num_rows) + outputs.shape[1:], outputs.dtype)
    z = z / jnp.sqrt(jnp.asarray(num_rows, outputs.dtype))
    if not per_token:
      return z
    if outputs.ndim < 3:
      raise ValueError(f"gaussian_sketch(per_token=True) expects outputs (batch, tokens, "
                       f"features); got {outputs.shape}.")
    return _weigh(z, _token_weights(outputs, mask, name))

  return OutputMetric(name, factor, needs_key=True)


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


# -- the Gauss-Newton factor of the loss itself, and the check of a declared metric's scale

# Eigenvalues of a sample's loss Hessian below this many ``size * eps * lambda_max`` are round-off
# of the Hessian-vector products (their absolute error is about eps times the largest eigenvalue).
_EIGENVALUE_RTOL = 16.0


def _loss_hessian_blocks(loss_fn: Callable[[jax.Array], jax.Array], outputs: jax.Array,
                         num_samples: int, check: bool) -> jax.Array:
  """Per-sample blocks ``H_s`` ``(m, c, c)`` of the batch loss's Hessian w.r.t. the outputs.

  One linearisation of the loss gradient, applied to ``c`` cotangents: the one-hot on output
  coordinate ``j`` of every sample at once. Samples do not interact, so column ``j`` of every
  sample's block comes out of the same product: ``c`` products in all, not ``B c``. Reverse over
  reverse (not forward over reverse) so that losses written with ``jax.custom_vjp`` work too.
  With ``check``, one more product along a random direction ``v`` tests that assumption: for a
  loss that couples samples, ``(H v)_s`` is not ``H_s v_s`` (a :class:`SampleCouplingWarning`).
  """
  y = jax.lax.stop_gradient(outputs)
  shape = y.shape[1:]
  size = math.prod(shape)
  _, hvp = jax.vjp(jax.grad(loss_fn), y)
  eye = jnp.eye(size, dtype=y.dtype).reshape((size, 1) + shape)
  # + zeros_like(y): the cotangents get the outputs' type, varying over a shard_map axis as they do.
  cotangents = eye + jnp.zeros_like(y)
  if check:
    probe = jax.random.normal(jax.random.key(20260313), y.shape, y.dtype)
    cotangents = jnp.concatenate([cotangents, (probe + jnp.zeros_like(y))[None]])
  columns = jax.vmap(lambda v: hvp(v)[0])(cotangents)
  # columns[j, s] = H_s e_j: index [j, s, i] -> [s, i, j].
  blocks = columns[:size, :num_samples].reshape(size, num_samples, size)
  blocks = jnp.moveaxis(blocks, 0, 2)
  blocks = 0.5 * (blocks + jnp.swapaxes(blocks, 1, 2))
  if check:
    actual = columns[size, :num_samples].reshape(num_samples, size)
    blocked = jnp.einsum("sij,sj->si", blocks, probe[:num_samples].reshape(num_samples, size))
    scale = jnp.linalg.norm(actual) + jnp.linalg.norm(blocked)
    off = jnp.linalg.norm(actual - blocked) / jnp.where(scale > 0, scale, 1)
    report = functools.partial(_report_coupling, _loss_label(loss_fn))
    # Round-off leaves ~eps c; a coupling that moves the blocks by less than 1e-3 is let be.
    jax.lax.cond(off > _COUPLING_RTOL, lambda e: jax.debug.callback(report, e), lambda e: None,
                 off)
  return blocks


def _bind_loss(max_outputs: int):

  def bind(loss_fn, outputs, num_samples=None, check=True):
    if not isinstance(outputs, jax.Array) or outputs.ndim < 1:
      raise ValueError("metrics.from_loss() needs the batch of outputs (B, *out) the loss is "
                       f"evaluated at; got {getattr(outputs, 'shape', type(outputs).__name__)}.")
    batch, shape = outputs.shape[0], outputs.shape[1:]
    size = math.prod(shape)
    m = batch if num_samples is None else num_samples
    if size > max_outputs:
      raise ValueError(
          f"metrics.from_loss() forms the {size} x {size} loss Hessian of every sample ({size} "
          f"Hessian-vector products and {m} eigendecompositions per step); that is above "
          f"max_outputs={max_outputs}. Use a closed-form metric (identity(), softmax_fisher()) or "
          "random rows (sampled_softmax_fisher(k), gaussian_sketch(k)), or raise max_outputs.")
    lam, vec = jnp.linalg.eigh(_loss_hessian_blocks(loss_fn, outputs, m, check))  # vec[s, :, i]
    eps, tiny = jnp.finfo(lam.dtype).eps, jnp.finfo(lam.dtype).tiny
    keep = lam > jnp.maximum(_EIGENVALUE_RTOL * size * eps * lam[:, -1:], tiny)
    # L_s^T L_s = B H_s: value_grad_and_curvature divides the rows by sqrt(B) (sqrt(m) for a
    # sub-batch, an estimate of the same mean), so K^T K is the Gauss-Newton matrix of the loss.
    root = jnp.where(keep, jnp.sqrt(jnp.where(keep, batch * lam, 1)), 0)  # (m, c)
    rows = (root[:, :, None] * jnp.swapaxes(vec, 1, 2)).reshape((m, size) + shape)

    def factor(out, key):
      if out.shape[0] != m:
        raise ValueError(f"This from_loss() metric was bound to {m} samples; got outputs of "
                         f"shape {out.shape}. Bind it again at these outputs.")
      return rows

    def coordinates(out, cotangent):
      # L_s^T e_s = sum_i e_si sqrt(B lam_i) q_i = c_s on the kept directions: a pseudo-inverse.
      # What the dropped (negative or round-off) directions hold is left to the remainder.
      proj = jnp.einsum("sji,sj->si", vec, cotangent.reshape(m, size))
      return jnp.where(keep, proj / jnp.where(keep, root, 1), 0)

    return OutputMetric("from_loss", factor, coordinates=coordinates, bind_loss=bind)

  return bind


def from_loss(*, max_outputs: int = 1024) -> OutputMetric:
  """The loss's own Gauss-Newton factor: per sample, the factor of its loss Hessian w.r.t. y_s.

  With ``H_s = Q diag(lambda) Q^T`` the block of the batch loss's Hessian for sample ``s`` (the
  Hessian w.r.t. the outputs, found by ``c`` Hessian-vector products of ``loss_fn`` with a one-hot
  cotangent on output ``j`` of every sample at once, then one ``c x c`` eigendecomposition per
  sample), the rows are ``sqrt(B lambda_i) q_i``, negative eigenvalues set to 0. Divided by
  ``sqrt(B)`` as :func:`riemod.value_grad_and_curvature` does, ``K^T K = sum_s J_s^T H_s J_s``: the
  generalised Gauss-Newton matrix of ``loss_fn`` exactly as written, whatever its reduction (mean or
  sum over samples, mean or sum over outputs) and whatever the loss (squared error,
  cross-entropy, where it equals :func:`softmax_fisher`, Huber, log-cosh, ...). The coordinates of
  the loss cotangent (a pseudo-inverse on the kept eigen-directions) give the range-aware solve.

  It is the default ``output_metric`` of :func:`riemod.value_grad_and_curvature`, which binds it to
  ``loss_fn`` and the batch's outputs: the factor depends on the loss and only that function knows
  it, so the marker is resolved there (one home; no second copy of ``loss_fn`` to keep in sync).
  Outside it, :meth:`OutputMetric.bind` binds it explicitly.

  Assumes samples do not interact in the loss (a sum of per-sample terms, as a mean over the batch
  is). Costs ``c`` products with the loss Hessian and ``B`` eigendecompositions of ``c x c``
  (``c`` the output size per sample): negligible next to the model for classifiers and regressors;
  above ``max_outputs`` it is refused with the alternatives named.

  Args:
    max_outputs: the largest output size per sample it accepts.

  Example:
    >>> import jax.numpy as jnp
    >>> y = jnp.zeros((2, 4))
    >>> metric = from_loss().bind(lambda y: jnp.mean((y - 1.0) ** 2), y)  # all-element mean
    >>> rows = metric(y)
    >>> rows.shape   # (batch, rows per sample, outputs)
    (2, 4, 4)
    >>> bool(jnp.allclose(rows[0].T @ rows[0], 0.5 * jnp.eye(4)))  # B times the block 2 I / (B C)
    True
  """
  if not isinstance(max_outputs, int) or max_outputs < 1:
    raise ValueError(f"max_outputs={max_outputs!r}: use a positive int.")

  def unbound(outputs, key):
    raise ValueError("metrics.from_loss() is computed from loss_fn: pass it (or nothing, it is "
                     "the default) as output_metric to riemod.value_grad_and_curvature, which "
                     "knows the loss, or bind it first: metrics.from_loss().bind(loss_fn, outputs).")

  return OutputMetric("from_loss", unbound, bind_loss=_bind_loss(max_outputs))


class MetricScaleWarning(UserWarning):
  """A declared output metric is a constant multiple of the loss's Gauss-Newton factor, not it.

  Silence it with ``check_metric=False`` in :func:`riemod.value_grad_and_curvature` (which also
  skips the probe), or ``warnings.filterwarnings("ignore", category=MetricScaleWarning)``.
  """


# The loss each exact metric is the Gauss-Newton factor of, as the warning states it.
_ASSUMES = {
    "identity": "0.5 * (mean over samples of the sum over outputs of r**2), r the residuals",
    "softmax_fisher": "the mean over samples of the cross-entropy of softmax(y)",
}
_SCALE_RTOL = 1e-2
_COUPLING_RTOL = 1e-3
_warned: set[tuple[str, object]] = set()


def _loss_label(loss_fn: Callable) -> tuple[object, str]:
  """``(identity, name)`` of ``loss_fn``; the identity is its code object, the same for every
  re-creation of one lambda (a loss closed over each step's targets warns once, not per step)."""
  fn = loss_fn
  while hasattr(fn, "func"):  # functools.partial
    fn = fn.func
  code = getattr(fn, "__code__", None)
  if code is None:
    return type(fn), type(fn).__qualname__
  name = getattr(fn, "__qualname__", code.co_name)
  return code, f"{name} ({code.co_filename}:{code.co_firstlineno})"


def _reasons(factor: float, batch: int, size: int) -> list[tuple[str, str]] | None:
  """Which common reductions explain ``factor``: ``[(what loss_fn does, the fix), ...]``."""
  parts = [
      [(1.0, None), (float(batch), ("sums over the batch (a .sum() loss, factor B = {batch})",
                                    "average over the samples (jnp.mean over axis 0); riemod "
                                    "scales the rows for a batch mean"))],
      [(1.0, None), (1.0 / size, ("averages over the {size} outputs too (an all-element mean, "
                                  "factor 1/{size})", "sum over the output axes, e.g. "
                                  "0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))"))],
      [(1.0, None), (2.0, ("has no factor 0.5 (factor 2)", "multiply the loss by 0.5"))],
  ]
  for a in parts[0]:
    for b in parts[1]:
      for c in parts[2]:
        if (batch == 1 and a[1]) or (size == 1 and b[1]):
          continue
        value = a[0] * b[0] * c[0]
        if value != 1.0 and abs(factor / value - 1) <= _SCALE_RTOL:
          return [tuple(text.format(batch=batch, size=size) for text in p[1])
                  for p in (a, b, c) if p[1]]
  return None


class SampleCouplingWarning(UserWarning):
  """``loss_fn`` couples samples: its Hessian w.r.t. the outputs is not block diagonal.

  Silence it like :class:`MetricScaleWarning`.
  """


def _report_coupling(loss: tuple[object, str], off) -> None:
  if ("coupling", loss[0]) in _warned:
    return
  _warned.add(("coupling", loss[0]))
  warnings.warn(
      f"loss_fn {loss[1]} couples the samples: its Hessian w.r.t. the outputs is not block "
      f"diagonal over the batch (along a random probe the per-sample blocks are {float(off):.2g} "
      "relative off the whole Hessian). metrics.from_loss(), like every output metric, is a "
      "per-sample factor and assumes a sum (or mean) of per-sample terms; for a loss with batch "
      "statistics (normalised over the batch, contrastive) its rows are not this loss's "
      "Gauss-Newton factor. Write the loss per sample, or declare a metric on purpose "
      "(identity(), softmax_fisher()). Silence: check_metric=False in value_grad_and_curvature, "
      "or warnings.filterwarnings('ignore', category=riemod.metrics.SampleCouplingWarning).",
      SampleCouplingWarning, stacklevel=2)


def _constant_factor(loss_form: jax.Array, metric_form: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(mismatch, factor)``: whether the loss's quadratic forms along the two probes are one
  constant ``factor != 1`` times the metric's."""
  ratios = loss_form / jnp.where(metric_form > 0, metric_form, 1)
  # A zero or invalid probe (a saturated softmax, a non-finite loss) says nothing.
  valid = jnp.all(jnp.isfinite(loss_form) & jnp.isfinite(metric_form) & (metric_form > 0)
                  & (ratios > 0))
  # Ratios that disagree: not a multiple, another metric chosen on purpose (identity for Huber).
  constant = jnp.abs(ratios[0] / jnp.where(valid, ratios[1], 1) - 1) <= _SCALE_RTOL
  factor = jnp.sqrt(jnp.abs(ratios[0] * ratios[1]))
  return valid & constant & (jnp.abs(factor - 1) > _SCALE_RTOL), factor


def _report_scale(name: str, loss: tuple[object, str], batch: int, size: int, factor) -> None:
  factor = float(factor)
  if abs(factor - 1) <= _SCALE_RTOL or (name, loss[0]) in _warned:
    return
  _warned.add((name, loss[0]))
  reasons = _reasons(factor, batch, size)
  assumes = _ASSUMES.get(name, "its own scale")
  if reasons:
    what = "; ".join(r[0] for r in reasons)
    fixes = " and ".join(r[1] for r in reasons)
    explain = f"loss_fn {what}. Fix: {fixes}, or"
  else:
    explain = f"Fix: multiply loss_fn by {1 / factor:.4g}, or"
  warnings.warn(
      f"metrics.{name}() is the Gauss-Newton factor of {assumes}, but the Hessian of loss_fn "
      f"{loss[1]} w.r.t. the outputs is {factor:.4g} times this metric (measured along two probe "
      f"directions). With a small mass the steps are up to {factor:.4g}x the Gauss-Newton steps of "
      f"this loss. {explain} pass output_metric=riemod.metrics.from_loss() (the loss's own factor, "
      "the default). Silence: check_metric=False in value_grad_and_curvature, or "
      "warnings.filterwarnings('ignore', category=riemod.metrics.MetricScaleWarning).",
      MetricScaleWarning, stacklevel=2)


def check_scale(metric: OutputMetric, loss_fn: Callable[[jax.Array], jax.Array],
                outputs: jax.Array, rows: jax.Array) -> None:
  """Warns once when a metric claiming to be the loss's Gauss-Newton factor is off by a constant.

  A metric with :attr:`OutputMetric.coordinates` (``identity()``, ``softmax_fisher()``) claims
  ``L_s^T L_s / B`` is the loss's Hessian block ``H_s``. The check compares the two quadratic
  forms along two fixed random probe directions (one product of the loss Hessian with two
  vectors, and the rows already at hand): when both ratios agree, the loss is that constant times
  the loss the metric assumes, and a :class:`MetricScaleWarning` names the factor, the likely
  reduction (``.sum()`` over the batch: ``B``; an all-element mean: ``1/c``; no ``0.5``: ``2``)
  and the fix. Ratios that disagree mean another metric chosen on purpose (identity for a Huber
  loss): no warning. Runs eagerly and under ``jax.jit`` (the decision on the device, a
  ``jax.debug.callback`` only when there is a mismatch); warns once per metric and loss function.

  Args:
    metric: the output metric used.
    loss_fn: the batch loss.
    outputs: the whole batch of outputs ``(B, *out)``.
    rows: the metric's unscaled rows for the first ``m <= B`` samples ``(m, k, *out)``.
  """
  if metric.coordinates is None or metric.bind_loss is not None:
    return  # random rows claim an expectation only; from_loss() is the loss's factor by construction
  y = jax.lax.stop_gradient(outputs)
  rows = jax.lax.stop_gradient(rows)
  batch, m, size = y.shape[0], rows.shape[0], math.prod(y.shape[1:])
  probes = jax.random.normal(jax.random.key(20260312), (2, m, size), y.dtype)
  padded = jnp.concatenate([probes, jnp.zeros((2, batch - m, size), y.dtype)], axis=1)
  padded = padded.reshape((2,) + y.shape) + jnp.zeros_like(y)  # the outputs' type (shard_map)
  _, hvp = jax.vjp(jax.grad(loss_fn), y)
  loss_form = jax.vmap(lambda v: jnp.vdot(v, hvp(v)[0]))(padded)
  projected = jnp.einsum("skc,psc->psk", rows.reshape(m, rows.shape[1], size), probes)
  metric_form = jnp.sum(projected ** 2, axis=(1, 2)) / batch
  mismatch, factor = _constant_factor(loss_form, metric_form)
  report = functools.partial(_report_scale, metric.name, _loss_label(loss_fn), batch, size)
  # The host is called only when there is something to say: a metric that matches costs two
  # products with the loss Hessian and no round trip.
  jax.lax.cond(mismatch, lambda f: jax.debug.callback(report, f), lambda f: None, factor)

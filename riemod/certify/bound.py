"""The algorithmic-stability bound ``O(kappa^2 L / (xi mu sqrt(n)))`` with measured constants.

The paper (Pehle & Slotine, arXiv 2603.03610) states a uniform-stability bound of this order; its
exact theorem is not known to riemod. riemod's reading, evaluated with constants measured at the
certified batch::

    beta = kappa^2 * L / (xi * mu * sqrt(n))

* ``kappa``: the composed parameter-Lipschitz constant of the network, ``sup_s ||dy/dw (x_s)||``
  over the batch (the feature-map norm that plays the role of ``kappa`` in Bousquet & Elisseeff's
  bound for regularised kernel methods);
* ``L``: the Lipschitz constant of the loss gradient with respect to one sample's outputs, the
  largest eigenvalue of the per-sample output Hessian, by power iteration;
* ``xi``: read as the reciprocal of the metric's condition-number bound,
  ``xi = 1 / max_a (lam_max(G_a) / min mass_a)``, so that an ill-conditioned metric enlarges the
  bound (the conservative reading of "a bound on the condition number");
* ``mu``: the smallest mass (times the guard's mass scale), the regulariser;
* ``n``: the training-set size (the batch size when it is not given).

The value is a diagnostic of order, not a proven constant: it is meaningful for comparing runs
(masses, widths, data sizes), not as an absolute generalisation guarantee.

References:
  Bousquet & Elisseeff, *Stability and generalization*, JMLR 2 (2002).
  Kozachkov, Wensing & Slotine, *Generalization as dynamical robustness* (contraction at rate
  ``lam`` gives uniform stability ``O(1 / (lam n))``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

FORMULA = "beta = kappa^2 * L / (xi * mu * sqrt(n))"


class StabilityBound(NamedTuple):
  """The bound and every constant in it, each with how it was measured."""

  value: float
  kappa: float
  loss_gradient_lipschitz: float
  xi: float
  condition_bound: float
  mu: float
  n: int
  formula: str
  measured: dict

  def to_dict(self) -> dict:
    return {"value": self.value, "formula": self.formula, "constants": {
        "kappa": self.kappa, "L": self.loss_gradient_lipschitz, "xi": self.xi,
        "condition_bound": self.condition_bound, "mu": self.mu, "n": self.n},
            "measured": dict(self.measured)}


def stability_bound(kappa: float, loss_gradient_lipschitz: float, condition_bound: float,
                    mu: float, n: int, *, measured: dict | None = None) -> StabilityBound:
  """Evaluates ``kappa^2 L / (xi mu sqrt(n))`` with ``xi = 1 / condition_bound``.

  Example:
    >>> round(stability_bound(2.0, 0.5, 10.0, 1e-2, 100).value, 6)
    200.0
  """
  for name, value in (("kappa", kappa), ("loss_gradient_lipschitz", loss_gradient_lipschitz),
                      ("condition_bound", condition_bound), ("mu", mu)):
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"{name}={value!r}: the stability bound needs a finite non-negative value.")
  if condition_bound < 1.0 or mu <= 0:
    raise ValueError(f"condition_bound={condition_bound!r} must be >= 1 and mu={mu!r} > 0.")
  if int(n) < 1:
    raise ValueError(f"n={n!r}: the training-set size must be a positive integer.")
  xi = 1.0 / condition_bound
  value = kappa ** 2 * loss_gradient_lipschitz / (xi * mu * math.sqrt(int(n)))
  return StabilityBound(value, kappa, loss_gradient_lipschitz, xi, condition_bound, mu, int(n),
                        FORMULA, measured or {})


class MeasuredStability(NamedTuple):
  """Two runs on datasets that differ in one sample, and how far apart they end.

  Attributes:
    parameter_distance: ``||w_K - w'_K||`` (Euclidean, all parameters) after the last step.
    distances: ``||w_k - w'_k||`` after every step ``k = 1..K``.
    loss_difference: ``max_z |l(w_K, z) - l(w'_K, z)|`` over the original dataset (the quantity
      uniform stability bounds), or ``None`` without ``sample_loss``.
    index: the replaced sample.
    num_steps: ``K``.
  """

  parameter_distance: float
  distances: tuple
  loss_difference: float | None
  index: int
  num_steps: int

  def to_dict(self) -> dict:
    return {"parameter_distance": self.parameter_distance,
            "loss_difference": self.loss_difference, "index": self.index,
            "num_steps": self.num_steps, "distances": list(self.distances),
            "how": "two runs from the same start with the same batch order on datasets that "
                   "differ in one sample; Euclidean parameter distance"}


def measured_stability(train_step: Callable, params: Any, opt_state: Any, data: Any, index: int,
                       *, num_steps: int, replacement: Any = None, batch_size: int | None = None,
                       batch_indices: Any = None, key: jax.Array | None = None,
                       sample_loss: Callable | None = None,
                       progress: bool = False) -> MeasuredStability:
  """Measures algorithmic stability: train twice, on ``data`` and on ``data`` with one sample
  replaced, and report how far apart the parameters end.

  The two runs start from the same ``params`` and ``opt_state`` and see the same batch order, so
  their distance is caused by the replaced sample alone. This is the figure a uniform-stability
  bound (:func:`stability_bound`) promises to bound; printing both shows how loose the bound is.

  Args:
    train_step: ``(params, opt_state, batch) -> (params, opt_state, loss)``, with ``batch`` a
      pytree like ``data`` whose leading axis is the batch (jit it; both runs reuse the compiled
      step).
    params, opt_state: the common start.
    data: a pytree of arrays with a leading sample axis ``n`` (e.g. ``(x, y)``).
    index: the sample to replace (``0 <= index < n``).
    num_steps: training steps ``K`` (>= 1).
    replacement: the new sample (a pytree like one sample of ``data``); default: a copy of sample
      ``(index + 1) % n``.
    batch_size: minibatch size; ``None`` trains on the whole dataset every step.
    batch_indices: an explicit ``(K, batch)`` integer array of sample indices (overrides
      ``batch_size`` and ``key``), e.g. the batches of a run being certified.
    key: PRNG key for the minibatch order (default ``jax.random.key(0)``).
    sample_loss: optional ``(params, data) -> (n,)`` per-sample losses; then the report adds
      ``max_z |l(w_K, z) - l(w'_K, z)|`` over the original dataset.
    progress: show a tqdm bar over the steps.

  Returns:
    A :class:`MeasuredStability`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> x = jnp.array([[1.0], [2.0], [3.0]]); y = jnp.array([1.0, 2.0, 3.0])
    >>> loss = lambda w, d: 0.5 * jnp.mean((d[0] @ w - d[1]) ** 2)
    >>> def step(w, s, d):
    ...   value, g = jax.value_and_grad(loss)(w, d)
    ...   return w - 0.1 * g, s, value
    >>> m = measured_stability(jax.jit(step), jnp.zeros(1), None, (x, y), 2, num_steps=200,
    ...                        replacement=(jnp.array([3.0]), jnp.array(6.0)))
    >>> round(m.parameter_distance, 4)      # least squares: w* = 1 against 23/14
    0.6429
  """
  leaves = jax.tree.leaves(data)
  if not leaves:
    raise ValueError("data must hold at least one array with a leading sample axis.")
  n = int(leaves[0].shape[0])
  if any(int(l.shape[0]) != n for l in leaves):
    raise ValueError("every array in data needs the same leading sample axis.")
  if not 0 <= int(index) < n:
    raise ValueError(f"index={index!r}: pick a sample in [0, {n}).")
  if int(num_steps) < 1:
    raise ValueError(f"num_steps={num_steps!r}: train at least one step.")
  index, num_steps = int(index), int(num_steps)
  if replacement is None:
    replacement = jax.tree.map(lambda a: a[(index + 1) % n], data)
  sample = jax.tree.map(lambda a: a[index], data)
  if (jax.tree.structure(replacement) != jax.tree.structure(sample) or any(
      jnp.shape(r) != jnp.shape(a) for r, a in zip(jax.tree.leaves(replacement),
                                                  jax.tree.leaves(sample)))):
    raise ValueError(f"replacement must be one sample shaped like data[{index}]: "
                     f"{jax.tree.map(jnp.shape, sample)}; got "
                     f"{jax.tree.map(jnp.shape, replacement)}.")
  other = jax.tree.map(lambda a, r: jnp.asarray(a).at[index].set(r), data, replacement)
  if batch_indices is None:
    if batch_size is None:
      batch_indices = np.broadcast_to(np.arange(n), (num_steps, n))
    else:
      if not 1 <= int(batch_size) <= n:
        raise ValueError(f"batch_size={batch_size!r}: use 1..{n} or None for the whole dataset.")
      key = jax.random.key(0) if key is None else key
      batch_indices = np.stack([np.asarray(jax.random.choice(
          jax.random.fold_in(key, k), n, (int(batch_size),), replace=False))
                                for k in range(num_steps)])
  batch_indices = np.asarray(batch_indices)
  if batch_indices.ndim != 2 or batch_indices.shape[0] < num_steps:
    raise ValueError(f"batch_indices must have shape (num_steps={num_steps}, batch); got "
                     f"{batch_indices.shape}.")
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_steps, desc="stability: two runs, one sample replaced", unit="step")
  ravel = lambda tree: ravel_pytree(tree)[0]
  w, s, w2, s2 = params, opt_state, params, opt_state
  distances = []
  for k in range(num_steps):
    idx = jnp.asarray(batch_indices[k])
    w, s, _ = train_step(w, s, jax.tree.map(lambda a: a[idx], data))
    w2, s2, _ = train_step(w2, s2, jax.tree.map(lambda a: a[idx], other))
    distances.append(float(jnp.linalg.norm(ravel(w) - ravel(w2))))
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  if not math.isfinite(distances[-1]):
    raise FloatingPointError("measured_stability: a run produced NaN or inf parameters (the step "
                             "diverges; lower the learning rate).")
  loss_difference = None
  if sample_loss is not None:
    loss_difference = float(jnp.max(jnp.abs(sample_loss(w, data) - sample_loss(w2, data))))
  return MeasuredStability(distances[-1], tuple(distances), loss_difference, index, num_steps)

"""A guard for natural-gradient steps: Levenberg-Marquardt mass adaptation and step rejection.

Each step ``s`` (the inner transform's update, learning rate included) is checked against the
quadratic model of the loss in the metric ``G`` it was solved with::

    predicted = -(g^T s + 0.5 s^T G s)        actual = l(w) - l(w + s)        rho = actual / predicted

(``G s`` by ``ComposedMetric.matvec``; under ``jit`` the factorisation it would build is unused and
removed). Levenberg-Marquardt rule: ``rho < lower`` multiplies the mass scale by ``increase``
(more damping, shorter steps), ``rho > upper`` multiplies it by ``decrease``. A step whose
certificate fails (the new loss is not finite, the model predicts no decrease, or
``rho < reject_below``) is rejected: the update is zero, the parameters are unchanged and the inner
state is rolled back; only the guard's counters and mass scale move.

With ``s = -eta G^{-1} g`` the model predicts ``eta (1 - eta / 2) g^T G^{-1} g``: a decrease only
for ``eta < 2``. Use the guard with learning rates below 2 (natural-gradient steps are usually
``<= 1``); with ``eta >= 2`` every step is rejected, whatever the mass.

The guard is a wrapper: the plain transforms are untouched, so it costs nothing when not used. When
used it costs one extra loss evaluation (``value_fn``) and one metric product per step.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610);
the reduction-ratio rule is the classical Levenberg-Marquardt trust-region update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemod.composer.metric import STRUCTURES, compose_metric


class GuardState(NamedTuple):
  """State of :func:`guarded`.

  Attributes:
    mass_scale: the factor on every mass, adapted by the reduction ratio.
    rejected_steps: steps rejected (parameters unchanged).
    adapted_steps: steps after which the mass scale changed.
    last_ratio: the latest reduction ratio ``rho``.
    inner_state: the wrapped transform's state.
  """

  mass_scale: jax.Array
  rejected_steps: jax.Array
  adapted_steps: jax.Array
  last_ratio: jax.Array
  inner_state: Any


def _scaled_curvature(curvature: Any, mass: float, scale: jax.Array, updates: Any) -> Any:
  """The curvature with every module's mass (declared or default) multiplied by ``scale``."""
  leaves = jax.tree.leaves(updates)
  modules = []
  for module in curvature.modules:
    dtype = leaves[module.leaf_indices[0]].dtype
    masses = module.mass if module.mass is not None else {
        name: jnp.asarray(mass, dtype) for name in module.leaf_names}
    modules.append(dataclasses.replace(
        module, mass={k: (v * scale).astype(dtype) for k, v in masses.items()}))
  return dataclasses.replace(curvature, modules=tuple(modules))


def guarded(
    inner: optax.GradientTransformation,
    *,
    mass: float,
    structure: str = "layerwise",
    space: str = "auto",
    lower: float = 0.25,
    upper: float = 0.75,
    increase: float = 2.0,
    decrease: float = 0.5,
    reject_below: float = 0.0,
    min_scale: float = 1e-4,
    max_scale: float = 1e6,
) -> optax.GradientTransformationExtraArgs:
  """Wraps a riemod natural-gradient transform with LM mass adaptation and step rejection.

  Args:
    inner: e.g. ``riemod.layerwise_natural_gradient(lr, mass)`` (its output must be the step).
    mass: the inner transform's default mass (the guard scales it).
    structure: the inner transform's structure (``"layerwise"`` or ``"full"``), for ``G s``.
    space: solve space of the metric (only its products are used).
    lower, upper: reduction-ratio thresholds of the LM rule.
    increase, decrease: mass-scale factors for ``rho < lower`` and ``rho > upper``.
    reject_below: a step with ``rho < reject_below`` is rejected (0: reject loss increases).
    min_scale, max_scale: the mass scale stays in this range.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``curvature=``, ``value=`` (the
    loss at ``params``) and ``value_fn=`` (``params -> loss`` on the same batch).

  Example:
    >>> import jax.numpy as jnp, optax, riemod
    >>> f = lambda p, x: x @ p["w"]
    >>> params, x = {"w": jnp.zeros((2, 1))}, jnp.eye(2)
    >>> loss_of = lambda p: 0.5 * jnp.mean((f(p, x) - 1.0) ** 2)
    >>> tx = guarded(riemod.layerwise_natural_gradient(1.0, mass=1e-2), mass=1e-2)
    >>> state = tx.init(params)
    >>> loss, g, curv = riemod.value_grad_and_curvature(
    ...     f, x, lambda y: 0.5 * jnp.mean((y - 1.0) ** 2), riemod.metrics.identity(), params=params)
    >>> u, state = tx.update(g, state, params, curvature=curv, value=loss, value_fn=loss_of)
    >>> int(state.rejected_steps)
    0
  """
  if structure not in STRUCTURES:
    raise ValueError(f"structure={structure!r}: use one of {STRUCTURES}.")
  if not (isinstance(mass, (int, float)) and mass > 0):
    raise ValueError(f"mass={mass!r}: pass the inner transform's default mass (> 0).")
  if not (0 <= lower < upper) or not (increase > 1 > decrease > 0):
    raise ValueError("Need 0 <= lower < upper and increase > 1 > decrease > 0 (LM rule).")
  if not 0 < min_scale <= 1 <= max_scale:
    raise ValueError("Need 0 < min_scale <= 1 <= max_scale.")

  def init_fn(params):
    dtype = jnp.result_type(float)
    return GuardState(jnp.ones((), dtype), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                      jnp.full((), jnp.nan, dtype), inner.init(params))

  def update_fn(updates, state, params=None, *, curvature=None, value=None,
                value_fn: Callable[[Any], jax.Array] | None = None, **extra_args):
    if curvature is None:
      raise ValueError("guarded(...) needs curvature= (from riemod.value_grad_and_curvature).")
    if params is None or value is None or value_fn is None:
      raise ValueError("guarded(...) needs params, value= (the loss at params) and value_fn= "
                       "(params -> loss on the same batch) to measure the actual reduction; "
                       "e.g. tx.update(grads, state, params, curvature=c, value=loss, "
                       "value_fn=loss_of_params).")
    scale = state.mass_scale
    scaled = _scaled_curvature(curvature, mass, scale, updates)
    step, inner_state = inner.update(updates, state.inner_state, params, curvature=scaled,
                                     value=value, **extra_args)
    metric = compose_metric(scaled, mass=mass, structure=structure, space=space)
    g_step = metric.matvec(step)
    dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    predicted = -(dot(updates, step) + 0.5 * dot(step, g_step))
    new_value = value_fn(optax.apply_updates(params, step))
    actual = value - new_value
    dtype = state.last_ratio.dtype
    ratio = jnp.where(predicted > 0, actual / jnp.where(predicted > 0, predicted, 1.0),
                      -jnp.inf).astype(dtype)
    ratio = jnp.where(jnp.isfinite(new_value), ratio, -jnp.inf).astype(dtype)
    accept = ratio >= reject_below
    new_scale = jnp.where(ratio < lower, scale * increase,
                          jnp.where(ratio > upper, scale * decrease, scale))
    new_scale = jnp.clip(new_scale, min_scale, max_scale).astype(scale.dtype)
    step = jax.tree.map(lambda s: jnp.where(accept, s, jnp.zeros_like(s)), step)
    inner_state = jax.tree.map(lambda new, old: jnp.where(accept, new, old), inner_state,
                               state.inner_state)
    return step, GuardState(new_scale,
                            state.rejected_steps + (~accept).astype(jnp.int32),
                            state.adapted_steps + (new_scale != scale).astype(jnp.int32),
                            ratio, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

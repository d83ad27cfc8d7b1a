"""A guard for natural-gradient steps: Levenberg-Marquardt mass adaptation and step rejection.

Each step ``s`` (the inner transform's update, learning rate included) is checked against the
quadratic model of the loss in the metric ``G`` it was solved with::

    predicted = -(g^T s + 0.5 s^T G s)        actual = l(w) - l(w + s)        rho = actual / predicted

(``G s`` by ``ComposedMetric.matvec`` of the geometry's own ``G``; under ``jit`` the factorisation
it would build is unused and removed). Levenberg-Marquardt rule: ``rho < lower`` multiplies the mass scale by ``increase``
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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemod.composer.geometry import Geometry
from riemod.state import find_state
from riemod.transforms import MetricState


class GuardState(NamedTuple):
  """State of :func:`guarded`.

  The mass scale itself lives in the inner transform's geometry state
  (``riemod.find_state(state, riemod.MetricState).geometry.mass_scale``), where the inner step,
  the certificates and the samplers all read it.

  Attributes:
    rejected_steps: steps rejected (parameters unchanged).
    adapted_steps: steps after which the mass scale changed.
    last_ratio: the latest reduction ratio ``rho``.
    inner_state: the wrapped transform's state.
  """

  rejected_steps: jax.Array
  adapted_steps: jax.Array
  last_ratio: jax.Array
  inner_state: Any


def _with_mass_scale(opt_state: Any, scale: jax.Array) -> Any:
  """``opt_state`` with the geometry's mass scale set to ``scale`` (every MetricState inside)."""
  def visit(node):
    if isinstance(node, MetricState):
      return node._replace(geometry=node.geometry._replace(
          mass_scale=scale.astype(node.geometry.mass_scale.dtype)))
    return node
  return jax.tree.map(visit, opt_state, is_leaf=lambda n: isinstance(n, MetricState))


def guarded(
    inner: optax.GradientTransformation,
    geometry: Geometry,
    *,
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
    inner: e.g. ``riemod.layerwise_natural_gradient(lr, geometry=geometry)`` (its output must be
      the step).
    geometry: the inner transform's :class:`~riemod.Geometry`: ``G s`` is computed with the very
      ``G`` the inner step was solved with (adaptive masses and schedules included).
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
    >>> geometry = riemod.Geometry(mass=1e-2)
    >>> tx = guarded(riemod.layerwise_natural_gradient(1.0, geometry=geometry), geometry)
    >>> state = tx.init(params)
    >>> loss, g, curv = riemod.value_grad_and_curvature(
    ...     f, x, lambda y: 0.5 * jnp.mean((y - 1.0) ** 2), riemod.metrics.identity(), params=params)
    >>> u, state = tx.update(g, state, params, curvature=curv, value=loss, value_fn=loss_of)
    >>> int(state.rejected_steps)
    0
  """
  if not isinstance(geometry, Geometry):
    raise TypeError(f"geometry={geometry!r}: pass the riemod.Geometry of the inner transform.")
  if not (0 <= lower < upper) or not (increase > 1 > decrease > 0):
    raise ValueError("Need 0 <= lower < upper and increase > 1 > decrease > 0 (LM rule).")
  if not 0 < min_scale <= 1 <= max_scale:
    raise ValueError("Need 0 < min_scale <= 1 <= max_scale.")

  def init_fn(params):
    state = inner.init(params)
    if find_state(state, MetricState) is None:
      raise ValueError("guarded(...) wraps a transform with riemod.scale_by_metric inside (e.g. "
                       "riemod.layerwise_natural_gradient); this one has none.")
    dtype = jnp.result_type(float)
    return GuardState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                      jnp.full((), jnp.nan, dtype), state)

  def update_fn(updates, state, params=None, *, curvature=None, value=None,
                value_fn: Callable[[Any], jax.Array] | None = None, **extra_args):
    if curvature is None:
      raise ValueError("guarded(...) needs curvature= (from riemod.value_grad_and_curvature).")
    if params is None or value is None or value_fn is None:
      raise ValueError("guarded(...) needs params, value= (the loss at params) and value_fn= "
                       "(params -> loss on the same batch) to measure the actual reduction; "
                       "e.g. tx.update(grads, state, params, curvature=c, value=loss, "
                       "value_fn=loss_of_params).")
    scale = find_state(state.inner_state, MetricState).geometry.mass_scale
    step, inner_state = inner.update(updates, state.inner_state, params, curvature=curvature,
                                     value=value, **extra_args)
    # The G the inner step was solved with (under jit its unused factorisation is removed).
    metric = geometry.compose(curvature, find_state(inner_state, MetricState).geometry)
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
    return step, GuardState(state.rejected_steps + (~accept).astype(jnp.int32),
                            state.adapted_steps + (new_scale != scale).astype(jnp.int32),
                            ratio, _with_mass_scale(inner_state, new_scale))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

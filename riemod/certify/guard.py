"""Levenberg-Marquardt mass adaptation: the guard, and the rule judged on the step taken.

**The guard** (:func:`guarded`). Each step ``s`` (the inner transform's update, learning rate included) is checked against the
quadratic model of the loss in the metric ``G`` it was solved with::

    predicted = -(g^T s + 0.5 s^T G s)        actual = l(w) - l(w + s)        rho = actual / predicted

(``G s`` by ``ComposedMetric.matvec`` of the geometry's own ``G``; under ``jit`` the
factorisation it would build is unused and removed). Levenberg-Marquardt rule: ``rho < lower``
multiplies the mass scale by ``increase`` (more damping, shorter steps), ``rho > upper`` multiplies it by ``decrease``. A step whose
certificate fails (the new loss is not finite, the model predicts no decrease, or
``rho < reject_below``) is rejected: the update is zero, the parameters are unchanged and the inner
state is rolled back, SPRING momentum restarted; only the guard's counters and mass scale move.

With ``s = -eta G^{-1} g`` the model predicts ``eta (1 - eta / 2) g^T G^{-1} g``: a decrease only
for ``eta < 2``. Use the guard with learning rates below 2 (natural-gradient steps are usually
``<= 1``); with ``eta >= 2`` every step is rejected, whatever the mass.

The guard is a wrapper: the plain transforms are untouched, so it costs nothing when not used. When
used it costs one extra loss evaluation (``value_fn``) and one metric product per step.

**Judged on the step taken** (:func:`levenberg_marquardt`). It wraps a natural-gradient
transform, usually chained with :func:`riemod.scale_by_grid_linesearch`, and adapts the geometry's mass scale after every step from
how well the quadratic model of the loss predicted that step. For the gradient ``g``, the metric
``G`` the step was solved with and the final step ``s`` (line search included), the model along
``s`` is ``m(t) = t g^T s + t^2 s^T G s / 2``; its best decrease along the line is

    best = (g^T s)^2 / (2 s^T G s)        (reached at t* = -g^T s / s^T G s)

and the step is judged by ``rho = (l(w) - l(w + s)) / best``. The denominator does not depend on
the length of ``s``, so a line search that shortened the step does not hide a bad model: on a
quadratic loss whose Hessian is ``G``, a step ``s = t s*`` along the model's minimiser ``s*``
has ``rho = 2t - t^2`` (1 at the minimiser, 0.75 at half or 1.5 times it), while a loss that only
decreases for steps ``a`` times the model's predicts ``rho ~ a``. The classical rule then moves
the mass: ``rho < lower`` multiplies the mass scale by ``increase`` (the model is poor: more
damping, directions closer to the gradient's), ``rho > upper`` by ``decrease`` (the model is
good: less damping, closer to the Gauss-Newton step), and the scale is kept in
``[min_scale, max_scale]``. A step that is not a descent direction of the model, a zero step or a
non-finite new loss count as ``rho = -inf`` (more damping). Steps are never rejected: the line
search already chooses the candidate with the lowest loss.

Why judge the searched step: with a grid line search and a tiny mass (energy natural gradient for
PINNs) the raw Gauss-Newton step is often far too long early on, so a rule judged on it (see
:func:`riemod.certify.guarded`) raises the mass on every step; measured on the searched step the
ratio only drops when even the best grid point recovers a small fraction of the model's decrease.

Cost: one metric product ``G s`` per step; the new loss is read from the line search's state
(:class:`riemod.GridLinesearchState`) when the wrapped transform has one, otherwise one
``value_fn`` evaluation.

References:
  Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610); the
  reduction-ratio rule is the classical Levenberg-Marquardt trust-region update.
  K. Levenberg, *A method for the solution of certain non-linear problems in least squares*,
  Quart. Appl. Math. 2 (1944); D. Marquardt, *An algorithm for least-squares estimation of
  nonlinear parameters*, SIAM J. Appl. Math. 11 (1963): the reduction-ratio rule for the damping.
  J. Nocedal and S. Wright, *Numerical Optimization* (2nd ed., 2006), sec. 4.1 and 10.3.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from riemod.composer.geometry import Geometry
from riemod.linesearch import GridLinesearchState
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


def _dot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _with_mass_scale(opt_state: Any, scale: jax.Array) -> Any:
  """``opt_state`` with the geometry's mass scale set to ``scale`` (every MetricState inside)."""
  def visit(node):
    if isinstance(node, MetricState):
      return node._replace(geometry=node.geometry._replace(
          mass_scale=scale.astype(node.geometry.mass_scale.dtype)))
    return node
  return jax.tree.map(visit, opt_state, is_leaf=lambda n: isinstance(n, MetricState))


def _restart_momentum(opt_state: Any, keep: jax.Array) -> Any:
  """``opt_state`` with every SPRING momentum buffer zeroed unless ``keep``."""
  def visit(node):
    if isinstance(node, MetricState) and node.momentum is not None:
      return node._replace(momentum=jax.tree.map(lambda m: jnp.where(keep, m, jnp.zeros_like(m)),
                                                 node.momentum))
    return node
  return jax.tree.map(visit, opt_state, is_leaf=lambda n: isinstance(n, MetricState))


def _check_rule(geometry, lower, upper, increase, decrease, min_scale, max_scale) -> None:
  """Refuses a Levenberg-Marquardt rule that cannot work, naming the argument."""
  if not isinstance(geometry, Geometry):
    raise TypeError(f"geometry={geometry!r}: pass the riemod.Geometry of the inner transform.")
  if not 0 <= lower < upper:
    raise ValueError(f"lower={lower!r}, upper={upper!r}: need 0 <= lower < upper, e.g. 0.25 "
                     "and 0.75.")
  if not increase > 1 > decrease > 0:
    raise ValueError(f"increase={increase!r}, decrease={decrease!r}: need increase > 1 > "
                     "decrease > 0, e.g. 2 and 0.5.")
  if not 0 < min_scale <= 1 <= max_scale < float("inf"):
    raise ValueError(f"min_scale={min_scale!r}, max_scale={max_scale!r}: need 0 < min_scale <= "
                     "1 <= max_scale (finite); the mass scale starts at 1.")


def _init_inner(inner: optax.GradientTransformation, params: Any, name: str) -> Any:
  state = inner.init(params)
  if find_state(state, MetricState) is None:
    raise ValueError(f"{name}(...) wraps a transform with riemod.scale_by_metric inside (e.g. "
                     "riemod.layerwise_natural_gradient); this one has none.")
  return state


def _require(name: str, curvature, params, value, value_fn) -> None:
  if curvature is None:
    raise ValueError(f"{name}(...) needs curvature= (from riemod.value_grad_and_curvature).")
  if params is None or value is None or value_fn is None:
    raise ValueError(f"{name}(...) needs params, value= (the loss at params) and value_fn= "
                     "(params -> loss on the same batch) to measure the actual reduction; e.g. "
                     "tx.update(grads, state, params, curvature=c, value=loss, "
                     "value_fn=loss_of_params).")


def _moved_scale(ratio, scale, lower, upper, increase, decrease, min_scale, max_scale):
  """The Levenberg-Marquardt rule: more damping for a poor model, less for a good one."""
  new_scale = jnp.where(ratio < lower, scale * increase,
                        jnp.where(ratio > upper, scale * decrease, scale))
  return jnp.clip(new_scale, min_scale, max_scale).astype(scale.dtype)


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
  rule = (lower, upper, increase, decrease, min_scale, max_scale)
  _check_rule(geometry, *rule)

  def init_fn(params):
    state = _init_inner(inner, params, "guarded")
    dtype = jnp.result_type(float)
    return GuardState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                      jnp.full((), jnp.nan, dtype), state)

  def update_fn(updates, state, params=None, *, curvature=None, value=None,
                value_fn: Callable[[Any], jax.Array] | None = None, **extra_args):
    _require("guarded", curvature, params, value, value_fn)
    scale = find_state(state.inner_state, MetricState).geometry.mass_scale
    step, inner_state = inner.update(updates, state.inner_state, params, curvature=curvature,
                                     value=value, **extra_args)
    # The G the inner step was solved with (under jit its unused factorisation is removed).
    metric = geometry.compose(curvature, find_state(inner_state, MetricState).geometry)
    g_step = metric.matvec(step)
    predicted = -(_dot(updates, step) + 0.5 * _dot(step, g_step))
    new_value = value_fn(optax.apply_updates(params, step))
    actual = value - new_value
    dtype = state.last_ratio.dtype
    ratio = jnp.where(predicted > 0, actual / jnp.where(predicted > 0, predicted, 1.0),
                      -jnp.inf).astype(dtype)
    ratio = jnp.where(jnp.isfinite(new_value), ratio, -jnp.inf).astype(dtype)
    accept = ratio >= reject_below
    new_scale = _moved_scale(ratio, scale, *rule)
    step = jax.tree.map(lambda s: jnp.where(accept, s, jnp.zeros_like(s)), step)
    inner_state = jax.tree.map(lambda new, old: jnp.where(accept, new, old), inner_state,
                               state.inner_state)
    # A rejected step also restarts SPRING momentum: the buffer enters the next direction as
    # G^{-1} mu D phi, which tends to mu phi as the mass grows, so a raised mass alone would not
    # shorten the retried step (tests/test_certify_guard.py; docs/benchmarks.md, the PINN).
    inner_state = _restart_momentum(inner_state, accept)
    return step, GuardState(state.rejected_steps + (~accept).astype(jnp.int32),
                            state.adapted_steps + (new_scale != scale).astype(jnp.int32),
                            ratio, _with_mass_scale(inner_state, new_scale))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class LevenbergMarquardtState(NamedTuple):
  """State of :func:`levenberg_marquardt`.

  The mass scale itself lives in the wrapped transform's geometry state
  (``riemod.find_state(state, riemod.MetricState).geometry.mass_scale``).

  Attributes:
    ratio: the last step's ratio ``rho`` (actual decrease over the model's best decrease along the
      step; NaN before the first step).
    increased_steps: steps after which the mass scale grew.
    decreased_steps: steps after which the mass scale shrank.
    inner_state: the wrapped transform's state.
  """

  ratio: jax.Array
  increased_steps: jax.Array
  decreased_steps: jax.Array
  inner_state: Any


def levenberg_marquardt(
    inner: optax.GradientTransformation,
    geometry: Geometry,
    *,
    lower: float = 0.01,
    upper: float = 0.5,
    increase: float = 10.0,
    decrease: float = 0.1,
    min_scale: float = 1.0,
    max_scale: float = 1e4,
) -> optax.GradientTransformationExtraArgs:
  """Adapts the mass scale from the reduction ratio of the step taken (module docs: "Judged on
  the step taken").

  The defaults are the setting documented for the energy natural gradient on the Poisson PINN
  (``benchmarks/task_engd_poisson.py``): ``Geometry(mass=1e-12, cutoff=1e-14)`` with the ENGD grid
  line search, so the mass moves between ``1e-12`` (Gauss-Newton on the kept directions) and
  ``1e-8`` (damped, which leaves the ``u ~ 0`` plateau) by factors of 10, up when even the
  searched step recovers less than 1 % of the model's decrease, down when it recovers more than
  half of it.

  Args:
    inner: the transform whose output is the step, e.g. ``optax.chain(riemod.natural_gradient(
      1.0, geometry=geometry), riemod.scale_by_grid_linesearch(...))``; it must contain
      :func:`riemod.scale_by_metric` (every riemod natural-gradient alias does).
    geometry: the inner transform's :class:`~riemod.Geometry`: ``G s`` is computed with the ``G``
      the step was solved with (mass scale, mass policy and cut-off included).
    lower, upper: ratio thresholds, ``lower < upper``.
    increase, decrease: factors on the mass scale for ``rho < lower`` and ``rho > upper``
      (``increase > 1 > decrease > 0``).
    min_scale, max_scale: the mass scale stays in ``[min_scale, max_scale]`` (it starts at 1, so
      ``min_scale <= 1 <= max_scale``): the mass ranges over ``[mass min_scale, mass max_scale]``.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``params``, ``curvature=``,
    ``value=`` (the loss at ``params``) and ``value_fn=`` (``params -> loss`` on the same batch);
    other keyword arguments go to ``inner``.

  Example:
    >>> import jax.numpy as jnp, optax, riemod
    >>> f = lambda p, x: x @ p["w"]
    >>> params, x = {"w": jnp.zeros((2, 1))}, jnp.eye(2)
    >>> loss_fn = lambda y: 0.5 * jnp.mean((y - 1.0) ** 2)
    >>> loss_of = lambda p: loss_fn(f(p, x))
    >>> geometry = riemod.Geometry(mass=1e-6, structure="full")
    >>> tx = riemod.levenberg_marquardt(
    ...     optax.chain(riemod.natural_gradient(1.0, geometry=geometry),
    ...                 riemod.scale_by_grid_linesearch(max_step=2.0, num=4)),
    ...     geometry, min_scale=1e-3)
    >>> loss, g, curv = riemod.value_grad_and_curvature(
    ...     f, x, loss_fn, riemod.metrics.identity(), params=params)
    >>> u, state = tx.update(g, tx.init(params), params, curvature=curv, value=loss,
    ...                      value_fn=loss_of)
    >>> round(float(state.ratio), 3)  # a quadratic loss: the model is exact
    1.0
    >>> round(float(riemod.find_state(state, riemod.MetricState).geometry.mass_scale), 6)
    0.1
  """
  rule = (lower, upper, increase, decrease, min_scale, max_scale)
  _check_rule(geometry, *rule)

  def init_fn(params):
    state = _init_inner(inner, params, "levenberg_marquardt")
    dtype = jnp.result_type(float)
    zero = jnp.zeros((), jnp.int32)
    return LevenbergMarquardtState(jnp.full((), jnp.nan, dtype), zero, zero, state)

  def update_fn(updates, state, params=None, *, curvature=None, value=None,
                value_fn: Callable[[Any], jax.Array] | None = None, **extra_args):
    _require("levenberg_marquardt", curvature, params, value, value_fn)
    scale = find_state(state.inner_state, MetricState).geometry.mass_scale
    step, inner_state = inner.update(updates, state.inner_state, params, curvature=curvature,
                                     value=value, value_fn=value_fn, **extra_args)
    # G as the step was solved with (under jit its unused factorisation is removed).
    metric = geometry.compose(curvature, find_state(inner_state, MetricState).geometry)
    slope, curv = _dot(updates, step), _dot(step, metric.matvec(step))
    search = find_state(inner_state, GridLinesearchState)
    new_value = (value_fn(optax.apply_updates(params, step)) if search is None
                 else search.value)  # the chosen candidate's loss: no second evaluation
    dtype = state.ratio.dtype
    descent = (slope < 0) & (curv > 0)
    best = jnp.where(descent, slope * slope / (2 * jnp.where(descent, curv, 1)), 1)
    actual = jnp.asarray(value).reshape(()) - jnp.asarray(new_value).reshape(())
    ratio = jnp.where(descent & jnp.isfinite(actual), actual / best, -jnp.inf).astype(dtype)
    new_scale = _moved_scale(ratio, scale, *rule)
    return step, LevenbergMarquardtState(
        ratio, state.increased_steps + (new_scale > scale).astype(jnp.int32),
        state.decreased_steps + (new_scale < scale).astype(jnp.int32),
        _with_mass_scale(inner_state, new_scale))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

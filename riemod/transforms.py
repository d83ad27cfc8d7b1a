"""optax transformations: natural-gradient steps with one :class:`~riemod.Geometry`.

For a batch-mean loss with output-metric rows ``L_o`` (each divided by ``sqrt(B)``), module ``a``
with gradient ``g_a``, ``K_a = L_o J_a`` and mass ``D_a``, the step is ``-lr G^{-1} g`` with
``G = K^T K + D`` as the geometry describes it: block diagonal over modules
(:func:`layerwise_natural_gradient`) or one block (:func:`natural_gradient`). Euclidean modules get
``-lr D_a^{-1} g_a`` and frozen modules zero.

The pieces compose in the optax way:

* :func:`scale_by_metric`: the core, ``g -> G^{-1} g`` (or SPRING's direction); its state holds the
  geometry's state, the momentum buffer and a small per-block diagnostics record.
* :func:`track_action`: a wrapper that accumulates the terms of the discrete action functional.
* :func:`apply_if_valid`: a wrapper that applies the non-finite policy to the final update, with
  the step's precision estimate counted as a failure when it exceeds ``max_error``.
* :func:`natural_gradient` / :func:`layerwise_natural_gradient`: the aliases, built by one builder.

Curvature enters as the keyword extra argument ``curvature`` (from
:func:`riemod.value_grad_and_curvature`).

References:
  Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610).
  Goldshlager, Abrahamsen & Lin, *A Kaczmarz-inspired approach to accelerate the optimization of
  neural network wavefunctions* (SPRING, arXiv 2401.10190).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from riemod._util import all_finite, guard_rate, validate_rate
from riemod.composer.geometry import Geometry, GeometryState
from riemod.composer.metric import StepReport
from riemod.curvature.types import Curvature, leaf_paths
from riemod.nn.adapter import parameter_groups
from riemod.state import find_state

NONFINITE_POLICIES = ("error", "skip", "ignore")


class MetricState(NamedTuple):
  """State of :func:`scale_by_metric`.

  Attributes:
    geometry: the geometry's state (count, mass scale, the mass policy's moments).
    momentum: the last direction (SPRING momentum only; ``None`` otherwise).
    report: the last step's per-block diagnostics (a :class:`~riemod.composer.StepReport`;
      layerwise: one entry per module, ``NaN``/0 for modules without a block; full: one entry).
  """

  geometry: GeometryState
  momentum: Any
  report: StepReport


class ActionState(NamedTuple):
  """State of :func:`track_action`: the terms of the discrete action functional.

  Attributes:
    count: steps taken.
    action: ``S = sum_k lr_k g_k^T G_k^{-1} g_k``.
    metric_grad_norm_sq: ``g^T G^{-1} g`` of the last step.
    initial_loss: the loss (``value=``) at the first step (NaN if never given).
    last_loss: the loss at the last step.
    inner_state: the wrapped transform's state.
  """

  count: jax.Array
  action: jax.Array
  metric_grad_norm_sq: jax.Array
  initial_loss: jax.Array
  last_loss: jax.Array
  inner_state: Any


class ValidStepState(NamedTuple):
  """State of :func:`apply_if_valid`.

  Attributes:
    skipped_steps: steps refused (non-finite, estimated error above ``max_error``, or a loss
      past ``max_loss_growth``).
    inner_state: the wrapped transform's state.
    first_value: the first loss passed as ``value=`` (NaN before it).
    smoothed_value: a moving average of the losses passed as ``value=`` (NaN before the first).
  """

  skipped_steps: jax.Array
  inner_state: Any
  first_value: jax.Array = jnp.nan
  smoothed_value: jax.Array = jnp.nan


def _float():
  return jnp.result_type(float)


def diagnostic_slots(params: Any, structure: str) -> int:
  """Diagnostics slots: one per module (layerwise) or one (full), known from the parameters."""
  if structure == "full":
    return 1
  if isinstance(params, nnx.State):
    params = nnx.as_pure(params)
  return len(parameter_groups(params))


def _empty_report(slots: int) -> StepReport:
  dtype = _float()
  nan = jnp.full((slots,), jnp.nan, dtype)
  zero = jnp.zeros((slots,), dtype)
  return StepReport(jnp.zeros((), dtype), nan, nan, zero, zero)


def _per_slot(report: StepReport, metric, slots: int) -> StepReport:
  """Spreads per-block values over the state's slots (layerwise: a module's own slot)."""
  if metric.structure == "full":
    if report.condition.shape[0] == 1:
      return report
    filled = _empty_report(1)
    return filled._replace(metric_grad_norm_sq=report.metric_grad_norm_sq,
                           error=jnp.where(metric.mass_ok, filled.error, jnp.nan))
  index = np.asarray([members[0] for members in metric.block_modules], np.int32)
  filled = _empty_report(slots)
  put = lambda base, values: base.at[index].set(values.astype(base.dtype)) if len(index) else base
  return StepReport(
      metric_grad_norm_sq=report.metric_grad_norm_sq.astype(filled.metric_grad_norm_sq.dtype),
      condition=put(filled.condition, report.condition),
      residual=put(filled.residual, report.residual),
      jitter=put(filled.jitter, report.jitter),
      error=jnp.where(metric.mass_ok, put(filled.error, report.error), jnp.nan))


def _no_positional(positional: tuple) -> None:
  if positional:
    raise TypeError("riemod's transforms take the curvature (and value=, value_fn=) as keywords: "
                    "tx.update(grads, state, params, curvature=curvature).")


def _require_curvature(curvature: Any, who: str) -> None:
  if curvature is None:
    raise ValueError(
        f"{who} needs the curvature: call tx.update(grads, state, params, curvature=curvature) "
        "(or optimizer.update(model, grads, curvature=curvature)) with the curvature from "
        "riemod.value_grad_and_curvature. Without it there is no metric to solve with.")
  if not isinstance(curvature, Curvature):
    raise TypeError(f"curvature={type(curvature).__name__}: pass the Curvature returned by "
                    "riemod.value_grad_and_curvature (as the keyword curvature=).")


def _selected(curvature: Curvature, updates: Any) -> Curvature:
  """The curvature of the parameters ``updates`` holds: all of them, or the ones an
  ``optax.masked`` / ``optax.multi_transform`` group (``optax.MaskedNode`` elsewhere) or an
  ``nnx.Optimizer`` with a narrower ``wrt`` selects, found by their paths."""
  if len(jax.tree.leaves(updates)) == len(curvature.leaf_shapes):
    return curvature
  return curvature.restrict(leaf_paths(updates))


def _check_state_matches(state: MetricState, updates: Any, geometry: Geometry, momentum) -> None:
  """Refuses an optimizer state initialised for other parameters (its shapes, known at trace
  time, differ from what ``init`` gives for these)."""
  fresh = jax.eval_shape(geometry.init, updates)
  pairs = [(fresh, state.geometry)]
  if momentum is not None:
    pairs.append((updates, state.momentum))
  for expected, found in pairs:
    shapes = [np.shape(leaf) for leaf in jax.tree.leaves(expected)]
    if shapes != [np.shape(leaf) for leaf in jax.tree.leaves(found)]:
      raise ValueError(
          "The optimizer state does not belong to this model: its shapes differ from those of "
          "the parameters being updated. Initialise the optimizer on the parameters of the "
          "model you train (tx.init(params) / nnx.Optimizer(model, tx)).")


def scale_by_metric(geometry: Geometry, *, momentum: float | None = None,
                    residuals: bool = False) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients by ``G^{-1}``, ``G`` as ``geometry`` describes it (no learning rate).

  Args:
    geometry: the :class:`~riemod.Geometry` (mass, mass policy, structure, space, refinement).
    momentum: SPRING momentum ``mu`` in ``[0, 1)``: the direction is
      ``phi_k = G^{-1}(g + mu D phi_{k-1})``, one more right-hand side for the same
      factorisation (``None``: off, no buffer in the state). For euclidean modules it is
      heavy-ball momentum.
    residuals: record each block's small-solve residual (reads every ``d x d`` factor once
      more, about 3% of an exact-Fisher step on a CPU); ``NaN`` otherwise.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``curvature=``.

  References:
    Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610).
    Goldshlager, Abrahamsen & Lin, SPRING (arXiv 2401.10190), for ``momentum``.

  Example:
    >>> import jax.numpy as jnp, optax, riemod
    >>> tx = optax.chain(riemod.scale_by_metric(riemod.Geometry(mass=1e-2)), optax.scale(-0.1))
    >>> state = tx.init({"w": jnp.zeros((3, 2))})
  """
  if not isinstance(geometry, Geometry):
    raise TypeError(f"geometry={geometry!r}: pass a riemod.Geometry(...).")
  if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
    raise ValueError(f"momentum={momentum!r}: SPRING momentum must lie in [0, 1), e.g. 0.8.")

  def init_fn(params):
    return MetricState(
        geometry=geometry.init(params),
        momentum=None if momentum is None else jax.tree.map(jnp.zeros_like, params),
        report=_empty_report(diagnostic_slots(params, geometry.structure)))

  def update_fn(updates, state, params=None, *positional, curvature=None, **extra_args):
    del params, extra_args
    _no_positional(positional)
    _require_curvature(curvature, "riemod.scale_by_metric")
    curvature = _selected(curvature, updates)
    slots = state.report.condition.shape[0]
    if geometry.structure == "layerwise" and len(curvature.modules) != slots:
      raise ValueError(
          f"The optimizer state does not belong to this model: it was initialised for {slots} "
          f"modules, the curvature has {len(curvature.modules)}. Initialise the optimizer on the "
          "parameters of the model you train (tx.init(params) / nnx.Optimizer(model, tx)).")
    _check_state_matches(state, updates, geometry, momentum)
    geometry_state = geometry.advance(state.geometry, updates, curvature)
    metric = geometry.compose(curvature, geometry_state)
    direction, report = metric.step(updates, state.momentum, momentum)
    if not residuals:
      report = report._replace(residual=jnp.full_like(report.residual, jnp.nan))
    return direction, MetricState(geometry_state, None if momentum is None else direction,
                                  _per_slot(report, metric, slots))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _loss_value(value: Any, dtype) -> jax.Array:
  """``value=`` (the loss) as an array, or an error naming it."""
  message = (f"value={value!r}: pass the scalar loss (the first output of "
             "riemod.value_grad_and_curvature).")
  if isinstance(value, (str, bytes)):
    raise TypeError(message)
  try:
    return jnp.asarray(value, dtype)
  except (TypeError, ValueError) as error:
    raise TypeError(message) from error


def track_action(inner: optax.GradientTransformation,
                 learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  """Accumulates the discrete action ``S = sum_k lr_k g_k^T G_k^{-1} g_k`` of a riemod transform.

  On the Riemannian gradient flow both terms of the integrand ``0.5 |w'|_G^2 + 0.5 g^T G^{-1} g``
  equal ``0.5 g^T G^{-1} g`` and ``dt = lr``; ``S - (l_0 - l_K)`` (the action gap, see
  :func:`riemod.certify.action_terms`) measures how far a run strays from the flow. ``update``
  accepts ``value=`` (the loss) for the loss terms; ``g^T G^{-1} g`` is read from the wrapped
  :func:`scale_by_metric` state, so the wrapper adds no solve.

  Args:
    inner: a transform containing :func:`scale_by_metric`.
    learning_rate: the step size (or schedule) the chain applies.

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> tx = riemod.track_action(riemod.scale_by_metric(riemod.Geometry()), learning_rate=0.1)
    >>> float(tx.init({"w": jnp.zeros(2)}).action)
    0.0
  """
  def init_fn(params):
    zero, nan = jnp.zeros((), _float()), jnp.full((), jnp.nan, _float())
    return ActionState(jnp.zeros((), jnp.int32), zero, zero, nan, nan, inner.init(params))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    out, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    metric_state = find_state(inner_state, MetricState)
    if metric_state is None:
      raise ValueError("track_action wraps a transform without riemod.scale_by_metric inside.")
    dtype = state.action.dtype
    q = metric_state.report.metric_grad_norm_sq.astype(dtype)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    loss = jnp.asarray(jnp.nan, dtype) if value is None else _loss_value(value, dtype)
    return out, ActionState(optax.safe_increment(state.count),
                            state.action + jnp.asarray(lr, dtype) * q, q,
                            jnp.where(state.count == 0, loss, state.initial_loss), loss,
                            inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class StepRefusedError(FloatingPointError):
  """A step was refused: non-finite values, or an estimated error above ``max_error``."""


def _refusal_message(bad_grads, bad_curvature, bad_step, bad_precision, worst_error,
                     bad_loss=False, first=np.nan, smoothed=np.nan, growth=np.nan) -> str:
  what = [name for name, bad in (("the gradient", bad_grads), ("the curvature", bad_curvature),
                                 ("the update", bad_step)) if np.any(bad)]
  parts = []
  if what:
    parts.append(f"non-finite values in {', '.join(what)}: check the loss, the inputs and the "
                 "learning rate for NaN/inf (a negative learning rate known only at run time "
                 "also gives a NaN update)")
  if np.any(bad_precision):
    worst = float(np.max(worst_error))
    parts.append(
        "an invalid mass (not finite and > 0)" if not np.isfinite(worst) else
        f"an estimated relative error of {worst:.2g} in the solved step (above max_error): the "
        "metric is too ill-conditioned for this precision; raise the mass, enable "
        "jax_enable_x64, or use the parameter-space solve")
  if np.any(bad_loss):
    parts.append(
        f"the loss is diverging (moving average {float(np.max(smoothed)):.3g}, more than "
        f"max_loss_growth={float(np.max(growth)):g} times the first loss "
        f"{float(np.max(first)):.3g}): lower the learning rate or raise the mass; with a low-rank "
        "metric (sampled Fisher, a sketch, curvature_batch) the gradient outside the rows' span is "
        "scaled by 1/mass, so the mass sets that step (raise it 10x), or use the exact metric. "
        "max_loss_growth=None turns this check off")
  return ("riemod: step refused: " + "; ".join(parts) + ". Pass on_nonfinite='skip' to skip such "
          "steps (parameters unchanged, skipped_steps counts them).")


def _raise_refused(bad_grads, bad_curvature, bad_step, bad_precision, worst_error,
                   bad_loss=False, first=np.nan, smoothed=np.nan, growth=np.nan):
  if (np.any(bad_grads) or np.any(bad_curvature) or np.any(bad_step) or np.any(bad_precision)
      or np.any(bad_loss)):
    raise StepRefusedError(_refusal_message(bad_grads, bad_curvature, bad_step, bad_precision,
                                            worst_error, bad_loss, first, smoothed, growth))
  return np.zeros(np.shape(bad_grads), np.int32)  # batched under jax.vmap


# Moving average of the loss for the divergence check: 0.9 lets a single batch 30x the first
# loss pass (0.1 * 21 + 0.9 = 3), while a blow-up trips it within a step or two.
_LOSS_DECAY = 0.9


def _track_loss(state: ValidStepState, value: Any, max_loss_growth: float | None):
  """``(first loss, smoothed loss, whether the loss is within max_loss_growth of the first)``."""
  first, smoothed = state.first_value, state.smoothed_value
  if value is None or max_loss_growth is None:
    return first, smoothed, jnp.asarray(True)
  value = jax.lax.stop_gradient(_loss_value(value, first.dtype))
  if value.shape != ():
    raise ValueError(f"value= must be the scalar loss; got shape {value.shape}.")
  started = ~jnp.isnan(first)
  first = jnp.where(started, first, value)
  smoothed = jnp.where(started, _LOSS_DECAY * smoothed + (1 - _LOSS_DECAY) * value, value)
  # NaN compares False, so a NaN loss is left to the finiteness checks.
  diverged = (first > 0) & (smoothed > max_loss_growth * first)
  return first, smoothed, ~diverged


def _finite_curvature(curvature: Any) -> jax.Array:
  return curvature.all_finite() if isinstance(curvature, Curvature) else all_finite(curvature)


def apply_if_valid(inner: optax.GradientTransformation, policy: str = "error", *,
                   max_error: float | None = 1e-2, max_loss_growth: float | None = 3.0,
                   ) -> optax.GradientTransformationExtraArgs:
  """Applies the non-finite policy to a riemod chain's final update (learning rate included).

  A step is refused when the gradient, the curvature or the final update holds NaN or inf, or
  when the :func:`scale_by_metric` inside estimates its direction's relative error (round-off
  times the metric's condition times what the Woodbury subtraction cancels) above
  ``max_error``, or the mass is not finite and > 0. So a float32 step is either accurate to about
  ``max_error`` or refused, never silently wrong.

  Args:
    inner: the chain to guard (e.g. ``chain(scale_by_metric(...), scale_by_learning_rate(lr))``).
    policy: ``"error"`` raises :class:`StepRefusedError` (a ``FloatingPointError``; eagerly at
      once, under ``jax.jit`` from a host callback in a branch taken only on failure, so it
      surfaces when the step's results are read, wrapped by jax in a ``JaxRuntimeError`` whose
      message names it); ``"skip"`` returns a zero update and rolls the inner state back,
      counting the step in ``skipped_steps``; ``"ignore"`` checks nothing.
    max_error: the largest accepted estimated relative error (``None``: no precision check).
    max_loss_growth: a step is refused once a moving average of the loss (decay 0.9, so one
      bad batch does not trip it) exceeds this multiple of the first loss: every value can stay
      finite while training diverges (a low-rank metric at too small a mass steps ``1 / mass``
      times the gradient outside its rows' span). The loss is ``update(..., value=loss)`` if
      given, else the one :func:`riemod.value_grad_and_curvature` recorded in the curvature
      (``Curvature.value``). Meant for non-negative losses; not checked while the first loss
      is <= 0. ``None``: off.

  Example:
    >>> import jax.numpy as jnp, optax, riemod
    >>> tx = riemod.apply_if_valid(riemod.scale_by_metric(riemod.Geometry()), "skip")
    >>> int(tx.init({"w": jnp.zeros(2)}).skipped_steps)
    0
  """
  if policy not in NONFINITE_POLICIES:
    raise ValueError(f"on_nonfinite={policy!r}: use one of {NONFINITE_POLICIES}.")
  for name, value in (("max_error", max_error), ("max_loss_growth", max_loss_growth)):
    if value is not None and (isinstance(value, bool)
                              or not isinstance(value, (int, float, np.number, jax.Array))):
      raise TypeError(f"{name}={value!r}: a number or None.")
  if isinstance(max_error, (int, float, np.number)) and not max_error > 0:  # arrays: injected
    raise ValueError(f"max_error={max_error!r}: a positive number (e.g. 1e-2) or None.")
  if isinstance(max_loss_growth, (int, float, np.number)) and not max_loss_growth > 1:
    raise ValueError(f"max_loss_growth={max_loss_growth!r}: a number > 1 (e.g. 3.0) or None.")

  def init_fn(params):
    nan = jnp.full((), jnp.nan, _float())
    return ValidStepState(jnp.zeros((), jnp.int32), inner.init(params), nan, nan)

  def update_fn(updates, state, params=None, *positional, curvature=None, **extra_args):
    _no_positional(positional)
    out, inner_state = inner.update(updates, state.inner_state, params, curvature=curvature,
                                    **extra_args)
    # The loss: value= if given, else the one measured with the curvature.
    value = extra_args.get("value")
    if value is None and isinstance(curvature, Curvature):
      value = curvature.value
    first, smoothed, ok_loss = _track_loss(state, value, max_loss_growth)
    if policy == "ignore":
      return out, ValidStepState(state.skipped_steps, inner_state, first, smoothed)
    ok_grads, ok_curvature, ok_step = all_finite(updates), _finite_curvature(curvature), all_finite(out)
    metric_state = find_state(inner_state, MetricState)
    errors = jnp.zeros((1,)) if metric_state is None else metric_state.report.error
    # NaN marks an invalid mass: refused with or without a precision threshold.
    ok_precision = (jnp.all(errors <= max_error) if max_error is not None
                    else ~jnp.any(jnp.isnan(errors)))
    ok = ok_grads & ok_curvature & ok_step & ok_precision & ok_loss
    worst = jnp.max(jnp.where(jnp.isnan(errors), jnp.inf, errors)) if errors.size else 0.0
    # Diagnostics only: with the gradient stopped, jax.grad through a step never differentiates
    # the host callback below (which has no derivative).
    flags = jax.lax.stop_gradient((~ok_grads, ~ok_curvature, ~ok_step, ~ok_precision, worst,
                                   ~ok_loss, first, smoothed,
                                   jnp.asarray(np.nan if max_loss_growth is None
                                               else max_loss_growth, _float())))
    if policy == "error":
      if not isinstance(ok, jax.core.Tracer):
        _raise_refused(*flags)
        return out, ValidStepState(state.skipped_steps, inner_state, first, smoothed)
      zero = jax.lax.cond(ok, lambda: jnp.zeros((), jnp.int32), lambda: jax.pure_callback(
          _raise_refused, jax.ShapeDtypeStruct((), jnp.int32), *flags,
          vmap_method="broadcast_all"))
      # The updates and the state both depend on the check, so neither can be used without it.
      out = jax.tree.map(lambda d: d + zero.astype(d.dtype), out)
      return out, ValidStepState(state.skipped_steps + zero, inner_state, first, smoothed)
    out = jax.tree.map(lambda d: jnp.where(ok, d, jnp.zeros_like(d)), out)
    inner_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), inner_state,
                               state.inner_state)
    return out, ValidStepState(state.skipped_steps + (~ok).astype(jnp.int32), inner_state,
                               first, smoothed)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def alias_geometry(structure: str, mass, geometry: Geometry | None) -> Geometry:
  """The geometry an alias steps with: ``geometry``, or ``Geometry(mass)`` (``None``: the
  constant policy's default, 1e-2)."""
  if geometry is None:
    return Geometry(mass=mass, structure=structure)
  if not isinstance(geometry, Geometry):
    raise TypeError(f"geometry={geometry!r}: pass a riemod.Geometry(...) (or mass= alone).")
  if mass is not None:
    raise ValueError("Pass the mass either as mass= or inside geometry=, not both.")
  if geometry.structure != structure:
    raise ValueError(
        f"geometry.structure={geometry.structure!r} but this alias steps with structure="
        f"{structure!r}: use riemod.natural_gradient for 'full' and "
        "riemod.layerwise_natural_gradient for 'layerwise' (or scale_by_metric directly).")
  return geometry


def _natural_gradient(structure: str, learning_rate, mass, geometry, momentum, on_nonfinite,
                      max_error, residuals, max_loss_growth) -> optax.GradientTransformationExtraArgs:
  """The one builder behind both aliases."""
  validate_rate(learning_rate)
  geometry = alias_geometry(structure, mass, geometry)
  # A negative rate known only at run time (a schedule, an injected value) gives a NaN update,
  # which the non-finite policy refuses, instead of a step up the loss.
  learning_rate = guard_rate(learning_rate)
  core = optax.chain(scale_by_metric(geometry, momentum=momentum, residuals=residuals),
                     optax.scale_by_learning_rate(learning_rate))
  return apply_if_valid(track_action(core, learning_rate), on_nonfinite, max_error=max_error,
                        max_loss_growth=max_loss_growth)


def natural_gradient(
    learning_rate: optax.ScalarOrSchedule,
    mass: optax.ScalarOrSchedule | None = None,
    *,
    geometry: Geometry | None = None,
    momentum: float | None = None,
    on_nonfinite: str = "error",
    max_error: float | None = 1e-2,
    residuals: bool = False,
    max_loss_growth: float | None = 3.0,
) -> optax.GradientTransformationExtraArgs:
  """Whole-network damped natural-gradient / Gauss-Newton descent: ``-lr (K^T K + D)^{-1} g``.

  One block for all Riemannian modules; the kernel is the sum of the per-module kernels, so no
  ``n x n`` matrix is formed.

  Args:
    learning_rate: step size or optax schedule.
    mass: the default mass (or a schedule of the step), shorthand for
      ``geometry=riemod.Geometry(mass=..., structure="full")`` (default 1e-2).
    geometry: the full description of the metric (mass policy, space, refinement).
    momentum: SPRING momentum in ``[0, 1)`` (``None``: off); see :func:`scale_by_metric`.
    on_nonfinite: ``"error"``, ``"skip"`` or ``"ignore"`` (see :func:`apply_if_valid`).
    max_error: the largest accepted estimated relative error of a step (see
      :func:`apply_if_valid`; ``None``: unchecked).
    residuals: record the small solves' residuals (see :func:`scale_by_metric`).
    max_loss_growth: refuse steps once the loss, passed as ``update(..., value=loss)``, has
      grown past this multiple of the first loss (see :func:`apply_if_valid`; ``None``: off).

  Example:
    >>> import jax, jax.numpy as jnp, riemod
    >>> f = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.zeros((3, 1))}
    >>> x, t = jnp.ones((8, 3)), jnp.ones((8, 1))
    >>> loss, g, curv = riemod.value_grad_and_curvature(
    ...     f, x, lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1)),
    ...     riemod.metrics.identity(), params=params)
    >>> tx = riemod.natural_gradient(learning_rate=1.0, mass=1e-3)
    >>> updates, state = tx.update(g, tx.init(params), params, curvature=curv)
    >>> bool(jnp.all(updates["w"] > 0))
    True
  """
  return _natural_gradient("full", learning_rate, mass, geometry, momentum, on_nonfinite,
                           max_error, residuals, max_loss_growth)


def layerwise_natural_gradient(
    learning_rate: optax.ScalarOrSchedule,
    mass: optax.ScalarOrSchedule | None = None,
    *,
    geometry: Geometry | None = None,
    momentum: float | None = None,
    on_nonfinite: str = "error",
    max_error: float | None = 1e-2,
    residuals: bool = False,
    max_loss_growth: float | None = 3.0,
) -> optax.GradientTransformationExtraArgs:
  """Layerwise Riemannian descent: ``-lr (K_a^T K_a + D_a)^{-1} g_a`` for every module.

  The block-diagonal geometry (``structure="layerwise"``); arguments as :func:`natural_gradient`.

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> tx = riemod.layerwise_natural_gradient(0.1, geometry=riemod.Geometry(
    ...     mass=30.0, mass_policy=riemod.masses.adaptive(0.99)))
    >>> state = tx.init({"w": jnp.zeros((3, 2))})
  """
  return _natural_gradient("layerwise", learning_rate, mass, geometry, momentum, on_nonfinite,
                           max_error, residuals, max_loss_growth)


_DIAGNOSTICS = ("condition", "residual", "jitter", "error")


def module_diagnostics(state: Any, curvature: Curvature, mask: Any = None
                       ) -> dict[str, dict[str, float]]:
  """Per-module diagnostics of the last step, from an optimizer state (searched inside chains).

  Under ``optax.masked``, ``optax.multi_transform`` or an ``nnx.Optimizer`` with a narrower
  ``wrt``, the riemod transform steps only the selected parameters, with the curvature restricted
  to them; pass the same selection as ``mask`` and the diagnostics are those of the restricted
  blocks, keyed by the modules that have selected parameters (the others are not stepped by it
  and are left out). A riemod state inside ``optax.masked`` without ``mask`` is refused; so is a
  layerwise state whose number of modules differs from the curvature's. A state with one block
  (``structure="full"``, or a single selected module) does not tell from its state alone whether
  it saw every parameter: pass ``mask`` whenever the transform sees a subset.

  Args:
    state: the optimizer state (or the state of one ``multi_transform`` group, e.g.
      ``state.inner_states["ng"]``, when several groups are riemod transforms).
    curvature: the curvature of the whole model, as passed to ``update``.
    mask: ``None`` (the transform sees every parameter) or a pytree of bools with the
      parameters' structure: the mask given to ``optax.masked``, for ``optax.multi_transform``
      ``jax.tree.map(lambda label: label == "ng", labels)``.

  Returns:
    ``{module name: {"condition", "residual", "jitter", "error"}}``: the values of the block the
    module belongs to (the one block under ``structure="full"``; condition and residual NaN for
    modules outside every block, e.g. euclidean ones).

  Example:
    >>> import jax, jax.numpy as jnp, optax, riemod
    >>> params = {"body": {"w": jnp.ones((3, 2))}, "head": {"w": jnp.ones((2, 1))}}
    >>> f = lambda p, x: jnp.tanh(x @ p["body"]["w"]) @ p["head"]["w"]
    >>> _, g, curv = riemod.value_grad_and_curvature(
    ...     f, jnp.ones((4, 3)), lambda y: 0.5 * jnp.mean(y ** 2), riemod.metrics.identity(),
    ...     params=params)
    >>> mask = {"body": {"w": False}, "head": {"w": True}}
    >>> tx = optax.masked(riemod.layerwise_natural_gradient(0.1), mask)
    >>> _, state = tx.update(g, tx.init(params), params, curvature=curv)
    >>> list(riemod.module_diagnostics(state, curv, mask=mask))
    ['head']
  """
  inner = find_state(state, MetricState)
  if inner is None:
    raise ValueError("No riemod MetricState inside this optimizer state.")
  if mask is not None:
    curvature = _masked_curvature(curvature, mask)
  elif _inside_masked(state, inner):
    raise ValueError(
        "The riemod transform in this state runs inside optax.masked / optax.multi_transform, "
        "so it steps only the selected parameters: pass the selection as mask= (the mask given "
        "to optax.masked; for multi_transform jax.tree.map(lambda l: l == 'group', labels)).")
  report = inner.report
  slots = report.condition.shape[0]
  if slots != 1 and slots != len(curvature.modules):
    raise ValueError(
        f"The optimizer state has diagnostics for {slots} modules, the curvature has "
        f"{len(curvature.modules)}: the transform steps a subset of the parameters (an "
        "nnx.Optimizer with a narrower wrt=, optax.masked): pass that selection as mask=, a "
        "pytree of bools with the parameters' structure.")
  out = {}
  for i, module in enumerate(curvature.modules):
    if slots == 1 and len(curvature.modules) != 1:  # one block: the riemannian modules'
      values = {name: float(getattr(report, name)[0]) for name in _DIAGNOSTICS}
      if module.kind != "riemannian":
        values.update(condition=float("nan"), residual=float("nan"), jitter=0.0, error=0.0)
    else:
      values = {name: float(getattr(report, name)[i]) for name in _DIAGNOSTICS}
    out[module.name] = values
  return out


def _masked_curvature(curvature: Curvature, mask: Any) -> Curvature:
  """The curvature of the leaves ``mask`` selects (see :meth:`Curvature.restrict`)."""
  if callable(mask):
    raise TypeError("mask: pass the pytree of bools itself (call a mask function on the "
                    "parameters first: mask=mask_fn(params)).")
  flags = jax.tree.leaves(mask)
  if curvature.leaf_paths is None or len(flags) != len(curvature.leaf_paths):
    raise ValueError(
        f"mask has {len(flags)} leaves, the curvature's parameters "
        f"{len(curvature.leaf_shapes)}: pass a pytree of bools with the parameters' structure "
        "(one bool per parameter array), as given to optax.masked.")
  return curvature.restrict([p for p, keep in zip(curvature.leaf_paths, flags) if keep])


def _inside_masked(state: Any, inner: MetricState) -> bool:
  """Whether ``inner`` sits inside an ``optax.masked`` state (multi_transform's groups too)."""
  masked = optax.tree_utils.tree_get_all_with_path(
      state, "MaskedState", filtering=lambda _, value: isinstance(value, optax.MaskedState))
  return any(find_state(m.inner_state, MetricState) is inner for _, m in masked)

"""A certified step size: the learning rate kept at a fixed fraction of the edge of stability.

On the local quadratic model of the loss, the step ``w <- w - lr G^{-1} g`` multiplies the
component along each eigenvector of ``G^{-1} H`` by ``1 - lr lam``: it stays bounded iff
``lr < 2 / lam_max``, the edge of stability. :func:`controlled` measures ``lam_max`` every
``every`` steps and sets ``lr = fraction * 2 / lam_max`` for the steps until the next measurement.
No learning rate is given; the metric itself says how far a step may go.

**Which Hessian.** The default is the Gauss-Newton part ``H_GN = J^T (d^2 l / dy^2) J``, not the
full Hessian. The full Hessian adds the residual term ``sum_s (dl/dy_s) d^2 y_s / dw^2``, which is
indefinite and shrinks with the residuals; on a network its top eigenvalue is often set by that
term in directions the metric hardly weighs. Measured on the digits MLP (``riemod certify``, exact
softmax Fisher, mass 1e-2, ``benchmarks/results/certify_verdict/``): the full-Hessian ratio
``lr lam_max / 2`` is 4.2 at the start of a run at lr 0.1 that converges (loss 2.28 -> 0.095 in 20
steps), so half its edge would be lr 0.012, 8x below a rate that works; the Gauss-Newton ratio is
0.15 there and 1.48 at lr 1.0, a run that diverges: on the right side of 1 both times. ``H_GN``
is positive semidefinite for a convex loss of the outputs, so its ``lam_max`` is a well-posed
target for a few Lanczos steps.
``hessian="full"`` uses the full Hessian instead (Hessian-vector products by forward-over-reverse).

**How it is measured.** ``lam_max(G^{-1} H_GN)`` by generalised Lanczos
(:func:`~riemod.certify.lanczos.top_ritz_pair`): ``num_steps`` Gauss-Newton products (one
linearised forward pass shared by all), ``G^{-1} v`` and ``G v`` through
``geometry.compose(curvature, geometry state)``, the very ``G`` the inner step was solved with
(mass policy, mass scale and moments included, so an adaptive mass is honoured), and factored
once: the estimate reuses the inner step's factorisation, so it adds only its products and
solves. Where ``geometry.exact_solve``, the ``G`` products of the Lanczos basis come from the
solves (``G G^{-1} H q = H q``), so an estimate makes one ``G v`` instead of ``num_steps``.
Lanczos is warm-started from the previous estimate's Ritz vector, kept in the state.
That saves little: between estimates (another batch, other parameters) the top direction moves
far, so ``num_steps`` stays at 5 for every estimate (fewer warm-started steps underestimated
``lam_max`` by up to 2x on the digits MLP, ``benchmarks/results/
tuning_free_estimate_accuracy.md``). A Ritz value is a lower estimate of ``lam_max``;
``fraction < 1`` is the margin for that and for the change of ``lam_max`` between estimates.
The estimate runs under ``jax.lax.cond``: steps without one pay only a comparison.
Each estimate sees one batch, while the rate it sets serves the batches of the next ``every``
steps; ``memory`` keeps the rate of the sharpest recent batch (the reference is the larger of
the new estimate and ``memory`` times the previous reference).

**Momentum keeps the edge.** With SPRING momentum ``phi_k = G^{-1}(g_k + mu D phi_{k-1})`` and
``w_{k+1} = w_k - lr phi_k`` on the quadratic model, every eigenvalue ``z`` of the step map, with
eigenvector ``x``, solves ``z^2 - z (1 + mu a - lr b) + mu a = 0`` where ``a = x^* D x / x^* G x``
lies in ``[0, 1]`` and ``b = x^* H x / x^* G x <= lam_max`` (multiply the eigen-equation
``(z - 1)(z G - mu D) x = -lr z H x`` by ``x^*``). That is heavy ball with momentum
``mu a`` and step ``lr b``, whose roots lie in the unit disc for ``0 < lr b < 2 (1 + mu a)``. So
``lr < 2 / lam_max`` certifies the step with any ``mu`` in ``[0, 1)``, although ``G`` and ``H``
need not commute; the certified aliases use ``momentum=0.8`` by default.

References:
  Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 5
  (contraction of the Riemannian step, its stable learning rates).
  Cohen et al., *Gradient descent on neural networks typically occurs at the edge of stability*,
  ICLR 2021 (the quantity ``lr lam_max / 2``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from riemod._convolutions import fast_convolutions_on_cpu
from riemod._util import gaussian_like
from riemod.certify.contraction import gauss_newton_product
from riemod.certify.guard import levenberg_marquardt
from riemod.certify.lanczos import top_ritz_pair
from riemod.composer import masses
from riemod.composer.geometry import Geometry
from riemod.composer.spectral import precision_cutoff
from riemod.curvature import _mesh
from riemod.linesearch import scale_by_grid_linesearch
from riemod.state import find_state
from riemod.transforms import (MetricState, alias_geometry, layerwise_natural_gradient,
                               natural_gradient)

HESSIANS = ("gauss_newton", "full")


class ControllerState(NamedTuple):
  """State of :func:`controlled`.

  Attributes:
    count: updates seen.
    learning_rate: the learning rate of the latest step (0 until a first valid estimate).
    lam_max: the latest valid estimate of ``lam_max(G^{-1} H_GN)`` (``NaN`` before the first).
    estimates: estimates taken so far.
    vector: the Ritz vector of the latest estimate (shaped like the parameters; the warm start
      of the next).
    inner_state: the wrapped transform's state.
    smoothed_value: a moving average of the loss ``value=`` (weight ``1 - SMOOTHING`` on the
      newest; ``NaN`` until a first value), the reference of the loss-rise recheck.
    edge_lam: the ``lam_max`` the rate is set from: the largest recent estimate, each older one
      discounted by ``memory`` per estimate since (``NaN`` before the first).
  """

  count: jax.Array
  learning_rate: jax.Array
  lam_max: jax.Array
  estimates: jax.Array
  vector: Any
  inner_state: Any
  smoothed_value: jax.Array
  edge_lam: jax.Array


# The recheck compares the batch loss with a moving average of the batch losses, not with the
# previous batch's loss: at small losses two batches' losses often differ by 1.5x, so the
# previous-batch rule estimated on 174-203 of 600 digits-MLP steps (benchmarks/results/
# tuning_free.md at 17c7241), 2-3x its schedule, while a step past the edge grows the loss
# geometrically and passes any fixed multiple of the average within a few steps. The defaults
# (every=30, recheck_rise=2, memory=0.8, and momentum 0.8 in the certified aliases) come from the
# controller table of benchmarks/task_tuning_free.py (tuning seeds 100-103, digits MLP): the
# estimates of single batches scatter widely late in training, and with memory=0 a flat batch's
# estimate raised the rate until the next batch's loss rose and forced a recheck.
SMOOTHING = 0.9


def _whole_batch_product(product: Callable[[jax.Array], jax.Array], axes: tuple
                         ) -> Callable[[jax.Array], jax.Array]:
  """``product`` of one device's shard of the batch made the whole batch's, inside ``shard_map``.

  Each device holds its shard (``apply_fn`` and ``loss_fn`` give its outputs and mean loss) while
  ``G`` is the whole batch's (the curvature gathered over ``axes``); the product of the whole
  batch's mean loss is the mean of the devices' products, the same on every device, so every
  device estimates the same ``lam_max`` and sets the same rate. Where ``shard_map`` types values
  by the axes they vary over (``check_vma=True``), differentiating through the replicated
  parameters already sums the devices' products (the transpose of the parameters' broadcast is a
  sum), so that sum is divided by the device count; elsewhere the per-device products are
  averaged.
  """
  def whole(v):
    out = product(v)
    varying = _mesh.varying_axes(out)
    per_device = tuple(a for a in axes if a in varying or not _mesh.checks_vma())
    summed = tuple(a for a in axes if a not in per_device)
    if per_device:
      out = jax.lax.pmean(out, per_device)
    return out / _mesh.size(summed) if summed else out

  return whole


def _schedule_value(learning_rate, count):
  return learning_rate(count) if callable(learning_rate) else learning_rate


def controlled(
    inner: optax.GradientTransformation,
    geometry: Geometry,
    *,
    fraction: float = 0.5,
    every: int = 30,
    warmup: int | None = None,
    recheck_rise: float | None = 2.0,
    num_steps: int = 5,
    memory: float = 0.8,
    hessian: str = "gauss_newton",
    learning_rate: optax.ScalarOrSchedule | None = None,
    max_learning_rate: float | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps riemod's step at learning rate 1 with a certified learning rate.

  In a warm-up and then every ``every`` steps the controller estimates
  ``lam_max(G^{-1} H_GN)`` at the current parameters and batch and sets
  ``lr = fraction * 2 / lam_max``; each update is the inner step times that ``lr``. (The warm-up
  estimates at steps 0, 1, 3, 7, ... because the curvature changes fastest in the first steps: a
  rate from the initial curvature alone can be past the edge a few steps later.) With ``learning_rate``
  given, the applied rate is ``min(learning_rate, fraction * 2 / lam_max)``: the certified rate
  is a ceiling, so a learning rate past the edge is brought back under it.

  Args:
    inner: riemod's step **at learning rate 1**, e.g.
      ``riemod.layerwise_natural_gradient(1.0, geometry=geometry)`` (the aliases
      :func:`certified_natural_gradient` and :func:`certified_layerwise_natural_gradient` build
      it for you).
    geometry: the inner transform's :class:`~riemod.Geometry` (the ``G`` of the estimate is the
      one the inner step was solved with).
    fraction: the learning rate as a fraction of the edge ``2 / lam_max``, in ``(0, 1)``.
    every: steps between estimates (>= 1).
    warmup: the first steps, each with an estimate (0: none but the first). ``None``
      (default): the steps 0, 1, 3, 7, 15, ... below ``every`` (the step count plus one a power
      of two): the curvature changes fastest early, and a task that converges in ~20 steps
      would otherwise spend most of its time on estimates.
    recheck_rise: with ``value=`` (the batch loss) given, a step whose loss exceeds this multiple
      of the moving average of the previous steps' losses is estimated at once, off schedule: a
      step past the edge shows as a rising loss, and the curvature may have grown since the last
      estimate (``None``: off).
    num_steps: Lanczos steps per estimate (>= 1; each estimate is warm-started, but the top
      direction moves between estimates, so fewer than 5 underestimate ``lam_max``).
    memory: in ``[0, 1)``: the rate is set from ``max(new estimate, memory * the previous
      reference)``, so one flat batch does not raise the rate for all the steps to come, whose
      batches may be as sharp as the earlier ones (0: the latest estimate alone).
    hessian: ``"gauss_newton"`` (default, see the module docs) or ``"full"``.
    learning_rate: ``None`` (default: no learning rate, the certified one) or a number/schedule
      capped at the certified rate.
    max_learning_rate: an optional ceiling on the applied rate (``None``: none).
    seed: the start vector of the first estimate.

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``curvature=`` (as the inner
    step), ``apply_fn=`` (``params -> model outputs`` on this batch) and ``loss_fn=``
    (``outputs -> scalar`` batch loss, the one given to
    :func:`riemod.value_grad_and_curvature`). Other keyword arguments (``value=``) go to
    ``inner``.

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> f = lambda p, x: x @ p["w"]
    >>> x, params = jnp.array([[1.0, 0.0], [1.0, 2.0]]), {"w": jnp.zeros((2, 1))}
    >>> loss_fn = lambda y: 0.5 * jnp.mean((y - 1.0) ** 2)
    >>> geometry = riemod.Geometry(mass=1e-2)
    >>> tx = controlled(riemod.layerwise_natural_gradient(1.0, geometry=geometry), geometry)
    >>> state = tx.init(params)
    >>> loss, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
    ...                                                 params=params)
    >>> u, state = tx.update(g, state, params, curvature=curv, value=loss,
    ...                      apply_fn=lambda p: f(p, x), loss_fn=loss_fn)
    >>> round(float(state.learning_rate * state.lam_max), 4)       # fraction * 2
    1.0
  """
  if not isinstance(geometry, Geometry):
    raise TypeError(f"geometry={geometry!r}: pass the riemod.Geometry of the inner transform.")
  if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
    raise ValueError(f"fraction={fraction!r}: the learning rate as a fraction of the edge of "
                     "stability 2/lam_max must lie in (0, 1), e.g. 0.5.")
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"every={every!r}: steps between estimates, an int >= 1 (e.g. 10).")
  doubling = warmup is None
  warmup = 0 if warmup is None else warmup
  if not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"warmup={warmup!r}: the first steps with an estimate each, an int >= 0.")
  if recheck_rise is not None and not recheck_rise > 1:
    raise ValueError(f"recheck_rise={recheck_rise!r}: a loss ratio > 1 (e.g. 1.5) or None.")
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps={num_steps!r}: Lanczos steps per estimate, an int >= 1 (e.g. 5).")
  if not (isinstance(memory, (int, float)) and 0 <= memory < 1):
    raise ValueError(f"memory={memory!r}: the discount per estimate of earlier estimates, in "
                     "[0, 1) (0: the latest estimate alone).")
  if hessian not in HESSIANS:
    raise ValueError(f"hessian={hessian!r}: use one of {HESSIANS}.")
  if max_learning_rate is not None and not max_learning_rate > 0:
    raise ValueError(f"max_learning_rate={max_learning_rate!r}: pass a positive number or None.")

  def init_fn(params):
    state = inner.init(params)
    if find_state(state, MetricState) is None:
      raise ValueError("controlled(...) wraps a transform with riemod.scale_by_metric inside (e.g. "
                       "riemod.layerwise_natural_gradient(1.0, geometry=geometry)); this one has "
                       "none.")
    dtype = jnp.result_type(float)
    vector = gaussian_like(jax.random.key(seed), params)
    return ControllerState(jnp.zeros((), jnp.int32), jnp.zeros((), dtype),
                           jnp.full((), jnp.nan, dtype), jnp.zeros((), jnp.int32), vector, state,
                           jnp.full((), jnp.nan, dtype), jnp.full((), jnp.nan, dtype))

  def estimate(params, metric, vector, apply_fn, loss_fn, dtype, axes):
    metric = metric() if callable(metric) else metric
    flat, unravel = ravel_pytree(params)
    ravel = lambda tree: ravel_pytree(tree)[0]
    solve = lambda v: ravel(metric.solve(unravel(v)))
    matvec = lambda v: ravel(metric.matvec(unravel(v)))
    apply_flat = lambda f: apply_fn(unravel(f))
    if hessian == "gauss_newton":
      hvp = gauss_newton_product(apply_flat, flat, loss_fn)
    else:
      grad = jax.grad(lambda f: loss_fn(apply_flat(f)))
      hvp = lambda v: jax.jvp(grad, (flat,), (v,))[1]
    hvp = fast_convolutions_on_cpu(hvp)
    if axes:
      hvp = _whole_batch_product(hvp, axes)
    # Where the solve is G^{-1}, the basis's G products come from the solves: one metric
    # product per estimate instead of num_steps (digits autoencoder: 3.0 -> 2.3 ms per
    # estimate, the same lam_max to 5e-7; benchmarks/results/estimate_products.md).
    lam, ritz = top_ritz_pair(hvp, solve, matvec, ravel(vector).astype(flat.dtype), num_steps,
                              metric_products=not geometry.exact_solve)
    return lam.astype(dtype), jax.tree.map(lambda r, v: r.astype(v.dtype), unravel(ritz), vector)

  def update_fn(updates, state, params=None, *, curvature=None,
                apply_fn: Callable[[Any], jax.Array] | None = None,
                loss_fn: Callable[[jax.Array], jax.Array] | None = None, **extra_args):
    if curvature is None:
      raise ValueError("controlled(...) needs curvature= (from riemod.value_grad_and_curvature).")
    if params is None or apply_fn is None or loss_fn is None:
      raise ValueError("controlled(...) needs params, apply_fn= (params -> model outputs on this "
                       "batch) and loss_fn= (outputs -> loss, as given to "
                       "value_grad_and_curvature) for the Hessian products; e.g. "
                       "tx.update(grads, state, params, curvature=c, value=loss, "
                       "apply_fn=lambda p: model_fn(p, x), loss_fn=loss_fn).")
    step, inner_state = inner.update(updates, state.inner_state, params, curvature=curvature,
                                     **extra_args)
    dtype = state.lam_max.dtype
    # Estimate on schedule, and at every step until a first valid estimate exists.
    due = (state.count % every == 0) | (state.count < warmup) | ~jnp.isfinite(state.lam_max)
    if doubling:  # steps 1, 3, 7, 15, ... below `every` (count + 1 a power of two)
      due = due | ((state.count < every) & ((state.count & (state.count + 1)) == 0))
    value = extra_args.get("value")
    smoothed = state.smoothed_value
    if value is not None:
      value = jnp.asarray(value, dtype)
      if recheck_rise is not None:  # NaN comparisons are False: no previous value, no recheck
        due = due | (value > recheck_rise * smoothed)
      # A non-finite loss is not averaged in (the inner transform's policy answers it).
      smoothed = jnp.where(~jnp.isfinite(value), smoothed,
                           jnp.where(jnp.isnan(smoothed), value,
                                     SMOOTHING * smoothed + (1 - SMOOTHING) * value))
    metric = lambda: geometry.compose(curvature, find_state(inner_state, MetricState).geometry)
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(updates))
    if traced and not _mesh.bound(curvature.axis_name):
      # The G the inner step was solved with, composed again at the top level of the traced
      # step: the same operations on the same inputs as the inner step's, which XLA merges into
      # one factorisation per step, so an estimate adds only its products and solves (composed
      # inside the cond, the blocks were factored twice on estimate steps). Not when running
      # eagerly (nothing would merge the two) nor on a mesh, where the spread step leaves
      # compose's factors unused and compiles them away: there a top-level compose would factor
      # every block every step, so the estimate composes its own inside the cond.
      metric = metric()
    def estimated():
      lam, vector = estimate(params, metric, state.vector, apply_fn, loss_fn, dtype,
                             curvature.axis_name if _mesh.bound(curvature.axis_name) else ())
      # The new Ritz vector only with a valid estimate; selected in the branch, so the steps
      # without an estimate copy nothing (a select per leaf after the cond was 16 of the 27
      # fusions the controller added to the digits autoencoder's step).
      valid = jnp.isfinite(lam) & (lam > 0)
      return lam, jax.tree.map(lambda new, old: jnp.where(valid, new, old), vector, state.vector)

    lam, vector = jax.lax.cond(due, estimated, lambda: (state.lam_max, state.vector))
    valid = jnp.isfinite(lam) & (lam > 0)
    lam = jnp.where(valid, lam, state.lam_max)
    # fmax: the first estimate (reference NaN) is taken as it is.
    edge = jnp.where(valid & due, jnp.fmax(lam, memory * state.edge_lam), state.edge_lam)
    certified = jnp.where(valid, 2.0 * fraction / jnp.where(valid, edge, 1.0), state.learning_rate)
    lr = certified
    if learning_rate is not None:
      lr = jnp.minimum(lr, jnp.asarray(_schedule_value(learning_rate, state.count), dtype))
    if max_learning_rate is not None:
      lr = jnp.minimum(lr, max_learning_rate)
    lr = lr.astype(dtype)
    step = jax.tree.map(lambda s: (lr * s).astype(s.dtype), step)
    return step, ControllerState(state.count + 1, lr, lam,
                                 state.estimates + due.astype(jnp.int32), vector, inner_state,
                                 smoothed, edge)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def certified_geometry(structure: str = "layerwise", mass: optax.ScalarOrSchedule | None = None,
                       geometry: Geometry | None = None) -> Geometry:
  """The geometry a certified alias steps with: ``geometry``, or by default the Kronecker mass.

  Example:
    >>> import riemod
    >>> certified_geometry().mass_policy == riemod.masses.kronecker()
    True
  """
  if geometry is None:
    # The Kronecker mass by default: its memory of the curvature outside this batch's rows is
    # what lets the digits autoencoder (32 sketched rows per step) train without tuning; under
    # the constant mass 1e-2 its first steps are refused by the precision check
    # (benchmarks/results/tuning_free.md, rows riemod-certified and riemod-certified-constant).
    return alias_geometry(structure, None, Geometry(mass=mass, mass_policy=masses.kronecker(),
                                                    structure=structure))
  return alias_geometry(structure, mass, geometry)


def _certified(structure, builder, mass, geometry, fraction, every, warmup, recheck_rise,
               num_steps, memory, hessian, learning_rate, max_learning_rate, momentum,
               on_nonfinite, max_error):
  geometry = certified_geometry(structure, mass, geometry)
  inner = builder(1.0, geometry=geometry, momentum=momentum, on_nonfinite=on_nonfinite,
                  max_error=max_error)
  return controlled(inner, geometry, fraction=fraction, every=every, warmup=warmup,
                    recheck_rise=recheck_rise, num_steps=num_steps, memory=memory,
                    hessian=hessian, learning_rate=learning_rate,
                    max_learning_rate=max_learning_rate)


def certified_layerwise_natural_gradient(
    mass: optax.ScalarOrSchedule | None = None, *, geometry: Geometry | None = None,
    fraction: float = 0.5, every: int = 30, warmup: int | None = None,
    recheck_rise: float | None = 2.0, num_steps: int = 5, memory: float = 0.8,
    hessian: str = "gauss_newton",
    learning_rate: optax.ScalarOrSchedule | None = None, max_learning_rate: float | None = None,
    momentum: float | None = 0.8, on_nonfinite: str = "error",
    max_error: float | None = 1e-2) -> optax.GradientTransformationExtraArgs:
  """:func:`riemod.layerwise_natural_gradient` with no learning rate: the certified one.

  ``controlled(layerwise_natural_gradient(1.0, geometry=geometry, ...), geometry, ...)``; the
  arguments are those of the two, with SPRING ``momentum=0.8`` by default (the certified rate
  holds with momentum; see the module docs). The default geometry takes the Kronecker mass
  (``riemod.Geometry(mass, mass_policy=riemod.masses.kronecker())``, mass default 1: ``D =
  A (x) S`` on dense and convolution modules, ``1e-2 I`` on others); ``mass=`` is shorthand for
  that geometry with another mass. ``update`` needs ``curvature=``, ``apply_fn=`` and ``loss_fn=`` (see
  :func:`controlled`).

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> tx = certified_layerwise_natural_gradient(geometry=riemod.Geometry(
    ...     mass_policy=riemod.masses.adaptive()))
    >>> state = tx.init({"w": jnp.zeros((3, 2))})
    >>> float(state.learning_rate)         # set by the first estimate
    0.0
  """
  return _certified("layerwise", layerwise_natural_gradient, mass, geometry, fraction, every,
                    warmup, recheck_rise, num_steps, memory, hessian, learning_rate,
                    max_learning_rate, momentum, on_nonfinite, max_error)


def certified_natural_gradient(
    mass: optax.ScalarOrSchedule | None = None, *, geometry: Geometry | None = None,
    fraction: float = 0.5, every: int = 30, warmup: int | None = None,
    recheck_rise: float | None = 2.0, num_steps: int = 5, memory: float = 0.8,
    hessian: str = "gauss_newton",
    learning_rate: optax.ScalarOrSchedule | None = None, max_learning_rate: float | None = None,
    momentum: float | None = 0.8, on_nonfinite: str = "error",
    max_error: float | None = 1e-2) -> optax.GradientTransformationExtraArgs:
  """:func:`riemod.natural_gradient` (whole-network ``G``) with the certified learning rate.

  As :func:`certified_layerwise_natural_gradient`, with ``structure="full"``.

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> tx = certified_natural_gradient(1e-3, fraction=0.4, every=20)
    >>> state = tx.init({"w": jnp.zeros((3, 2))})
  """
  return _certified("full", natural_gradient, mass, geometry, fraction, every, warmup,
                    recheck_rise, num_steps, memory, hessian, learning_rate, max_learning_rate,
                    momentum, on_nonfinite, max_error)


def certified_gauss_newton(
    mass: float | None = None, *, cutoff: float | None = None, max_error: float = 1e-2,
    fraction: float = 0.5, every: int = 30, warmup: int | None = None, num_steps: int = 5,
    num: int = 31, on_nonfinite: str = "error") -> optax.GradientTransformationExtraArgs:
  """The certified step at the Gauss-Newton limit, for full-batch least squares (PINNs).

  A whole-network step (``structure="full"``) whose mass starts where it damps nothing the
  solve can resolve, the certified learning rate, a grid line search up to the edge of
  stability, and Levenberg-Marquardt adaptation of the mass::

    levenberg_marquardt(chain(certified_natural_gradient(geometry=Geometry(mass, cutoff=cutoff),
                                                         momentum=None),
                              scale_by_grid_linesearch(1 / fraction, 0.5, num)), geometry)

  The solve's constants follow from the precision asked for, not from the problem:

  * ``cutoff`` (default :func:`riemod.composer.precision_cutoff` of ``max_error``): the truncated
    solve keeps exactly the directions it can solve to ``max_error`` in the working dtype
    (``8.9e-14`` in float64), so a step is never refused for its conditioning;
  * ``mass`` (default: the cut-off): below the smallest kept eigenvalue of a Gramian whose
    largest is ``>= 1``, so the kept directions get the undamped Gauss-Newton step (the
    minimum-norm least-squares step ``lstsq(J^T J, g, rcond=cutoff)``);
  * at that limit ``lam_max(G^+ H_GN) = 1``, so the certified rate is ``2 fraction``; the grid
    ``max_step = 1 / fraction`` times ``0.5^k`` (``k < num``; ENGD's grid) runs from the edge
    of stability ``2 / lam_max`` down, and the candidate with the lowest loss is taken;
  * :func:`riemod.certify.levenberg_marquardt` at its defaults raises the mass by decades, up to
    ``1e4`` times its start, while even the searched step recovers under 1% of the model's
    decrease, and lowers it again when the model is good (those defaults were chosen on the
    Poisson PINN's tuning seeds; ``benchmarks/task_engd_poisson.py``).

  No momentum: on these deterministic full-batch losses the line search already picks the
  step length, and SPRING momentum reached the threshold later or not at all on the Poisson
  PINN's tuning seeds (``benchmarks/results/tuning_free.md``).

  Args:
    mass: the starting (and smallest) constant mass; default ``cutoff``.
    cutoff: the truncated solve's relative cut-off; default ``precision_cutoff(max_error)`` in
      JAX's default float dtype at construction.
    max_error: the precision check's largest accepted relative error (see
      :func:`riemod.apply_if_valid`).
    fraction, every, warmup, num_steps: the controller's (see :func:`controlled`).
    num: the line search's grid size.
    on_nonfinite: the refusal policy of the inner step (see :func:`riemod.apply_if_valid`).

  Returns:
    A ``GradientTransformationExtraArgs`` whose ``update`` needs ``curvature=``, ``value=``
    (the loss at ``params``), ``value_fn=`` (``params -> loss`` on the same batch), and
    ``apply_fn=``/``loss_fn=`` (see :func:`controlled`).

  Example:
    >>> import jax.numpy as jnp, optax, riemod
    >>> x = jnp.linspace(0.0, 1.0, 8)
    >>> f = lambda p, x: p["a"] * jnp.exp(p["b"] * x)
    >>> loss_fn = lambda y: 0.5 * jnp.mean((y - 2.0 * jnp.exp(-x)) ** 2)
    >>> params = {"a": jnp.asarray(1.0), "b": jnp.asarray(0.0)}
    >>> tx = riemod.certify.certified_gauss_newton()
    >>> state = tx.init(params)
    >>> for _ in range(8):
    ...   loss, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
    ...                                                   params=params)
    ...   u, state = tx.update(g, state, params, curvature=curv, value=loss,
    ...                        value_fn=lambda p: loss_fn(f(p, x)), apply_fn=lambda p: f(p, x),
    ...                        loss_fn=loss_fn)
    ...   params = optax.apply_updates(params, u)
    >>> round(float(params["a"]), 4), round(float(params["b"]), 4)
    (2.0, -1.0)

  References:
    J. Mueller and M. Zeinhofer, *Achieving High Accuracy with PINNs via Energy Natural Gradient
    Descent*, ICML 2023 (the Gauss-Newton least-squares step with a cut-off, and its grid line
    search).
    D. Marquardt, *An algorithm for least-squares estimation of nonlinear parameters*, SIAM J.
    Appl. Math. 11 (1963).
  """
  if not (isinstance(fraction, (int, float)) and 0 < fraction < 1):
    raise ValueError(f"fraction={fraction!r}: the learning rate as a fraction of the edge of "
                     "stability 2/lam_max must lie in (0, 1), e.g. 0.5.")
  if not isinstance(num, int) or num < 1:
    raise ValueError(f"num={num!r}: the line search's grid size, an int >= 1 (e.g. 31).")
  cutoff = precision_cutoff(max_error) if cutoff is None else cutoff
  geometry = Geometry(mass=cutoff if mass is None else mass, structure="full", cutoff=cutoff)
  step = certified_natural_gradient(geometry=geometry, fraction=fraction, every=every,
                                    warmup=warmup, num_steps=num_steps, momentum=None,
                                    on_nonfinite=on_nonfinite, max_error=max_error)
  searched = optax.chain(step, scale_by_grid_linesearch(1.0 / fraction, 0.5, num))
  return levenberg_marquardt(searched, geometry)

"""optax transformations: layerwise and full natural-gradient steps with the Woodbury composer.

For a batch-mean loss with output-metric rows ``L_o`` (each divided by ``sqrt(B)``), module ``a``
with gradient ``g_a``, ``K_a = L_o J_a`` and mass ``D_a``:

* :func:`layerwise_natural_gradient`: ``-lr (K_a^T K_a + D_a)^{-1} g_a`` for every module;
* :func:`natural_gradient`: the same with the whole network as one block (cross-module blocks of
  ``K^T K`` included), from summed per-module kernels in sample space;
* ``euclidean`` modules get ``-lr D_a^{-1} g_a`` and ``frozen`` modules zero.

Momentum (``momentum=mu``) is SPRING (Goldshlager, Abrahamsen & Lin, arXiv 2401.10190):
``phi_k = mu phi_{k-1} + G^{-1}(g - mu K^T K phi_{k-1})``. Since ``K^T K = G - D`` this is
``phi_k = G^{-1}(g + mu D phi_{k-1})``: one solve with the already factored ``G``, no extra
factorisation. For euclidean modules (``G = D``) it is heavy-ball momentum.

Curvature enters as the keyword extra argument ``curvature`` (from
:func:`riemod.value_grad_and_curvature`). The state tracks the terms of the action functional
(``METHOD.md`` sec. 6): per step ``g^T G^{-1} g`` and the cumulative discrete action
``S = sum_k lr_k g_k^T G_k^{-1} g_k``: on the Riemannian gradient flow both terms of the integrand
``0.5 |w'|_G^2 + 0.5 g^T G^{-1} g`` equal ``0.5 g^T G^{-1} g`` and ``dt = lr``.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from riemod.composer.metric import STRUCTURES, compose_metric
from riemod.composer.rms_mass import rms_scaled_curvature
from riemod.state import find_state

NONFINITE_POLICIES = ("error", "skip", "ignore")


class LayerwiseMetricState(NamedTuple):
  """State of :func:`scale_by_layerwise_metric`.

  Per-leaf diagnostics are flat arrays over ``jax.tree.leaves(params)``; the block a leaf belongs to
  gives its ``condition`` (lower-bound estimate of the factored matrix's condition number),
  ``residual`` (relative residual of the small solve; NaN unless the transform was built with
  ``residuals=True``) and ``jitter``. Use
  :func:`riemod.module_diagnostics` to read them per module. ``momentum_buffer`` holds the last
  step (SPRING momentum only) and ``second_moment`` the moving average of squared gradients
  (adaptive mass only); both are ``None`` otherwise.
  """

  count: jax.Array
  action: jax.Array
  metric_grad_norm_sq: jax.Array
  initial_loss: jax.Array
  last_loss: jax.Array
  skipped_steps: jax.Array
  condition: jax.Array
  residual: jax.Array
  jitter: jax.Array
  step_norm: jax.Array
  momentum_buffer: Any = None
  second_moment: Any = None


def _float():
  return jnp.result_type(float)


def _raise_nonfinite(bad_grads, bad_curvature, bad_step):
  what = [name for name, bad in (("updates (the gradient)", bad_grads),
                                 ("curvature", bad_curvature),
                                 ("the solved step", bad_step)) if np.any(bad)]
  if what:
    raise FloatingPointError(
        f"riemod: non-finite values in {', '.join(what)}. Check the loss and inputs for NaN/inf, "
        "raise the mass if the metric is near-singular, or pass on_nonfinite='skip' to skip such "
        "steps (parameters unchanged, state.skipped_steps counts them).")
  return np.zeros(np.shape(bad_grads), np.int32)  # batched under jax.vmap


def _report_nonfinite(ok, ok_grads, ok_curvature, ok_step) -> jax.Array:
  """Raises on the host if ``ok`` is false; returns an int32 zero to be added to the state.

  The host call sits in the branch taken only on failure, and it is a ``pure_callback`` whose
  zero result the updates and state depend on (so it is never dropped): unlike ``jax.debug.callback``, it
  adds no side-effect ordering to the step, which on XLA:CPU cost ~0.6 ms per digits-MLP step.
  The error reaches the caller when the step's results are next read (jax dispatches
  asynchronously).
  """
  def report():
    return jax.pure_callback(_raise_nonfinite, jax.ShapeDtypeStruct((), jnp.int32),
                             ~ok_grads, ~ok_curvature, ~ok_step, vmap_method="broadcast_all")
  return jax.lax.cond(ok, lambda: jnp.zeros((), jnp.int32), report)


def _scale_leaves(tree: Any, scales: list[Any], inverse: bool = False) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [
      x if s is None else (x / s if inverse else x * s) for x, s in zip(leaves, scales)])


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def scale_by_layerwise_metric(
    mass: optax.ScalarOrSchedule = 1e-2,
    *,
    structure: str = "layerwise",
    space: str = "auto",
    on_nonfinite: str = "error",
    learning_rate: optax.ScalarOrSchedule = 1.0,
    momentum: float | None = None,
    residuals: bool = False,
    rms_decay: float | None = None,
    rms_eps: float = 1e-8,
    refine: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients by ``G^{-1}``, ``G = K^T K + D`` (no learning rate, no sign flip).

  Args:
    mass: default mass ``D`` for modules that declare none (> 0), or an optax schedule of the
      step count (e.g. a damping that decays over training; module declarations are not
      scheduled). ``mass -> inf`` gives ``g / mass``, i.e. SGD with learning rate ``lr / mass``.
    structure: ``"layerwise"`` (block diagonal over modules) or ``"full"`` (one block).
    space: ``"auto"``, ``"sample"`` (Woodbury) or ``"parameter"`` solves per block.
    on_nonfinite: ``"error"`` raises ``FloatingPointError`` on non-finite gradients, curvature
      or steps (a host callback in a branch taken only on failure; the error surfaces when the
      step's results are read); ``"skip"`` returns a zero update and counts it in
      ``skipped_steps``; ``"ignore"`` checks nothing.
    learning_rate: used only to accumulate the action ``sum lr_k g^T G^{-1} g`` (the aliases
      pass theirs).
    momentum: SPRING momentum ``mu`` in ``[0, 1)`` (``None``: off, no buffer in the state).
    residuals: record the relative residual of every block's small solve in ``state.residual``.
      Off by default: it reads each ``d x d`` factor once more (about 3% of an exact-Fisher step
      on a CPU); when off the field holds NaN.
    rms_decay: make the default mass adaptive: ``mass * (sqrt(v) + rms_eps)`` per parameter,
      ``v`` the bias-corrected moving average of squared gradients with this decay (Adam's
      ``b2``, e.g. 0.99); rank-one (Adafactor) for dense kernels so their kernels stay cheap (see
      :mod:`riemod.composer.rms_mass`). Outside the factor's range the step is then Adam's
      scaling instead of ``1 / mass``. ``None``: a constant mass.
    rms_eps: added to ``sqrt(v)``.
    refine: one step of iterative refinement of each small solve against the metric as an
      operator (``refinement_steps=1`` of :func:`riemod.compose_metric`): corrects round-off
      where ``G`` is ill-conditioned (float32 solves 5-15x closer to a float64 reference in the
      tests). It costs one more ``K`` and ``K^T`` product per module and two triangular solves.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``curvature=`` and accepts
    ``value=`` (the loss) for the action bookkeeping.

  Example:
    >>> import jax.numpy as jnp, optax, riemod
    >>> tx = optax.chain(riemod.scale_by_layerwise_metric(mass=1e-2), optax.scale(-0.1))
    >>> state = tx.init({"w": jnp.zeros((3, 2))})
  """
  if structure not in STRUCTURES:
    raise ValueError(f"structure={structure!r}: use one of {STRUCTURES}.")
  if on_nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"on_nonfinite={on_nonfinite!r}: use one of {NONFINITE_POLICIES}.")
  if isinstance(mass, (int, float)) and not (mass > 0 and mass < float("inf")):
    raise ValueError(f"mass={mass!r}: the mass must be a finite positive number, e.g. 1e-2.")
  if isinstance(momentum, (int, float)) and not 0 <= momentum < 1:
    raise ValueError(f"momentum={momentum!r}: SPRING momentum must lie in [0, 1), e.g. 0.8.")
  if isinstance(rms_decay, (int, float)) and not 0 <= rms_decay < 1:
    raise ValueError(f"rms_decay={rms_decay!r}: the second-moment decay must lie in [0, 1), "
                     "e.g. 0.99 (or None for a constant mass).")
  if isinstance(rms_eps, (int, float)) and not rms_eps > 0:
    raise ValueError(f"rms_eps={rms_eps!r}: must be > 0, e.g. 1e-8.")

  def init_fn(params):
    n = len(jax.tree.leaves(params))
    zero = jnp.zeros((), _float())
    nan = jnp.full((), jnp.nan, _float())
    per_leaf = jnp.zeros((n,), _float())
    return LayerwiseMetricState(
        count=jnp.zeros((), jnp.int32), action=zero, metric_grad_norm_sq=zero,
        initial_loss=nan, last_loss=nan, skipped_steps=jnp.zeros((), jnp.int32),
        condition=per_leaf, residual=per_leaf, jitter=per_leaf, step_norm=per_leaf,
        momentum_buffer=None if momentum is None else jax.tree.map(jnp.zeros_like, params),
        second_moment=None if rms_decay is None else jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, *, curvature=None, value=None, **extra_args):
    del params, extra_args
    if curvature is None:
      raise ValueError(
          "riemod's natural-gradient transforms need the curvature: call "
          "tx.update(grads, state, params, curvature=curvature) (or "
          "optimizer.update(model, grads, curvature=curvature)) with the curvature from "
          "riemod.value_grad_and_curvature. Without it there is no metric to solve with.")
    default_mass = mass(state.count) if callable(mass) else mass
    second_moment, scales = None, None
    grads, previous = updates, state.momentum_buffer
    if rms_decay is not None:
      second_moment = jax.tree.map(lambda v, g: rms_decay * v + (1 - rms_decay) * g * g,
                                   state.second_moment, updates)
      correction = 1 - rms_decay ** optax.safe_increment(state.count).astype(_float())
      curvature, scales = rms_scaled_curvature(
          curvature, [v / correction.astype(v.dtype) for v in jax.tree.leaves(second_moment)],
          default_mass, rms_eps)
      # Solve S G S in the scaled variables: gradient S g, carried step S^{-1} phi.
      grads = _scale_leaves(updates, scales)
      if previous is not None:
        previous = _scale_leaves(previous, scales, inverse=True)
    metric = compose_metric(curvature, mass=default_mass, structure=structure, space=space,
                            refinement_steps=int(bool(refine)))
    leaves = jax.tree.leaves(grads)
    dtype = _float()
    if momentum is None:
      direction, block_residuals = metric.solve_with_residuals(grads)
      g_ginv_g = sum(jnp.vdot(g, d).real
                     for g, d in zip(leaves, jax.tree.leaves(direction))).astype(dtype)
    else:
      direction, g_ginv_g, block_residuals = metric.spring_solve(grads, previous, momentum)
      g_ginv_g = jnp.asarray(g_ginv_g).real.astype(dtype)
    if scales is not None:
      direction = _scale_leaves(direction, scales)
    dir_leaves = jax.tree.leaves(direction)

    per_leaf = {name: [jnp.zeros((), dtype)] * len(leaves)
                for name in ("condition", "residual", "jitter")}
    for block, members, res in zip(metric.blocks, metric.block_modules, block_residuals):
      block_values = {"condition": block.condition_estimate(),
                      "residual": res if residuals else jnp.full((), jnp.nan, dtype),
                      "jitter": block.jitter}
      for i in (i for m in members for i in curvature.modules[m].leaf_indices):
        for name, block_value in block_values.items():
          per_leaf[name][i] = block_value.astype(dtype)
    condition, residual, jitter = (jnp.stack(per_leaf[name]) if leaves else jnp.zeros((0,), dtype)
                                   for name in ("condition", "residual", "jitter"))
    step_norm = jnp.stack([jnp.linalg.norm(d).astype(dtype) for d in dir_leaves]) if (
        dir_leaves) else jnp.zeros((0,), dtype)

    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    loss = jnp.asarray(jnp.nan if value is None else value, dtype)
    new_state = LayerwiseMetricState(
        count=optax.safe_increment(state.count),
        action=state.action + jnp.asarray(lr, dtype) * g_ginv_g,
        metric_grad_norm_sq=g_ginv_g,
        initial_loss=jnp.where(state.count == 0, loss, state.initial_loss),
        last_loss=loss, skipped_steps=state.skipped_steps, condition=condition,
        residual=residual, jitter=jitter, step_norm=step_norm,
        momentum_buffer=None if momentum is None else direction, second_moment=second_moment)

    if on_nonfinite == "ignore":
      return direction, new_state
    ok_grads = _all_finite(updates)
    ok_curvature = _all_finite(curvature)
    ok_step = _all_finite(direction)
    ok = ok_grads & ok_curvature & ok_step
    if on_nonfinite == "error":
      zero = _report_nonfinite(ok, ok_grads, ok_curvature, ok_step)
      # The updates and the state both depend on the check, so neither can be used without it.
      direction = jax.tree.map(lambda d: d + zero.astype(d.dtype), direction)
      return direction, new_state._replace(skipped_steps=new_state.skipped_steps + zero)
    # Skip: parameters unchanged, only the skip counter moves.
    direction = jax.tree.map(lambda d: jnp.where(ok, d, jnp.zeros_like(d)), direction)
    skipped_state = state._replace(skipped_steps=state.skipped_steps + 1)
    new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, skipped_state)
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def layerwise_natural_gradient(
    learning_rate: optax.ScalarOrSchedule,
    mass: optax.ScalarOrSchedule = 1e-2,
    *,
    momentum: float | None = None,
    space: str = "auto",
    on_nonfinite: str = "error",
    residuals: bool = False,
    rms_decay: float | None = None,
    rms_eps: float = 1e-8,
    refine: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Layerwise Riemannian (natural-gradient / Gauss-Newton) descent: ``-lr (K_a^T K_a + D_a)^{-1} g_a``.

  Args:
    learning_rate: step size or optax schedule.
    mass: default mass for modules that declare none, or a schedule of the step count.
    momentum: SPRING momentum in ``[0, 1)`` (``None``: off).
    space: per-block solve space (``"auto"``, ``"sample"``, ``"parameter"``).
    on_nonfinite: ``"error"``, ``"skip"`` or ``"ignore"`` (see :func:`scale_by_layerwise_metric`).
    residuals: record the small solves' residuals in the state (see
      :func:`scale_by_layerwise_metric`).
    rms_decay, rms_eps: an adaptive per-parameter mass from the gradients' second moment (see
      :func:`scale_by_layerwise_metric`; ``None``: constant).
    refine: iterative refinement of the small solves (see :func:`scale_by_layerwise_metric`).

  Example:
    >>> import jax, jax.numpy as jnp, riemod
    >>> f = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.zeros((3, 1))}
    >>> x, t = jnp.ones((8, 3)), jnp.ones((8, 1))
    >>> loss, g, curv = riemod.value_grad_and_curvature(
    ...     f, x, lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1)),
    ...     riemod.metrics.identity(), params=params)
    >>> tx = riemod.layerwise_natural_gradient(learning_rate=1.0, mass=1e-3)
    >>> updates, state = tx.update(g, tx.init(params), params, curvature=curv)
    >>> bool(jnp.all(updates["w"] > 0))
    True
  """
  return optax.chain(
      scale_by_layerwise_metric(mass, structure="layerwise", space=space,
                                on_nonfinite=on_nonfinite, learning_rate=learning_rate,
                                momentum=momentum, residuals=residuals,
                                rms_decay=rms_decay, rms_eps=rms_eps,
                                refine=refine),
      optax.scale_by_learning_rate(learning_rate))


def natural_gradient(
    learning_rate: optax.ScalarOrSchedule,
    mass: optax.ScalarOrSchedule = 1e-2,
    *,
    momentum: float | None = None,
    space: str = "auto",
    on_nonfinite: str = "error",
    residuals: bool = False,
    rms_decay: float | None = None,
    rms_eps: float = 1e-8,
    refine: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Whole-network damped natural-gradient / Gauss-Newton descent: ``-lr (K^T K + D)^{-1} g``.

  One block for all layerwise modules; the kernel is the sum of per-module kernels, so no
  ``n x n`` matrix is formed. Arguments as :func:`layerwise_natural_gradient`.
  """
  return optax.chain(
      scale_by_layerwise_metric(mass, structure="full", space=space,
                                on_nonfinite=on_nonfinite, learning_rate=learning_rate,
                                momentum=momentum, residuals=residuals,
                                rms_decay=rms_decay, rms_eps=rms_eps,
                                refine=refine),
      optax.scale_by_learning_rate(learning_rate))


def module_diagnostics(state: Any, curvature: Any) -> dict[str, dict[str, float]]:
  """Per-module diagnostics from an optimizer state (searched inside chains) and its curvature.

  Returns ``{module name: {"condition", "residual", "jitter", "step_norm"}}``; the step norm is
  the norm of the module's preconditioned gradient ``G^{-1} g``.
  """
  inner = find_state(state, LayerwiseMetricState)
  if inner is None:
    raise ValueError("No riemod LayerwiseMetricState inside this optimizer state.")
  out = {}
  for module in curvature.modules:
    idx = jnp.asarray(module.leaf_indices)
    out[module.name] = {
        "condition": float(jnp.max(inner.condition[idx])),
        "residual": float(jnp.max(inner.residual[idx])),
        "jitter": float(jnp.max(inner.jitter[idx])),
        "step_norm": float(jnp.sqrt(jnp.sum(inner.step_norm[idx] ** 2))),
    }
  return out

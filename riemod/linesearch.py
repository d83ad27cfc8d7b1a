"""A grid line search along a given step: the best of a few step sizes by the loss.

For an incoming update ``u`` (the step to add to the parameters, i.e. already sign-flipped) the
transform evaluates ``value_fn(params + a u)`` for every step size ``a`` of a fixed grid and returns
``a* u`` for the candidate with the smallest finite loss. With the default grid
``a = max_step * factor**k, k = 0..num-1`` this is the line search of energy natural gradient
(ENGD; Mueller & Zeinhofer, *Achieving High Accuracy with PINNs via Energy Natural Gradient
Descent*, ICML 2023), which lets a Gauss-Newton step with tiny damping take the full step when the
quadratic model is good and a short one when it is not.

All candidates are evaluated in one batched call: ``jax.vmap`` over the step sizes by default (one
launch, the candidates share every kernel; memory ``num`` times one loss evaluation), or
``jax.lax.map(..., batch_size=chunk_size)`` when ``chunk_size`` is given (sequential chunks of
``chunk_size`` candidates: bounded memory, for losses too large to evaluate ``num`` times at once).
Both give the same losses.

Chain it after a transform whose output is the step, e.g.::

    tx = optax.chain(riemod.natural_gradient(1.0, mass=1e-8),
                     riemod.scale_by_grid_linesearch(max_step=1.0, factor=0.5, num=12))
    updates, state = tx.update(grads, state, params, curvature=curvature, value=loss,
                               value_fn=loss_of_params)

Extra arguments follow optax's line searches (:func:`optax.scale_by_backtracking_linesearch`):
``value=`` (the loss at ``params``), ``value_fn=`` (``params -> loss`` on the same batch); others
(``curvature=``, ``grad=``) are accepted and ignored, so the search chains after riemod's
transforms and inside ``nnx.Optimizer`` (whose ``update`` forwards keyword arguments).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

NO_DECREASE_POLICIES = ("best", "smallest", "zero")


class GridLinesearchState(NamedTuple):
  """State of :func:`scale_by_grid_linesearch`.

  Attributes:
    count: steps taken.
    step_size: the step size ``a`` of the last step (0 when it was a zero step).
    value: the loss ``value_fn(params + a u)`` of the last step's chosen candidate (the loss at
      ``params`` for a zero step; NaN before the first step).
    no_decrease_steps: steps where no candidate lowered the loss below ``value``.
    nonfinite_steps: steps where every candidate's loss was non-finite (zero steps).
  """

  count: jax.Array
  step_size: jax.Array
  value: jax.Array
  no_decrease_steps: jax.Array
  nonfinite_steps: jax.Array


def _grid(max_step, factor, num, step_sizes):
  if step_sizes is not None:
    sizes = tuple(float(a) for a in step_sizes)
    if not sizes or not all(0 < a < float("inf") for a in sizes):
      raise ValueError(f"step_sizes={step_sizes!r}: need at least one finite positive step size.")
    return sizes
  if not (0 < max_step < float("inf")):
    raise ValueError(f"max_step={max_step!r}: must be finite and positive, e.g. 1.0.")
  if not 0 < factor < 1:
    raise ValueError(f"factor={factor!r}: must lie in (0, 1), e.g. 0.5.")
  if int(num) != num or num < 1:
    raise ValueError(f"num={num!r}: the number of step sizes must be a positive integer.")
  return tuple(float(max_step) * float(factor) ** k for k in range(int(num)))


def scale_by_grid_linesearch(
    max_step: float = 1.0,
    factor: float = 0.5,
    num: int = 12,
    *,
    step_sizes: Any = None,
    on_no_decrease: str = "best",
    chunk_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales the update ``u`` by the grid step size ``a`` minimising ``value_fn(params + a u)``.

  The grid is ``max_step * factor**k`` for ``k = 0, ..., num - 1`` (ENGD's ``0.5**k``), or
  ``step_sizes`` if given. Ties go to the larger step.

  * **No decrease** (no candidate's loss is below ``value``, the loss at ``params``):
    ``on_no_decrease="best"`` (default, as ENGD) still takes the candidate with the smallest loss,
    so a deterministic full-batch run never stalls; ``"smallest"`` takes the smallest step size of
    the grid; ``"zero"`` returns a zero update (parameters unchanged: with a deterministic
    full-batch loss and an unchanged direction the next step repeats it, so pair ``"zero"`` with
    minibatches or an adaptive damping such as :func:`riemod.certify.guarded`). Such steps are
    counted in ``no_decrease_steps``. Without ``value=`` the loss at ``params`` is evaluated with
    ``value_fn`` (one more evaluation).
  * **Every candidate non-finite** (a non-finite direction, or a loss that overflows on the whole
    grid): a zero update, counted in ``nonfinite_steps``; never a NaN step.

  Args:
    max_step: the largest step size (> 0).
    factor: ratio of consecutive step sizes, in ``(0, 1)``.
    num: number of step sizes.
    step_sizes: an explicit grid (positive floats), overriding ``max_step, factor, num``.
    on_no_decrease: ``"best"``, ``"smallest"`` or ``"zero"`` (above).
    chunk_size: ``None`` evaluates all candidates at once with ``jax.vmap``; an integer evaluates
      them with ``jax.lax.map`` in sequential chunks of that many (less memory, same result).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` and
    ``value_fn=`` (``params -> scalar loss``), accepts ``value=`` (the loss at ``params``) and
    ignores any other extra argument.

  References:
    Müller & Zeinhofer, *Achieving High Accuracy with PINNs via Energy Natural Gradient Descent*
    (ICML 2023): the grid line search of ENGD.

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> value_fn = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = riemod.scale_by_grid_linesearch(max_step=4.0, factor=0.5, num=4)  # 4, 2, 1, 0.5
    >>> u, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params, value_fn=value_fn)
    >>> float(state.step_size), float(state.value)
    (1.0, 0.0)
  """
  sizes = _grid(max_step, factor, num, step_sizes)
  if on_no_decrease not in NO_DECREASE_POLICIES:
    raise ValueError(f"on_no_decrease={on_no_decrease!r}: use one of {NO_DECREASE_POLICIES}.")
  if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
    raise ValueError(f"chunk_size={chunk_size!r}: a positive integer, or None for jax.vmap.")

  def init_fn(params):
    del params
    dtype = jnp.result_type(float)
    return GridLinesearchState(
        count=jnp.zeros((), jnp.int32), step_size=jnp.zeros((), dtype),
        value=jnp.full((), jnp.nan, dtype), no_decrease_steps=jnp.zeros((), jnp.int32),
        nonfinite_steps=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, value_fn: Callable[[Any], jax.Array] | None = None,
                value=None, **extra_args):
    del extra_args  # curvature=, grad=, ...: for the transforms before this one
    if params is None or value_fn is None:
      raise ValueError(
          "scale_by_grid_linesearch needs params and value_fn= (params -> loss on the same "
          "batch): tx.update(grads, state, params, value=loss, value_fn=loss_of_params).")
    dtype = state.value.dtype
    grid = jnp.asarray(sizes, dtype)

    def candidate_loss(a):
      trial = jax.tree.map(lambda p, u: p + (a * u).astype(p.dtype), params, updates)
      return jnp.asarray(value_fn(trial)).astype(dtype).reshape(())

    if chunk_size is None:
      losses = jax.vmap(candidate_loss)(grid)
    else:
      losses = jax.lax.map(candidate_loss, grid, batch_size=min(int(chunk_size), len(sizes)))
    finite = jnp.isfinite(losses)
    any_finite = jnp.any(finite)
    # argmin takes the first minimum; sort order of the grid is the user's, so break ties by size.
    masked = jnp.where(finite, losses, jnp.inf)
    best_loss = jnp.min(masked)
    best = jnp.argmax(jnp.where(masked == best_loss, grid, -jnp.inf))
    current = value_fn(params) if value is None else value
    current = jnp.asarray(current).astype(dtype).reshape(())
    # A non-finite current loss counts any finite candidate as a decrease.
    decrease = any_finite & ((best_loss < current) | ~jnp.isfinite(current))
    smallest = jnp.argmin(grid)
    if on_no_decrease == "best":
      index, take = best, any_finite
    elif on_no_decrease == "smallest":  # (the best finite one if the smallest step overflows)
      index = jnp.where(decrease | ~finite[smallest], best, smallest)
      take = any_finite
    else:
      index, take = best, decrease
    step_size = jnp.where(take, grid[index], jnp.zeros((), dtype))
    chosen_loss = jnp.where(take, masked[index], current)
    new_updates = jax.tree.map(
        lambda u: jnp.where(take, step_size.astype(u.dtype) * u, jnp.zeros_like(u)), updates)
    new_state = GridLinesearchState(
        count=optax.safe_increment(state.count), step_size=step_size, value=chosen_loss,
        no_decrease_steps=state.no_decrease_steps + (any_finite & ~decrease).astype(jnp.int32),
        nonfinite_steps=state.nonfinite_steps + (~any_finite).astype(jnp.int32))
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

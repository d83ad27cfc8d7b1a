"""Per-module Lipschitz estimates ``||A_a||``, ``||B_a||`` and their composition along the network.

For a module ``x_a = f_a(x_{a-1}, w_a)`` (docs/method.md, section 1) the state Jacobian ``A_a`` and the
parameter Jacobian ``B_a`` are reached only through JVPs and VJPs: power iteration on ``J^T J``,
never a dense Jacobian. Samples do not interact, so the batch Jacobian is block diagonal over
samples; normalising the iterate per sample runs one power iteration per sample at the cost of one,
and the estimate reported is the largest over the batch (a local constant at the data, not a bound
over the whole input domain).

Composition, per sample and then maximised (so the composed value bounds the measured one up to the
power iterations' convergence):

* series ``f_2 o f_1``: ``||A|| <= ||A_2|| ||A_1||``; parameters ``(w_1, w_2)`` are orthogonal
  blocks, so ``||B|| <= sqrt((||A_2|| ||B_1||)^2 + ||B_2||^2)``;
* parallel branches summed: ``||A|| <= sum_b ||A_b||``, ``||B|| <= sqrt(sum_b ||B_b||^2)``;
* parallel branches concatenated: ``||A|| <= sqrt(sum_b ||A_b||^2)``, same ``||B||``.

References:
  Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 5
  (per-module Lipschitz constants compose multiplicatively along a chain).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from riemod.nn.adapter import frontend as model_frontend


class ModuleLipschitz(NamedTuple):
  """Lipschitz estimates of one module at a batch.

  Attributes:
    name: the module's path (``"layers/0"``), as in ``Curvature.modules``.
    kind: ``"parametric"`` or ``"parameter-free"``.
    state: ``max_s ||A_a(x_s)||``, the state-map constant.
    param: ``max_s ||B_a(x_s)||`` (0 for parameter-free modules).
    num_params: the module's parameter count.
  """

  name: str
  kind: str
  state: jax.Array
  param: jax.Array
  num_params: int


class LipschitzSummary(NamedTuple):
  """Per-module estimates, their composition and the measured end-to-end constants."""

  modules: tuple[ModuleLipschitz, ...]
  composed_state: jax.Array
  composed_param: jax.Array
  measured_state: jax.Array
  measured_param: jax.Array


def _start(shape, salt: int, dtype) -> jax.Array:
  """A deterministic start vector (no RNG to compile; any generic direction will do)."""
  k = jnp.arange(int(np.prod(shape)), dtype=dtype) + 1
  return jnp.cos(k * 0.7548776662466927 + 0.5698402909980532 * (salt + 1)).reshape(shape)


def _per_sample_norm(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1))


def _normalise(v: jax.Array) -> jax.Array:
  norm = _per_sample_norm(v)
  tiny = jnp.finfo(v.dtype).tiny
  return v / jnp.maximum(norm, tiny).reshape((-1,) + (1,) * (v.ndim - 1))


class _Problem(NamedTuple):
  """One power iteration: ``step(v)`` applies ``J^T J`` and normalises, ``value(v)`` reads it."""

  step: Callable[[jax.Array], jax.Array]
  value: Callable[[jax.Array], jax.Array]
  start: jax.Array


def _state_problem(f, x, key, salt) -> _Problem:
  _, forward = jax.linearize(f, x)
  backward = jax.linear_transpose(forward, x)
  start = _start(x.shape, salt, x.dtype) if key is None else jax.random.normal(
      jax.random.fold_in(key, salt), x.shape, x.dtype)
  return _Problem(lambda v: _normalise(backward(forward(v))[0]),
                  lambda v: jnp.max(_per_sample_norm(forward(v))), _normalise(start))


def _param_problem(f, params, x, key, salt) -> _Problem | None:
  flat, unravel = ravel_pytree(params)
  if flat.size == 0:
    return None

  def one(sample):
    out = lambda p: f(unravel(p), sample[None])[0]
    _, forward = jax.linearize(out, flat)
    return forward, jax.linear_transpose(forward, flat)

  def apply(sample, v):
    forward, backward = one(sample)
    return backward(forward(v))[0]

  def norm_of(sample, v):
    return jnp.linalg.norm(one(sample)[0](v).ravel())

  shape = (x.shape[0], flat.size)
  start = _start(shape, salt, flat.dtype) if key is None else jax.random.normal(
      jax.random.fold_in(key, salt), shape, flat.dtype)
  return _Problem(lambda v: _normalise(jax.vmap(apply)(x, v)),
                  lambda v: jnp.max(jax.vmap(norm_of)(x, v)), _normalise(start))


def _solve_all(problems: list[_Problem], num_iterations: int) -> list[jax.Array]:
  """Runs every power iteration in one loop: one sequential chain, not one per module."""
  if not problems:
    return []
  vs = jax.lax.fori_loop(0, num_iterations,
                         lambda _, vs: tuple(p.step(v) for p, v in zip(problems, vs)),
                         tuple(p.start for p in problems))
  return [p.value(v) for p, v in zip(problems, vs)]


def state_lipschitz(f: Callable[[jax.Array], jax.Array], x: jax.Array, *, num_iterations: int = 30,
                    key: jax.Array | None = None) -> jax.Array:
  """``max_s ||df/dx(x_s)||_2`` for a map applied sample-wise to a batch ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.diag(jnp.array([3.0, 1.0]))
    >>> round(float(state_lipschitz(lambda x: x @ w, jnp.ones((4, 2)))), 4)
    3.0
  """
  return _solve_all([_state_problem(f, x, key, 0)], num_iterations)[0]


def param_lipschitz(f: Callable[[Any, jax.Array], jax.Array], params: Any, x: jax.Array, *,
                    num_iterations: int = 30, key: jax.Array | None = None) -> jax.Array:
  """``max_s ||d f(params, x_s) / d params||_2``: power iteration per sample in parameter space.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[3.0, 4.0], [1.0, 0.0]])
    >>> round(float(param_lipschitz(lambda p, x: x @ p, jnp.ones((2, 1)), x)), 4)
    5.0
  """
  problem = _param_problem(f, params, x, key, 1)
  if problem is None:
    return jnp.zeros((), x.dtype)
  return _solve_all([problem], num_iterations)[0]


def _params_of(layer: Any):
  if not isinstance(layer, nnx.Module):
    return None
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  if not jax.tree.leaves(params):
    return None
  return graphdef, params, rest


def _walk(layer: Any, path: tuple, x: jax.Array, key, problems: list):
  """Registers the power iterations of ``layer`` at ``x``; returns ``(plan, output)``.

  A plan is ``("leaf", name, kind, state index, param index or None, size)``,
  ``("series", children)`` or ``("parallel", combine, children)``; indices point into ``problems``.
  """
  from riemod.nn import Parallel, Sequential

  if isinstance(layer, Sequential):
    children = []
    for i, child in enumerate(layer.layers):
      plan, x = _walk(child, path + ("layers", i), x, key, problems)
      children.append(plan)
    return ("series", children), x
  if isinstance(layer, Parallel):
    children = [_walk(b, path + ("branches", i), x, key, problems)[0]
                for i, b in enumerate(layer.branches)]
    return ("parallel", layer.combine, children), layer(x)
  split = _params_of(layer)
  name = "/".join(map(str, path)) if path else "<root>"
  if split is None:
    problems.append(_state_problem(layer, x, key, len(problems)))
    return ("leaf", name, "parameter-free", len(problems) - 1, None, 0), layer(x)
  graphdef, params, rest = split
  apply = lambda p, v: nnx.merge(graphdef, p, rest)(v)
  problems.append(_state_problem(lambda v: apply(params, v), x, key, len(problems)))
  problems.append(_param_problem(apply, params, x, key, len(problems)))
  size = sum(l.size for l in jax.tree.leaves(params))
  return ("leaf", name, "parametric", len(problems) - 2, len(problems) - 1, size), apply(params, x)


def _compose(plan, values, dtype, out: list):
  """``(state bound, param bound)`` of a plan; appends the leaves' :class:`ModuleLipschitz`."""
  if plan[0] == "leaf":
    _, name, kind, si, pi, size = plan
    state = values[si]
    param = jnp.zeros((), dtype) if pi is None else values[pi]
    out.append(ModuleLipschitz(name, kind, state, param, size))
    return state, param
  if plan[0] == "series":
    state, param = jnp.ones((), dtype), jnp.zeros((), dtype)
    for child in plan[1]:
      s, p = _compose(child, values, dtype, out)
      param = jnp.sqrt((s * param) ** 2 + p ** 2)
      state = state * s
    return state, param
  results = [_compose(child, values, dtype, out) for child in plan[2]]
  states = jnp.stack([r[0] for r in results])
  params = jnp.stack([r[1] for r in results])
  state = jnp.sum(states) if plan[1] == "sum" else jnp.sqrt(jnp.sum(states ** 2))
  return state, jnp.sqrt(jnp.sum(params ** 2))


def network_lipschitz(model: Any, x: jax.Array, *, params: Any = None, num_iterations: int = 30,
                      key: jax.Array | None = None) -> LipschitzSummary:
  """Per-module ``||A_a||``, ``||B_a||``, their composition and the measured network constants.

  ``riemod.nn.Sequential`` and ``riemod.nn.Parallel`` are walked module by module; any other model
  (another NNX module, a Linen ``apply`` or ``f(params, x)`` with ``params=``) is one module.

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> from flax import nnx
    >>> net = riemod.nn.Sequential(riemod.nn.Dense(3, 4, rngs=nnx.Rngs(0)), jnp.tanh,
    ...                            riemod.nn.Dense(4, 2, rngs=nnx.Rngs(1)))
    >>> s = network_lipschitz(net, jnp.ones((5, 3)))
    >>> bool(s.composed_state >= s.measured_state * (1 - 1e-4))
    True
  """
  x = jnp.asarray(x)
  entries: list[ModuleLipschitz] = []
  problems: list[_Problem] = []
  adapted = model_frontend(model, params, None)  # the one model adapter (errors included)
  full = adapted.params
  apply = lambda p, v: adapted.apply(p, v, None)
  if isinstance(model, nnx.Module):
    plan, _ = _walk(model, (), x, key, problems)
  else:
    problems.append(_state_problem(lambda v: apply(full, v), x, key, 0))
    problems.append(_param_problem(apply, full, x, key, 1))
    plan = ("leaf", "<model>", "parametric", 0, 1, sum(l.size for l in jax.tree.leaves(full)))
  # End to end: the measured constants, in the same loop as the modules'.
  problems.append(_state_problem(lambda v: apply(full, v), x, key, 10_000))
  problems.append(_param_problem(apply, full, x, key, 10_001))
  mask = [p is not None for p in problems]
  values = _solve_all([p for p in problems if p is not None], num_iterations)
  it = iter(values)
  values = [next(it) if ok else jnp.zeros((), x.dtype) for ok in mask]
  composed_state, composed_param = _compose(plan, values, x.dtype, entries)
  return LipschitzSummary(tuple(entries), composed_state, composed_param, values[-2], values[-1])

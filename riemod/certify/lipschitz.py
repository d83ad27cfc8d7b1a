"""Per-module Lipschitz estimates ``||A_a||``, ``||B_a||`` and their composition along the network.

For a module ``x_a = f_a(x_{a-1}, w_a)`` (``METHOD.md`` sec. 1) the state Jacobian ``A_a`` and the
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


def state_lipschitz(f: Callable[[jax.Array], jax.Array], x: jax.Array, *, num_iterations: int = 30,
                    key: jax.Array | None = None) -> jax.Array:
  """``max_s ||df/dx(x_s)||_2`` for a map applied sample-wise to a batch ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.diag(jnp.array([3.0, 1.0]))
    >>> round(float(state_lipschitz(lambda x: x @ w, jnp.ones((4, 2)))), 4)
    3.0
  """
  _, forward = jax.linearize(f, x)
  backward = jax.linear_transpose(forward, x)
  v = _normalise(_start(x.shape, 0, x.dtype) if key is None else
                 jax.random.normal(key, x.shape, x.dtype))

  def body(_, v):
    return _normalise(backward(forward(v))[0])

  v = jax.lax.fori_loop(0, num_iterations, body, v)
  return jnp.max(_per_sample_norm(forward(v)))


def param_lipschitz(f: Callable[[Any, jax.Array], jax.Array], params: Any, x: jax.Array, *,
                    num_iterations: int = 30, key: jax.Array | None = None) -> jax.Array:
  """``max_s ||d f(params, x_s) / d params||_2``: power iteration per sample in parameter space.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[3.0, 4.0], [1.0, 0.0]])
    >>> round(float(param_lipschitz(lambda p, x: x @ p, jnp.ones((2, 1)), x)), 4)
    5.0
  """
  flat, unravel = ravel_pytree(params)
  if flat.size == 0:
    return jnp.zeros((), x.dtype)

  def one(sample):
    out = lambda p: f(unravel(p), sample[None])[0]
    _, forward = jax.linearize(out, flat)
    backward = jax.linear_transpose(forward, flat)
    return forward, backward

  def apply(sample, v):
    forward, backward = one(sample)
    return backward(forward(v))[0]

  def norm_of(sample, v):
    forward, _ = one(sample)
    return jnp.linalg.norm(forward(v).ravel())

  shape = (x.shape[0], flat.size)
  v = _normalise(_start(shape, 1, flat.dtype) if key is None else
                 jax.random.normal(key, shape, flat.dtype))
  v = jax.lax.fori_loop(0, num_iterations, lambda _, v: _normalise(jax.vmap(apply)(x, v)), v)
  return jnp.max(jax.vmap(norm_of)(x, v))


def _params_of(layer: Any):
  if not isinstance(layer, nnx.Module):
    return None
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  if not jax.tree.leaves(params):
    return None
  return graphdef, params, rest


def _walk(layer: Any, path: tuple, x: jax.Array, iters: int, key: jax.Array, out: list):
  """Returns ``(state bound, param bound, output)`` of ``layer`` at ``x``; appends leaf entries."""
  from riemod.nn import Parallel, Sequential

  if isinstance(layer, Sequential):
    state, param = jnp.ones((), x.dtype), jnp.zeros((), x.dtype)
    for i, child in enumerate(layer.layers):
      s, p, x = _walk(child, path + ("layers", i), x, iters, key, out)
      param = jnp.sqrt((s * param) ** 2 + p ** 2)
      state = state * s
    return state, param, x
  if isinstance(layer, Parallel):
    results = [_walk(b, path + ("branches", i), x, iters, key, out)
               for i, b in enumerate(layer.branches)]
    states = jnp.stack([r[0] for r in results])
    params = jnp.stack([r[1] for r in results])
    y = layer(x)
    state = jnp.sum(states) if layer.combine == "sum" else jnp.sqrt(jnp.sum(states ** 2))
    return state, jnp.sqrt(jnp.sum(params ** 2)), y
  split = _params_of(layer)
  name = "/".join(map(str, path)) if path else "<root>"
  if split is None:
    y = layer(x)
    state = state_lipschitz(layer, x, num_iterations=iters, key=key)
    out.append(ModuleLipschitz(name, "parameter-free", state, jnp.zeros((), x.dtype), 0))
    return state, jnp.zeros((), x.dtype), y
  graphdef, params, rest = split
  apply = lambda p, v: nnx.merge(graphdef, p, rest)(v)
  y = apply(params, x)
  state = state_lipschitz(lambda v: apply(params, v), x, num_iterations=iters, key=key)
  param = param_lipschitz(apply, params, x, num_iterations=iters, key=key)
  size = sum(l.size for l in jax.tree.leaves(params))
  out.append(ModuleLipschitz(name, "parametric", state, param, size))
  return state, param, y


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
  if isinstance(model, nnx.Module):
    if params is not None:
      raise ValueError("An NNX model carries its parameters: do not pass params=.")
    composed_state, composed_param, _ = _walk(model, (), x, num_iterations, key, entries)
    graphdef, full, rest = nnx.split(model, nnx.Param, ...)
    apply = lambda p, v: nnx.merge(graphdef, p, rest)(v)
  else:
    if params is None:
      raise ValueError("A function model needs params=: the parameter pytree it is applied to.")
    apply = getattr(model, "apply", model)
    full = params
    state = state_lipschitz(lambda v: apply(full, v), x, num_iterations=num_iterations, key=key)
    param = param_lipschitz(apply, full, x, num_iterations=num_iterations, key=key)
    size = sum(l.size for l in jax.tree.leaves(full))
    entries.append(ModuleLipschitz("<model>", "parametric", state, param, size))
    composed_state, composed_param = state, param
  end_key = None if key is None else jax.random.fold_in(key, 10_000)
  measured_state = state_lipschitz(lambda v: apply(full, v), x, num_iterations=num_iterations,
                                   key=end_key)
  measured_param = param_lipschitz(apply, full, x, num_iterations=num_iterations,
                                   key=end_key)
  return LipschitzSummary(tuple(entries), composed_state, composed_param, measured_state,
                          measured_param)

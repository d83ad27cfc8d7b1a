"""A sampling driver: burn-in, thinning and collection, ``lax.scan`` inside chunks.

Each chunk of steps is one compiled ``lax.scan``; between chunks the driver updates the progress
bar (``tqdm`` when installed) and checks that the chain is still finite, so a diverging step size
fails loudly instead of filling the samples with NaNs. Several independent chains run at once with
``num_chains`` (``vmap`` over chains): each chain gets its own batches, gradient keys and noise.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from riemod._util import all_finite, prng_key
from riemod.sampling.batching import Minibatcher

GradFn = Callable[[Any, jax.Array, jax.Array], tuple[Any, dict]]


class ChainState(NamedTuple):
  """Everything a chain carries from step to step (the step counter is shared by all chains).

  Attributes:
    params: current parameters.
    opt_state: the sampler's state (noise key inside).
    batch_key: key of the minibatch schedule.
    permutation: the current epoch's permutation (without-replacement batching).
    grad_key: key folded with the step for ``grad_fn``.
  """

  params: Any
  opt_state: Any
  batch_key: jax.Array
  permutation: jax.Array
  grad_key: jax.Array


class SampleResult(NamedTuple):
  """What :func:`sample` returns.

  Attributes:
    samples: ``collect(params)`` at every kept step, leading axis ``num_samples`` (after a chain
      axis when ``num_chains`` is given).
    state: the final :class:`ChainState` (stacked over chains when ``num_chains`` is given).
    num_steps: steps taken per chain (burn-in included).
  """

  samples: Any
  state: ChainState
  num_steps: int


def _rekey(opt_state: Any, chain: int) -> Any:
  """Gives every keyed sampler state inside ``opt_state`` a chain-specific noise key."""
  if hasattr(opt_state, "_fields") and "key" in opt_state._fields:
    return opt_state._replace(key=jax.random.fold_in(opt_state.key, chain))
  if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
    return tuple(_rekey(s, chain) for s in opt_state)
  if hasattr(opt_state, "_fields"):
    return type(opt_state)(*(_rekey(s, chain) for s in opt_state))
  return opt_state


def _progress(total: int, enabled: bool, description: str):
  if enabled:
    try:
      from tqdm.auto import tqdm
      return tqdm(total=total, desc=description, unit="step", leave=False)
    except ImportError:  # pragma: no cover - tqdm is optional
      pass
  return None


def _all_finite(tree: Any) -> bool:
  return bool(all_finite(tree))


def sample(
    sampler: optax.GradientTransformation,
    params: Any,
    grad_fn: GradFn,
    batcher: Minibatcher,
    *,
    key: jax.Array | int,
    num_samples: int,
    burn_in: int = 0,
    thin: int = 1,
    num_chains: int | None = None,
    collect: Callable[[Any], Any] | None = None,
    chunk_size: int = 1000,
    progress: bool = True,
    check_finite: bool = True,
) -> SampleResult:
  """Runs a Langevin chain: ``burn_in`` steps, then ``num_samples * thin`` steps keeping every
  ``thin``-th.

  Args:
    sampler: a transform from :mod:`riemod.sampling` (or any optax transform whose updates are
      the chain's increments).
    params: initial parameters (shared by all chains).
    grad_fn: ``(params, batch_indices, key) -> (grad_U, extra_kwargs)``: the gradient of the
      potential estimate on the batch (see :func:`riemod.sampling.potential_grad`) and the extra
      keyword arguments of ``sampler.update`` (``{"curvature": ...}`` for Riemannian SGLD, ``{}``
      otherwise). ``key`` is fresh every step (for random output metrics).
    batcher: the minibatch schedule: ``Minibatcher(N, B, replace=True)`` for SGLD,
      ``replace=False`` for SGWORLD, ``Minibatcher(N, N)`` for full-batch Langevin.
    key: PRNG key or seed of the batches and the gradient keys.
    num_samples: samples to keep.
    burn_in: steps discarded first.
    thin: keep one step in ``thin``.
    num_chains: ``None`` for one chain, or a number of independent chains run in parallel (each
      with its own batches and a noise key folded with its index).
    collect: ``params -> pytree`` stored per kept step (default: the parameters).
    chunk_size: kept samples per compiled chunk.
    progress: show a ``tqdm`` progress bar (if installed).
    check_finite: raise ``FloatingPointError`` as soon as a chunk leaves the chain non-finite.

  Returns:
    A :class:`SampleResult`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from riemod.sampling import Minibatcher, sgld
    >>> grad_fn = lambda p, idx, key: ({"w": p["w"]}, {})          # U = |w|^2 / 2
    >>> result = sample(sgld(0.1, key=1), {"w": jnp.zeros(2)}, grad_fn, Minibatcher(1, 1),
    ...                 key=0, num_samples=100, burn_in=10, progress=False)
    >>> result.samples["w"].shape
    (100, 2)
  """
  for name, value, low in (("num_samples", num_samples, 1), ("burn_in", burn_in, 0),
                           ("thin", thin, 1), ("chunk_size", chunk_size, 1)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name}={value!r}: pass an integer >= {low}.")
  if num_chains is not None and (not isinstance(num_chains, (int, np.integer)) or num_chains < 1):
    raise ValueError(f"num_chains={num_chains!r}: pass None (one chain) or an integer >= 1.")
  if not isinstance(batcher, Minibatcher):
    raise TypeError(f"batcher={batcher!r}: pass a riemod.sampling.Minibatcher(data_size, "
                    "batch_size, replace=...).")
  batcher.check()
  collect = collect or (lambda p: p)
  key = prng_key(key)
  batch_key, grad_key = jax.random.split(key)

  def init_chain(chain: int) -> ChainState:
    opt_state = sampler.init(params)
    if num_chains is not None:
      opt_state = _rekey(opt_state, chain)
    batch_state = batcher.init(jax.random.fold_in(batch_key, chain))
    return ChainState(params, opt_state, batch_state.key, batch_state.permutation,
                      jax.random.fold_in(grad_key, chain))

  def chain_step(state: ChainState, t: jax.Array) -> ChainState:
    indices, permutation = batcher.draw(state.batch_key, t, state.permutation)
    grads, extras = grad_fn(state.params, indices, jax.random.fold_in(state.grad_key, t))
    updates, opt_state = sampler.update(grads, state.opt_state, state.params, **extras)
    return ChainState(optax.apply_updates(state.params, updates), opt_state, state.batch_key,
                      permutation, state.grad_key)

  # The step counter stays outside the vmap: the epoch's permutation is then renewed by a real
  # branch, once per epoch, rather than computed for every step of every chain.
  one_step = chain_step if num_chains is None else jax.vmap(chain_step, in_axes=(0, None))
  project = collect if num_chains is None else jax.vmap(collect)

  def advance(carry, num_steps: int):
    def body(c, _):
      state, t = c
      return (one_step(state, t), t + 1), None
    return jax.lax.scan(body, carry, None, length=num_steps)[0]

  def kept(carry, count: int):
    def body(c, _):
      c = advance(c, thin)
      return c, project(c[0].params)
    return jax.lax.scan(body, carry, None, length=count)

  if num_chains is None:
    state = init_chain(0)
  else:
    states = [init_chain(c) for c in range(num_chains)]
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  carry = (state, jnp.zeros((), jnp.int32))
  advance_fn = jax.jit(advance, static_argnums=1)
  kept_fn = jax.jit(kept, static_argnums=1)

  total = burn_in + num_samples * thin
  bar = _progress(total, progress, "sampling")
  chunk_steps = chunk_size * thin

  def check(tree, when):
    if check_finite and not _all_finite(tree):
      raise FloatingPointError(
          f"The chain became non-finite during {when}. The step size is too large for this "
          "potential (Euclidean Langevin is unstable beyond h = 2 / lambda_max of the Hessian of "
          "U): lower step_size, or use riemannian_sgld, whose step is dimensionless.")

  try:
    done = 0
    while done < burn_in:
      n = min(chunk_steps, burn_in - done)
      carry = advance_fn(carry, n)
      check(carry[0].params, "burn-in")
      done += n
      if bar is not None:
        bar.update(n)
    pieces = []
    kept_count = 0
    while kept_count < num_samples:
      n = min(chunk_size, num_samples - kept_count)
      carry, collected = kept_fn(carry, n)
      check(collected, "sampling")
      pieces.append(collected)
      kept_count += n
      if bar is not None:
        bar.update(n * thin)
  finally:
    if bar is not None:
      bar.close()
  samples = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *pieces)
  if num_chains is not None:  # the scan stacks steps first; report (chain, sample, ...)
    samples = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), samples)
  return SampleResult(samples, carry[0], total)

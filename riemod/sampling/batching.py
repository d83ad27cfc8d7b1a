"""Minibatch index schedules, deterministic from a PRNG key and usable inside ``jit``/``lax.scan``.

Two schedules, as a first-class choice of the sampler (docs/sampling.md):

* ``replace=True``: every step draws ``B`` distinct indices, independently of all other steps
  (SGLD, Welling & Teh 2011);
* ``replace=False``: every epoch is a fresh random permutation cut into ``N / B`` batches, so each
  sample is visited exactly once per epoch (SGWORLD, Yuret et al.).

Within one batch the indices are always distinct; "with replacement" refers to the batches, which
are drawn independently of each other. The batch at step ``t`` is a pure function of ``(key, t)``,
so a run is reproducible and can be resumed or replayed from the key and the step counter alone.

Example:
  >>> import jax
  >>> batcher = Minibatcher(data_size=10, batch_size=5, replace=False)
  >>> state = batcher.init(jax.random.key(0))
  >>> first, state = batcher.next(state)
  >>> second, state = batcher.next(state)
  >>> sorted(first.tolist() + second.tolist()) == list(range(10))
  True
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from riemod._util import prng_key


class BatchState(NamedTuple):
  """Where a schedule stands.

  Attributes:
    key: the schedule's key.
    step: number of batches drawn so far.
    permutation: the current epoch's permutation (without replacement; empty otherwise). It is
      drawn once per epoch, not once per step, because a permutation costs as much as many
      gradient steps of a small model.
  """

  key: jax.Array
  step: jax.Array
  permutation: jax.Array


def _check_sizes(data_size, batch_size, replace) -> tuple[int, int]:
  if data_size is None:
    raise ValueError("data_size is missing: pass the number of training samples N (the "
                     "minibatch gradient is rescaled by N / B).")
  if not isinstance(data_size, (int, np.integer)) or data_size < 1:
    raise ValueError(f"data_size={data_size!r}: pass the number of samples, a positive integer.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}: pass a positive integer.")
  if batch_size > data_size:
    raise ValueError(f"batch_size={batch_size} is larger than the data set (data_size="
                     f"{data_size}): use a batch of at most {data_size} samples.")
  if not replace and data_size % batch_size:
    divisors = [b for b in range(1, data_size + 1) if data_size % b == 0]
    near = sorted(divisors, key=lambda b: abs(b - batch_size))[:3]
    raise ValueError(
        f"Without replacement every sample is visited exactly once per epoch, so batch_size "
        f"must divide data_size; {batch_size} does not divide {data_size}. Try one of "
        f"{sorted(near)}.")
  return int(data_size), int(batch_size)


def _key(key) -> jax.Array:
  return prng_key(key)


def batch_indices(key: jax.Array, step: jax.Array, *, data_size: int, batch_size: int,
                  replace: bool = True) -> jax.Array:
  """The ``batch_size`` indices of the batch at ``step`` (a pure function of ``key`` and ``step``).

  Args:
    key: PRNG key of the schedule.
    step: batch counter (integer, may be traced).
    data_size: number of samples ``N``.
    batch_size: samples per batch ``B`` (distinct within a batch).
    replace: ``True`` for independent batches, ``False`` for epochs of a fresh permutation
      (then ``B`` must divide ``N``).

  Returns:
    ``int32`` indices of shape ``(B,)``.
  """
  data_size, batch_size = _check_sizes(data_size, batch_size, replace)
  step = jnp.asarray(step, jnp.int32)
  if replace:
    return _independent_batch(key, step, data_size, batch_size)
  per_epoch = data_size // batch_size
  permutation = _epoch_permutation(key, step // per_epoch, data_size)
  return _slice(permutation, step % per_epoch, batch_size)


def _independent_batch(key, step, data_size: int, batch_size: int) -> jax.Array:
  if batch_size == data_size:
    return jnp.arange(data_size, dtype=jnp.int32)
  # The B largest of N uniforms are a uniformly random B-subset; top_k avoids a full sort.
  scores = jax.random.uniform(jax.random.fold_in(key, step), (data_size,))
  return jax.lax.top_k(scores, batch_size)[1].astype(jnp.int32)


def _epoch_permutation(key, epoch, data_size: int) -> jax.Array:
  return jax.random.permutation(jax.random.fold_in(key, epoch), data_size).astype(jnp.int32)


def _slice(permutation, position, batch_size: int) -> jax.Array:
  return jax.lax.dynamic_slice(permutation, (position * batch_size,), (batch_size,))


class Minibatcher(NamedTuple):
  """A minibatch schedule: ``init(key)`` then ``indices, state = next(state)``.

  Attributes:
    data_size: number of samples ``N``.
    batch_size: samples per batch ``B``.
    replace: ``True``: independent batches (SGLD); ``False``: a fresh permutation each epoch,
      every sample exactly once per epoch (SGWORLD).
  """

  data_size: int
  batch_size: int
  replace: bool = True

  def check(self) -> "Minibatcher":
    """Validates the sizes (raises ``ValueError`` naming the argument)."""
    _check_sizes(self.data_size, self.batch_size, self.replace)
    return self

  @property
  def steps_per_epoch(self) -> int:
    return self.data_size // self.batch_size

  def init(self, key) -> BatchState:
    self.check()
    size = 0 if self.replace else self.data_size
    return BatchState(_key(key), jnp.zeros((), jnp.int32), jnp.zeros((size,), jnp.int32))

  def draw(self, key: jax.Array, step: jax.Array,
           permutation: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Indices of the batch at ``step`` and the (possibly renewed) epoch permutation.

    ``permutation`` must be the one of ``step``'s epoch unless ``step`` starts an epoch; keep
    ``step`` unbatched under ``vmap`` so the renewal stays a real branch.
    """
    if self.replace:
      return _independent_batch(key, step, self.data_size, self.batch_size), permutation
    per_epoch = self.steps_per_epoch
    position = step % per_epoch
    permutation = jax.lax.cond(
        position == 0, lambda: _epoch_permutation(key, step // per_epoch, self.data_size),
        lambda: permutation)
    return _slice(permutation, position, self.batch_size), permutation

  def next(self, state: BatchState) -> tuple[jax.Array, BatchState]:
    """The next batch's indices and the advanced state (jit/scan safe)."""
    indices, permutation = self.draw(state.key, state.step, state.permutation)
    return indices, BatchState(state.key, state.step + 1, permutation)


def minibatches(key, data_size: int, batch_size: int, *, replace: bool = True,
                num_batches: int | None = None) -> Iterator[np.ndarray]:
  """A Python iterator over batch indices (for eager loops); same sequence as :class:`Minibatcher`.

  Example:
    >>> import jax
    >>> batches = list(minibatches(0, 6, 2, replace=False, num_batches=3))
    >>> sorted(np.concatenate(batches).tolist())
    [0, 1, 2, 3, 4, 5]
  """
  batcher = Minibatcher(data_size, batch_size, replace)
  state = batcher.init(key)
  next_fn = jax.jit(batcher.next)
  count = 0
  while num_batches is None or count < num_batches:
    indices, state = next_fn(state)
    yield np.asarray(indices)
    count += 1

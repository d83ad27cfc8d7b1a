"""Small helpers shared across riemod (one copy each): finiteness checks, PRNG keys, Gaussian
trees."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def all_finite(tree: Any) -> jax.Array:
  """Whether every inexact leaf of ``tree`` is finite (``True`` for a tree without such leaves).

  Example:
    >>> import jax.numpy as jnp
    >>> bool(all_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])}))
    False
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  dtype = jnp.result_type(*leaves)
  return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])))


def prng_key(key: Any, name: str = "key") -> jax.Array:
  """A PRNG key from an integer seed or a key (typed or raw), with an error naming ``name``.

  Example:
    >>> prng_key(0).shape
    ()
  """
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  if isinstance(key, jax.Array):
    return key
  raise TypeError(f"{name}={key!r}: pass a PRNG key (jax.random.key(seed)) or an integer seed.")


def gaussian_like(key: jax.Array, tree: Any) -> Any:
  """Independent standard normal draws shaped and typed like every leaf of ``tree``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> gaussian_like(jax.random.key(0), {"w": jnp.zeros(3)})["w"].shape
    (3,)
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                                      for k, x in zip(keys, leaves)])


def value_now(value: Any, name: str) -> Any:
  """``value``, or a schedule's value at step 0 (its first step), with an error naming ``name``
  for a schedule that cannot be called with an integer step.

  Example:
    >>> value_now(lambda count: 0.1 * (count + 1), "learning_rate")
    0.1
  """
  if not callable(value):
    return value
  try:
    return value(0)
  except Exception as error:  # a schedule that cannot be called eagerly
    raise TypeError(f"{name}={value!r}: a schedule must be callable as {name}(step) with an "
                    f"integer step ({type(error).__name__}: {error}).") from error


def validate_rate(rate: Any, name: str = "learning_rate") -> None:
  """Raises for a step size known now (a Python or NumPy number, or a schedule's value at step 0)
  that is not a finite number ``>= 0``. JAX arrays (``optax.inject_hyperparams`` passes its
  hyperparameters as arrays, concrete at ``init`` and traced in ``update``) are left to the run
  time check of :func:`guard_rate` and the non-finite policy, which may be ``"skip"``.

  Example:
    >>> validate_rate(0.1)
    >>> validate_rate(-0.1)
    Traceback (most recent call last):
    ...
    ValueError: learning_rate=-0.1: it must be a finite number >= 0 (the step is -learning_rate G^{-1} g; a negative one climbs the loss), e.g. 0.1.
  """
  if rate is None or isinstance(rate, (str, bytes, bool)):
    raise TypeError(f"{name}={rate!r}: pass a finite number >= 0 (e.g. 0.1) or an optax "
                    f"schedule of the step count.")
  value = value_now(rate, name)
  if isinstance(value, jax.Array):
    return
  try:
    array = np.asarray(value)
  except Exception as error:  # noqa: BLE001 - anything that is not array-like
    raise TypeError(f"{name}={rate!r}: pass a finite number >= 0 (e.g. 0.1) or an optax "
                    "schedule.") from error
  if array.ndim:
    raise ValueError(f"{name} has shape {array.shape}: the step size is a scalar (or a schedule "
                     "returning one).")
  if not (np.issubdtype(array.dtype, np.number) and not np.issubdtype(array.dtype, np.bool_)):
    raise TypeError(f"{name}={rate!r}: {'its value at step 0 ' if callable(rate) else ''}is "
                    f"not a number; pass a finite number >= 0, e.g. 0.1.")
  if not (np.isfinite(float(array)) and float(array) >= 0):
    what = f"{name}={rate!r}: its value at step 0, {float(array)!r}," if callable(rate) else (
        f"{name}={rate!r}: it")
    raise ValueError(f"{what} must be a finite number >= 0 (the step is -{name} G^{{-1}} g; a "
                     "negative one climbs the loss), e.g. 0.1.")


def guard_rate(rate: Any) -> Any:
  """``rate`` with traced or scheduled values that are negative turned into NaN, so that the
  update becomes non-finite and the non-finite policy refuses the step instead of climbing the
  loss (Python and NumPy numbers pass unchanged: :func:`validate_rate` checked them).

  Example:
    >>> import jax.numpy as jnp
    >>> bool(jnp.isnan(guard_rate(lambda count: -0.1)(0)))
    True
  """
  def checked(value):
    value = jnp.asarray(value)
    return jnp.where(value >= 0, value, jnp.nan)

  if callable(rate):
    return lambda count: checked(rate(count))
  if isinstance(rate, jax.Array):  # concrete or traced (optax.inject_hyperparams)
    return checked(rate)
  return rate

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
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


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

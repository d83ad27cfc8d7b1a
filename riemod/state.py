"""Finding one transform's state inside a chained, injected or wrapped optax state."""

from __future__ import annotations

from typing import Any, TypeVar

import optax

StateT = TypeVar("StateT")


def find_state(opt_state: Any, state_type: type[StateT]) -> StateT | None:
  """The first sub-state of type ``state_type`` inside ``opt_state``, or ``None``.

  Searches through ``optax.chain`` tuples, ``inject_hyperparams``, ``masked`` /
  ``multi_transform`` and other wrapper states (any pytree, also an ``nnx.Optimizer``'s
  ``opt_state``), with ``optax.tree_utils.tree_get_all_with_path``: optax states are NamedTuples,
  found by their class name and kept when they are instances of ``state_type``. "First" is the
  order of ``jax.tree_util`` flattening, so in a chain the earliest transform's state, and an outer
  state before one nested inside it.

  Args:
    opt_state: an optax state (or any pytree holding one).
    state_type: the NamedTuple class of the state to find, e.g. ``optax.ScaleByAdamState``.

  Returns:
    The first matching sub-state, or ``None`` when there is none.

  Raises:
    TypeError: ``state_type`` is not a NamedTuple class.

  Example:
    >>> import jax.numpy as jnp, optax, riemod
    >>> tx = optax.chain(optax.clip(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=0.1))
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> int(find_state(state, optax.ScaleByAdamState).count)
    0
    >>> find_state(state, optax.ScaleByLionState) is None
    True
  """
  if not (isinstance(state_type, type) and issubclass(state_type, tuple)
          and hasattr(state_type, "_fields")):
    raise TypeError(f"find_state: state_type must be a NamedTuple state class (optax's convention, "
                    f"e.g. optax.ScaleByAdamState), got {state_type!r}.")
  found = optax.tree_utils.tree_get_all_with_path(
      opt_state, state_type.__name__, filtering=lambda _, value: isinstance(value, state_type))
  return found[0][1] if found else None

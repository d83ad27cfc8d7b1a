"""Finding one transform's state inside a chained, injected or wrapped optax state."""

from __future__ import annotations

from typing import Any, TypeVar

import jax

StateT = TypeVar("StateT")


def find_state(opt_state: Any, state_type: type[StateT]) -> StateT | None:
  """The first sub-state of type ``state_type`` inside ``opt_state``, or ``None``.

  Searches through ``optax.chain`` tuples, ``inject_hyperparams`` and wrapper states (any pytree).

  Example:
    >>> import jax.numpy as jnp, optax, riemod
    >>> tx = optax.chain(optax.clip(1.0), riemod.layerwise_natural_gradient(0.1))
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> int(find_state(state, riemod.LayerwiseMetricState).count)
    0
  """
  found = []

  def visit(node):
    if isinstance(node, state_type):
      found.append(node)
      return True
    return False

  jax.tree_util.tree_map(lambda x: x, opt_state, is_leaf=visit)
  return found[0] if found else None

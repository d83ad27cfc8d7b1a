"""Serial and parallel composition of Riemannian modules.

Serial composition pulls the output metric back through each module in turn; parallel branches
contribute kernels that add (docs/method.md, section 3). Parameter-free callables (``jnp.tanh``) are
modules with no parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx


class Sequential(nnx.Module):
  """Applies modules and parameter-free callables in order.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from riemod.nn import Dense
    >>> net = Sequential(Dense(2, 3, rngs=nnx.Rngs(0)), jnp.tanh, Dense(3, 1, rngs=nnx.Rngs(1)))
    >>> net(jnp.ones((4, 2))).shape
    (4, 1)
  """

  def __init__(self, *layers: Callable[..., Any]):
    for i, layer in enumerate(layers):
      if not callable(layer):
        raise TypeError(f"Sequential layer {i} ({layer!r}) is not callable.")
    self.layers = nnx.List(layers)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class Parallel(nnx.Module):
  """Applies branches to the same input and sums or concatenates their outputs.

  Args:
    *branches: modules or callables, each mapping the input to an output.
    combine: ``"sum"`` (outputs of equal shape) or ``"concat"`` (along ``axis``).
    axis: the concatenation axis.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from riemod.nn import Dense
    >>> par = Parallel(Dense(2, 3, rngs=nnx.Rngs(0)), Dense(2, 4, rngs=nnx.Rngs(1)), combine="concat")
    >>> par(jnp.ones((5, 2))).shape
    (5, 7)
  """

  def __init__(self, *branches: Callable[..., Any], combine: str = "sum", axis: int = -1):
    if combine not in ("sum", "concat"):
      raise ValueError(f"combine={combine!r}: use 'sum' or 'concat'.")
    if not branches:
      raise ValueError("Parallel needs at least one branch.")
    self.branches = nnx.List(branches)
    self.combine = combine
    self.axis = axis

  def __call__(self, x):
    outputs = [branch(x) for branch in self.branches]
    if self.combine == "concat":
      return jnp.concatenate(outputs, axis=self.axis)
    total = outputs[0]
    for out in outputs[1:]:
      if out.shape != total.shape:
        raise ValueError(
            f"Parallel(combine='sum') got branch outputs of shapes {total.shape} and {out.shape}; "
            "use combine='concat' or make the widths match.")
      total = total + out
    return total

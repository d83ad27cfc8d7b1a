"""Functional layers for plain functions ``f(params, x)``: the same structure as riemod's modules.

A plain function's modules otherwise take the generic path (per-sample rows of ``K``,
materialised). Written with :func:`dense`, a layer is recognised by
:func:`riemod.value_grad_and_curvature` exactly like ``riemod.nn.Dense`` or ``nnx.Linear``: it
records its input and the Gram-Hadamard kernel is used, so a PINN or any plain-JAX model gets the
structured step.
"""

from __future__ import annotations

from typing import Mapping

import jax

from riemod import _tape
from riemod.nn.structure import DenseStructure


def dense(params: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
  """``x @ params["kernel"] + params["bias"]`` (bias optional), recognised by the curvature.

  ``params`` must be the dict of one module inside the parameter pytree given to
  :func:`riemod.value_grad_and_curvature` (the module is found by its kernel). Leading axes of
  ``x`` beyond the first (e.g. tokens) are positions, as for a dense layer applied per token.

  Example:
    >>> import jax, jax.numpy as jnp, riemod
    >>> params = {"a": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
    ...           "b": {"kernel": jnp.ones((4, 1))}}
    >>> f = lambda p, x: riemod.nn.dense(p["b"], jnp.tanh(riemod.nn.dense(p["a"], x)))
    >>> _, _, curv = riemod.value_grad_and_curvature(
    ...     f, jnp.ones((5, 3)), lambda y: 0.5 * jnp.mean(y ** 2), riemod.metrics.identity(),
    ...     params=params)
    >>> [type(m.factor).__name__ for m in curv.modules]
    ['DenseFactor', 'DenseFactor']
  """
  kernel = params["kernel"]
  bias = params.get("bias")
  if kernel.ndim != 2:
    raise ValueError(f"riemod.nn.dense needs a 2-D kernel (in, out); got shape {kernel.shape}.")

  def forward(v):
    y = v @ kernel
    return y if bias is None else y + bias

  tape = _tape.active_tape()
  if tape is None:
    return forward(x)
  key = tape.key_of(kernel)
  if key is not None and tape.taps is None:  # the shape pass learns the structure
    tape.structures[key] = DenseStructure(tuple(kernel.shape), bias is not None)
  return _tape.tapped_call(None, key, x, forward)

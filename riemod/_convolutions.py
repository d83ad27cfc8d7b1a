"""Convolutions in XLA:CPU's fast layout inside nested computations.

XLA:CPU rewrites a convolution into the layout its fast (Eigen) convolution takes (input
batch-spatial-feature, kernel spatial-in-out) only in a program's top-level computation. Inside a
``lax.cond`` or a loop body the transposed convolutions of a backward pass fall to a generic loop
several times slower. :func:`fast_convolutions_on_cpu` rewrites a function's convolutions into
that layout itself (transposes around each), on CPU only.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core


def _canonical_convolution(eqn, lhs, rhs):
  """One ``conv_general_dilated`` equation computed in the layout XLA:CPU's fast convolution
  takes (input batch-spatial-feature, kernel spatial-in-out), with transposes around it: the
  same convolution with its axes relabelled (equal up to the order of summation)."""
  numbers = eqn.params["dimension_numbers"]
  n = lhs.ndim
  lhs_order = (numbers.lhs_spec[0], *numbers.lhs_spec[2:], numbers.lhs_spec[1])
  rhs_order = (*numbers.rhs_spec[2:], numbers.rhs_spec[1], numbers.rhs_spec[0])
  out_order = (numbers.out_spec[0], *numbers.out_spec[2:], numbers.out_spec[1])
  if lhs_order == rhs_order == out_order == tuple(range(n)):
    return eqn.primitive.bind(lhs, rhs, **eqn.params)
  canonical = jax.lax.ConvDimensionNumbers((0, n - 1, *range(1, n - 1)),
                                           (n - 1, n - 2, *range(n - 2)),
                                           (0, n - 1, *range(1, n - 1)))
  out = eqn.primitive.bind(jnp.transpose(lhs, lhs_order), jnp.transpose(rhs, rhs_order),
                           **dict(eqn.params, dimension_numbers=canonical))
  return jnp.transpose(out, [out_order.index(i) for i in range(n)])


def _eval_canonical(jaxpr, consts, *args):
  """``jax.core.eval_jaxpr`` with every convolution (also inside nested ``jit``) canonical."""
  env = {}
  read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    if eqn.primitive.name in ("pjit", "jit"):
      inner = eqn.params["jaxpr"]
      outs = _eval_canonical(inner.jaxpr, inner.consts, *values)
    else:
      with eqn.ctx.manager:
        if eqn.primitive.name == "conv_general_dilated":
          outs = _canonical_convolution(eqn, *values)
        else:
          outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def fast_convolutions_on_cpu(product: Callable[[jax.Array], jax.Array]
                              ) -> Callable[[jax.Array], jax.Array]:
  """``product`` (flat vector to flat vector) with its convolutions in the canonical layout when
  compiled for a CPU, unchanged elsewhere.

  Why: XLA:CPU rewrites convolutions into the layout its fast (Eigen) convolution takes only in a
  program's top-level computation, and the certified step-size controller's estimate
  (:mod:`riemod.certify.controller`) runs inside a ``lax.cond``. There the
  transposed convolutions of ``J^T`` in the Gauss-Newton product (kernel gradients with batch and
  feature swapped, input gradients with a flipped kernel layout) fall to a generic loop several
  times slower; rewritten here as XLA does at the top level, they take the fast path (values
  equal up to summation order; the digits CNN's estimate cost before and after:
  benchmarks/results/tuning_free.md).
  """
  def canonical(v):
    closed = jax.make_jaxpr(product)(v)
    return _eval_canonical(closed.jaxpr, closed.consts, v)[0]

  return lambda v: jax.lax.platform_dependent(v, cpu=canonical, default=product)

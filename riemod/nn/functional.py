"""Functional layers for plain functions ``f(params, x)``: the same structure as riemod's modules.

A plain function's modules otherwise take the generic path (per-sample rows of ``K``,
materialised). Written with :func:`dense`, a layer is recognised by
:func:`riemod.value_grad_and_curvature` exactly like ``riemod.nn.Dense`` or ``nnx.Linear``: it
records its input and the Gram-Hadamard kernel is used, so a PINN or any plain-JAX model gets the
structured step. :func:`embed`, :func:`layer_norm` and :func:`rms_norm` do the same for the
layers of a sequence model (``nnx.Embed``, ``nnx.LayerNorm``, ``nnx.RMSNorm``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from riemod import _tape
from riemod.nn.structure import (DenseStructure, ElementwiseStructure, EmbedStructure,
                                   _conv_structure)


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



def conv(params: Mapping[str, jax.Array], x: jax.Array, *, strides: int | Sequence[int] = 1,
         padding: str | int | Sequence[Any] = "SAME",
         dilation: int | Sequence[int] = 1) -> jax.Array:
  """A channels-last convolution ``conv(x, params["kernel"]) + params["bias"]`` (bias optional),
  computed as ``nnx.Conv`` computes it and recognised by the curvature like ``nnx.Conv``.

  ``params["kernel"]`` is ``(*window, in, out)`` and ``x`` is ``(batch, *spatial, in)`` (one
  leading batch axis). A 2-D convolution (4-D kernel) gets the dense structure (input patches as
  features, one position per output pixel: the Gram-Hadamard kernel); other dimensions take the
  generic path, as they do for ``nnx.Conv``. ``params`` must be the dict of one module inside the
  parameter pytree given to :func:`riemod.value_grad_and_curvature` (the module is found by its
  kernel).

  Args:
    params: ``{"kernel": ..., "bias": ...}`` (``"bias"`` optional, shape ``(out,)``).
    x: the input, ``(batch, *spatial, in)``.
    strides: an int or one per spatial axis (``nnx.Conv``'s ``strides``).
    padding: ``"SAME"``, ``"VALID"``, an int, or one int or ``(low, high)`` pair per spatial
      axis (``nnx.Conv``'s ``padding``).
    dilation: the kernel dilation, an int or one per spatial axis (``nnx.Conv``'s
      ``kernel_dilation``).

  Example:
    >>> import jax, jax.numpy as jnp, riemod
    >>> params = {"c": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)},
    ...           "d": {"kernel": jnp.ones((64, 1))}}
    >>> f = lambda p, x: riemod.nn.dense(p["d"], riemod.nn.conv(p["c"], x).reshape(len(x), -1))
    >>> _, _, curv = riemod.value_grad_and_curvature(
    ...     f, jnp.ones((5, 4, 4, 2)), lambda y: 0.5 * jnp.mean(y ** 2), riemod.metrics.identity(),
    ...     params=params)
    >>> [type(m.factor).__name__ for m in curv.modules]
    ['DenseFactor', 'DenseFactor']
  """
  kernel = params["kernel"]
  bias = params.get("bias")
  spatial = kernel.ndim - 2
  if spatial < 1:
    raise ValueError(f"riemod.nn.conv needs a kernel (*window, in, out); got shape {kernel.shape}.")
  if x.ndim != spatial + 2:
    raise ValueError(
        f"riemod.nn.conv with a {spatial}-D window takes x of shape (batch, *{spatial} spatial "
        f"axes*, in); got shape {x.shape}. Put every sample on the one leading batch axis.")
  if x.shape[-1] != kernel.shape[-2]:
    raise ValueError(f"riemod.nn.conv: x has {x.shape[-1]} channels but the kernel expects "
                     f"{kernel.shape[-2]} (kernel shape {kernel.shape}).")
  as_tuple = lambda v: (v,) * spatial if isinstance(v, int) else tuple(v)
  window_strides, rhs_dilation = as_tuple(strides), as_tuple(dilation)
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"riemod.nn.conv: padding={padding!r}; use 'SAME', 'VALID', an int or "
                       "(low, high) pairs (pad x yourself for circular or reflect padding).")
    lax_padding = padding.upper()
  elif isinstance(padding, int):
    lax_padding = ((padding, padding),) * spatial
  else:
    lax_padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  letters = "DHW"[-spatial:] if spatial <= 3 else None
  if letters is None:
    raise ValueError(f"riemod.nn.conv supports 1-3 spatial axes; got {spatial}.")
  numbers = ("N" + letters + "C", letters + "IO", "N" + letters + "C")

  def forward(v):
    y = jax.lax.conv_general_dilated(v, kernel, window_strides, lax_padding,
                                     rhs_dilation=rhs_dilation, dimension_numbers=numbers)
    return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)

  tape = _tape.active_tape()
  if tape is None:
    return forward(x)
  key = tape.key_of(kernel)
  structure = _conv_structure(tuple(kernel.shape), bias is not None, strides, padding, None,
                              dilation, 1, None)
  if key is None or structure is None:
    return forward(x)  # not a module of these parameters, or the generic path (as nnx.Conv)
  if tape.taps is None:  # the shape pass learns the structure
    tape.structures[key] = structure
  return _tape.tapped_call(None, key, x, forward)


def embed(params: Mapping[str, jax.Array], ids: jax.Array) -> jax.Array:
  """``params["embedding"][ids]``: token embeddings, recognised by the curvature like ``nnx.Embed``.

  The factor keeps the ids (never one-hot features). ``params`` must be one module's dict inside
  the parameter pytree given to :func:`riemod.value_grad_and_curvature`.

  Example:
    >>> import jax, jax.numpy as jnp, riemod
    >>> params = {"emb": {"embedding": jnp.ones((5, 3))}, "out": {"kernel": jnp.ones((3, 5))}}
    >>> f = lambda p, ids: riemod.nn.dense(p["out"], riemod.nn.embed(p["emb"], ids))
    >>> ids = jnp.zeros((2, 4), jnp.int32)
    >>> loss = lambda y: jnp.mean(jax.nn.logsumexp(y, -1))
    >>> _, _, curv = riemod.value_grad_and_curvature(
    ...     f, ids, loss, riemod.metrics.sampled_softmax_fisher(), params=params,
    ...     key=jax.random.key(0))
    >>> [type(m.factor).__name__ for m in curv.modules]
    ['EmbedFactor', 'DenseFactor']
  """
  table = params["embedding"]
  if table.ndim != 2:
    raise ValueError(f"riemod.nn.embed needs a 2-D table (vocabulary, features); got shape "
                     f"{table.shape}.")
  if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
    raise TypeError(f"riemod.nn.embed takes integer token ids; got {jnp.asarray(ids).dtype}.")

  def forward(v):
    return jnp.take(table, v, axis=0)

  tape = _tape.active_tape()
  if tape is None:
    return forward(ids)
  key = tape.key_of(table)
  if key is not None and tape.taps is None:
    tape.structures[key] = EmbedStructure(*table.shape)
  return _tape.tapped_call(None, key, ids, forward)


def _scale_and_shift(params: Mapping[str, jax.Array], xhat: jax.Array, name: str) -> jax.Array:
  """``xhat * scale + bias`` (either optional), recorded as an elementwise structure."""
  scale, bias = params.get("scale"), params.get("bias")
  present = [v for v in (scale, bias) if v is not None]
  if not present:
    raise ValueError(f"riemod.nn.{name} needs params with 'scale' and/or 'bias'.")
  for v in present:
    if v.shape != xhat.shape[-1:]:
      raise ValueError(f"riemod.nn.{name}: a parameter of shape {v.shape} for features of "
                       f"width {xhat.shape[-1]}; scale and bias are ({xhat.shape[-1]},).")

  def forward(v):
    y = v if scale is None else v * scale
    return y if bias is None else y + bias

  tape = _tape.active_tape()
  if tape is None:
    return forward(xhat)
  key = tape.key_of(present[0])
  if key is not None and tape.taps is None:
    tape.structures[key] = ElementwiseStructure(xhat.shape[-1], scale is not None,
                                                bias is not None)
  return _tape.tapped_call(None, key, xhat, forward)


def layer_norm(params: Mapping[str, jax.Array], x: jax.Array, *, epsilon: float = 1e-6
               ) -> jax.Array:
  """Layer normalisation over the last axis with ``params["scale"]``/``params["bias"]``.

  ``(x - mean) / sqrt(var + epsilon) * scale + bias``, as ``nnx.LayerNorm``; recognised by the
  curvature (rows ``(sum_t xhat_t c_t, sum_t c_t)``, exact, materialised: they have the layer's
  width).

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> riemod.nn.layer_norm({"scale": jnp.ones(3), "bias": jnp.zeros(3)},
    ...                      jnp.array([[1.0, 2.0, 3.0]])).round(3)
    Array([[-1.225,  0.   ,  1.225]], dtype=float32)
  """
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return _scale_and_shift(params, (x - mean) * jax.lax.rsqrt(var + epsilon), "layer_norm")


def rms_norm(params: Mapping[str, jax.Array], x: jax.Array, *, epsilon: float = 1e-6
             ) -> jax.Array:
  """RMS normalisation over the last axis: ``x / sqrt(mean(x^2) + epsilon) * scale``.

  As ``nnx.RMSNorm``; recognised by the curvature like :func:`layer_norm`.

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> y = riemod.nn.rms_norm({"scale": jnp.ones(2)}, jnp.array([[3.0, 4.0]]))
    >>> bool(jnp.allclose(y, jnp.array([[3.0, 4.0]]) / jnp.sqrt(12.5), atol=1e-5))
    True
  """
  ms = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return _scale_and_shift(params, x * jax.lax.rsqrt(ms + epsilon), "rms_norm")

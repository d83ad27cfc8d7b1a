"""Structures of recognised layers: how a layer's rows of ``K`` are formed without a Jacobian.

Three structures cover the layers of MLPs, CNNs and transformers:

* :class:`DenseStructure`, ``y[p] = x[p] W + b`` at every position ``p``: dense layers (one
  position per sample, or one per token), ``LinearGeneral`` with trailing contracted axes (the
  projections inside attention) and 2-D convolutions (one position per output pixel, with the
  input patch as ``x[p]``). One Gram-Hadamard kernel serves them all.
* :class:`EmbedStructure`, ``y[p] = E[id_p]``: a dense layer whose features are one-hot token ids.
  The ids are kept, never a one-hot or vocabulary-size row.
* :class:`ElementwiseStructure`, ``y[p] = xhat[p] * scale + bias``: the learned scale and bias of
  ``LayerNorm``/``RMSNorm``; ``xhat`` is recorded, and the rows (of the layer's width) are formed.

Layers are recognised by type, never by graph matching. Each structure turns what the tape
recorded (the layer inputs of every call) and the factor rows pulled back to its outputs into the
module's factor (:meth:`make_factor`).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class DenseStructure:
  """Static description of a dense-structured layer.

  Attributes:
    kernel_shape: the kernel parameter's shape: ``(in, out)``, ``(*in, *out)`` for
      ``LinearGeneral``, or ``(kh, kw, c_in, c_out)``.
    has_bias: whether the layer has a bias (of shape ``kernel_shape[in_axes:]``).
    conv: ``None`` for dense layers; for 2-D NHWC convolutions ``(strides, padding, dilation)``.
    in_axes: how many leading kernel axes are contracted with the input (``None``: all but the
      last, as for ``Linear`` and convolutions).
  """

  kernel_shape: tuple[int, ...]
  has_bias: bool
  conv: tuple[Any, ...] | None = None
  in_axes: int | None = None

  @property
  def _num_in(self) -> int:
    return len(self.kernel_shape) - 1 if self.in_axes is None else self.in_axes

  @property
  def bias_shape(self) -> tuple[int, ...]:
    return tuple(self.kernel_shape[self._num_in:])

  @property
  def fan_out(self) -> int:
    return math.prod(self.bias_shape)

  @property
  def fan_in(self) -> int:
    return math.prod(self.kernel_shape[:self._num_in])

  def features(self, x: jax.Array) -> jax.Array:
    """The layer input as ``(B, P, fan_in)``: one feature row per output position."""
    if self.conv is None:
      return x.reshape(x.shape[0], -1, self.fan_in)
    strides, padding, dilation = self.conv
    kh, kw = self.kernel_shape[:2]
    x = x.reshape((-1,) + x.shape[-3:])
    patches = jax.lax.conv_general_dilated_patches(
        x, (kh, kw), strides, padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return patches.reshape(patches.shape[0], -1, self.fan_in)

  def positions(self, cotangent: jax.Array, batch_axes: int) -> jax.Array:
    """Output cotangents ``(*lead, B, ..., *out)`` as ``(*lead, B, P, fan_out)``."""
    lead = cotangent.shape[: batch_axes + 1]
    return cotangent.reshape(lead + (-1, self.fan_out))

  def kernel_to_flat(self, kernel: jax.Array) -> jax.Array:
    """Kernel as ``(..., fan_in, fan_out)`` in the feature order of :meth:`features`."""
    if self.conv is None:
      lead = kernel.shape[:kernel.ndim - len(self.kernel_shape)]
      return kernel.reshape(lead + (self.fan_in, self.fan_out))
    # Patches are channel-major: feature index = c * (kh * kw) + i * kw + j.
    lead = kernel.shape[:-4]
    nd = kernel.ndim
    perm = tuple(range(nd - 4)) + (nd - 2, nd - 4, nd - 3, nd - 1)
    return jnp.transpose(kernel, perm).reshape(lead + (self.fan_in, self.fan_out))

  def flat_to_kernel(self, flat: jax.Array) -> jax.Array:
    if self.conv is None:
      return flat.reshape(flat.shape[:-2] + tuple(self.kernel_shape))
    kh, kw, cin, cout = self.kernel_shape
    lead = flat.shape[:-2]
    n = len(lead)
    unflat = flat.reshape(lead + (cin, kh, kw, cout))
    perm = tuple(range(n)) + (n + 1, n + 2, n, n + 3)
    return jnp.transpose(unflat, perm)

  def bias_to_flat(self, bias: jax.Array) -> jax.Array:
    """Bias ``(..., *bias_shape)`` as ``(..., fan_out)``."""
    return bias.reshape(bias.shape[:bias.ndim - len(self.bias_shape)] + (self.fan_out,))

  def flat_to_bias(self, flat: jax.Array) -> jax.Array:
    return flat.reshape(flat.shape[:-1] + self.bias_shape)

@dataclasses.dataclass(frozen=True)
class EmbedStructure:
  """An embedding ``y[p] = E[id_p]`` with ``E`` of shape ``(num_embeddings, features)``.

  A dense layer with one-hot features: the row of factor row ``r`` of sample ``s`` is
  ``sum_p onehot(id_sp) ⊗ c_rsp``. The factor keeps the ids (see
  :class:`riemod.curvature.factors.EmbedFactor`).
  """

  num_embeddings: int
  features: int

@dataclasses.dataclass(frozen=True)
class ElementwiseStructure:
  """A learned per-feature scale and bias on the last axis: ``y = xhat * scale + bias``.

  The normalisation layers (``LayerNorm``, ``RMSNorm``): the tape records ``xhat`` (the layer's
  output without its scale and bias), and a module's row is ``(sum_p xhat_p * c_p, sum_p c_p)``,
  ``num_features`` numbers per leaf, so the rows are materialised (exactly, for every position).
  """

  num_features: int
  has_scale: bool
  has_bias: bool

Structure = DenseStructure | EmbedStructure | ElementwiseStructure


def normalized_input(layer: Any, x: jax.Array, **kwargs) -> jax.Array:
  """``xhat``: an nnx ``LayerNorm``/``RMSNorm`` applied without its scale and bias.

  Runs the layer's own ``__call__`` on a stand-in with ``scale = bias = None``, so the statistics
  (epsilon, fast variance, masks) are exactly the layer's.
  """
  stand_in = types.SimpleNamespace(**vars(layer))
  stand_in.scale = None
  if hasattr(stand_in, "bias"):
    stand_in.bias = None
  return type(layer).__call__(stand_in, x, **kwargs)


def _trailing(axes: Any, count: int) -> bool:
  """Whether ``axes`` are the last ``count`` axes, in order, written with negative indices."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return axes == tuple(range(-count, 0))


def _conv_structure(kernel_shape, use_bias, strides, padding, input_dilation, kernel_dilation,
                    feature_group_count, mask) -> DenseStructure | None:
  if len(kernel_shape) != 4 or feature_group_count != 1 or mask is not None:
    return None
  as_pair = lambda v: (v, v) if isinstance(v, int) else (1, 1) if v is None else tuple(v)
  if as_pair(input_dilation) != (1, 1):
    return None
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      return None  # circular, reflect and causal padding take the generic path
    lax_padding = padding.upper()
  elif isinstance(padding, int):
    lax_padding = ((padding, padding),) * 2
  else:
    lax_padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  return DenseStructure(tuple(kernel_shape), bool(use_bias),
                        (as_pair(strides), lax_padding, as_pair(kernel_dilation)))


def _norm_structure(layer: Any, num_features: int, has_scale: bool, has_bias: bool
                    ) -> ElementwiseStructure | None:
  # The scale and bias must act on the last axis only, and the statistics must not mix samples.
  if not _trailing(layer.feature_axes, 1) or getattr(layer, "axis_name", None) is not None:
    return None
  reduction = layer.reduction_axes
  reduction = (reduction,) if isinstance(reduction, int) else tuple(reduction)
  if any(a >= 0 for a in reduction):  # a non-negative axis may be the sample axis
    return None
  if not (has_scale or has_bias):
    return None
  return ElementwiseStructure(int(num_features), has_scale, has_bias)


def structure_of(layer: Any) -> Structure | None:
  """The structure of an nnx layer, or ``None`` if it takes the generic path.

  Example:
    >>> from flax import nnx
    >>> structure_of(nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))).bias_shape
    (2, 4)
  """
  kind = type(layer)
  if kind in (nnx.Linear,) or getattr(kind, "_riemod_dense", False):
    return DenseStructure((layer.in_features, layer.out_features), layer.bias is not None)
  if kind in (nnx.Conv,) or getattr(kind, "_riemod_conv", False):
    return _conv_structure(layer.kernel.shape, layer.bias is not None, layer.strides,
                           layer.padding, layer.input_dilation, layer.kernel_dilation,
                           layer.feature_group_count, layer.mask)
  if kind is nnx.LinearGeneral:
    if layer.batch_axis or not _trailing(layer.axis, len(layer.in_features)):
      return None  # batched kernels and leading contracted axes take the generic path
    return DenseStructure(tuple(layer.kernel.shape), layer.bias is not None,
                          in_axes=len(layer.in_features))
  if kind is nnx.Embed:
    return EmbedStructure(int(layer.num_embeddings), int(layer.features))
  if kind is nnx.LayerNorm:
    return _norm_structure(layer, layer.num_features, layer.scale is not None,
                           layer.bias is not None)
  if kind is nnx.RMSNorm:
    return _norm_structure(layer, layer.num_features, layer.scale is not None, False)
  return None  # Linen layers: see linen_structure (their kernel shape is known once bound)


def linen_structure(module: Any, shapes: dict[str, tuple[int, ...]]) -> Structure | None:
  """Structure of a bound linen layer from its parameters' shapes ``{name: shape}``.

  ``Dense``, ``DenseGeneral`` (the attention projections), ``Conv``, ``Embed``, ``LayerNorm`` and
  ``RMSNorm`` are recognised; other modules take the generic path (``None``).
  """
  from flax import linen

  kind = type(module)
  kernel_shape = tuple(shapes.get("kernel", ()))
  if kind is linen.Dense:
    return DenseStructure(kernel_shape, bool(module.use_bias))
  if kind is linen.Conv:
    return _conv_structure(kernel_shape, module.use_bias, module.strides or 1, module.padding,
                           module.input_dilation, module.kernel_dilation,
                           module.feature_group_count, module.mask)
  if kind is linen.DenseGeneral:
    axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    if module.batch_dims or not _trailing(axis, len(axis)):
      return None
    return DenseStructure(kernel_shape, bool(module.use_bias), in_axes=len(axis))
  if kind is linen.Embed:
    return EmbedStructure(int(module.num_embeddings), int(module.features))
  if kind in (linen.LayerNorm, linen.RMSNorm):
    shape = shapes.get("scale", shapes.get("bias"))
    if shape is None or len(shape) != 1:
      return None
    has_bias = kind is linen.LayerNorm and bool(module.use_bias)
    return _norm_structure(module, shape[0], bool(module.use_scale), has_bias)
  return None

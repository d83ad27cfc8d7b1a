"""Dense structure of recognised layers: ``y[p] = x[p] W + b`` at every position ``p``.

Dense layers (one position per sample, or one per token) and 2-D convolutions (one position per
output pixel, with the input patch as ``x[p]``) share this structure, so one Gram-Hadamard kernel
serves both. Layers are recognised by type, never by graph matching.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class DenseStructure:
  """Static description of a dense-structured layer.

  Attributes:
    kernel_shape: the kernel parameter's shape: ``(in, out)`` or ``(kh, kw, c_in, c_out)``.
    has_bias: whether the layer has a bias of shape ``(out,)``.
    conv: ``None`` for dense layers; for 2-D NHWC convolutions ``(strides, padding, dilation)``.
  """

  kernel_shape: tuple[int, ...]
  has_bias: bool
  conv: tuple[Any, ...] | None = None

  @property
  def fan_out(self) -> int:
    return self.kernel_shape[-1]

  @property
  def fan_in(self) -> int:
    size = 1
    for s in self.kernel_shape[:-1]:
      size *= s
    return size

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
    """Output cotangents ``(*lead, B, ..., out)`` as ``(*lead, B, P, out)``."""
    lead = cotangent.shape[: batch_axes + 1]
    return cotangent.reshape(lead + (-1, self.fan_out))

  def kernel_to_flat(self, kernel: jax.Array) -> jax.Array:
    """Kernel as ``(..., fan_in, out)`` in the feature order of :meth:`features`."""
    if self.conv is None:
      return kernel
    # Patches are channel-major: feature index = c * (kh * kw) + i * kw + j.
    lead = kernel.shape[:-4]
    nd = kernel.ndim
    perm = tuple(range(nd - 4)) + (nd - 2, nd - 4, nd - 3, nd - 1)
    return jnp.transpose(kernel, perm).reshape(lead + (self.fan_in, self.fan_out))

  def flat_to_kernel(self, flat: jax.Array) -> jax.Array:
    if self.conv is None:
      return flat
    kh, kw, cin, cout = self.kernel_shape
    lead = flat.shape[:-2]
    n = len(lead)
    unflat = flat.reshape(lead + (cin, kh, kw, cout))
    perm = tuple(range(n)) + (n + 1, n + 2, n, n + 3)
    return jnp.transpose(unflat, perm)


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


def structure_of(layer: Any) -> DenseStructure | None:
  """The dense structure of an nnx layer, or ``None`` if it takes the generic path."""
  if type(layer) in (nnx.Linear,) or getattr(type(layer), "_riemod_dense", False):
    return DenseStructure((layer.in_features, layer.out_features), layer.bias is not None)
  if type(layer) in (nnx.Conv,) or getattr(type(layer), "_riemod_conv", False):
    return _conv_structure(layer.kernel.shape, layer.bias is not None, layer.strides,
                           layer.padding, layer.input_dilation, layer.kernel_dilation,
                           layer.feature_group_count, layer.mask)
  return None  # Linen layers: see linen_structure (their kernel shape is known once bound)


def linen_structure(module: Any, kernel_shape: tuple[int, ...]) -> DenseStructure | None:
  """Dense structure of a bound linen ``Dense``/``Conv`` given its kernel shape."""
  from flax import linen

  if type(module) is linen.Dense:
    return DenseStructure(tuple(kernel_shape), bool(module.use_bias))
  if type(module) is linen.Conv:
    return _conv_structure(kernel_shape, module.use_bias, module.strides or 1, module.padding,
                           module.input_dilation, module.kernel_dilation,
                           module.feature_group_count, module.mask)
  return None

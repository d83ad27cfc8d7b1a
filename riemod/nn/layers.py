"""Riemannian layers: Flax NNX ``Linear`` and ``Conv`` that carry their metric declaration.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 4.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from riemod._tape import tapped_call
from riemod.nn.declaration import MetricDeclaration


def _declare(layer: nnx.Module, mass: Any, kind: str) -> None:
  declaration = MetricDeclaration(mass=mass, kind=kind)
  layer.riemod_kind = declaration.kind
  # Scalar masses are static (part of the graph definition); per-parameter arrays are state.
  mass = declaration.mass
  layer.riemod_mass = mass if mass is None or isinstance(mass, float) else nnx.data(mass)


class Dense(nnx.Linear):
  """A dense layer ``y = x W + b`` with a metric declaration.

  Args:
    in_features: input width.
    out_features: output width.
    mass: ``None`` (the transform's default), a positive float, or per-parameter masses
      ``{"kernel": (in, out) array, "bias": (out,) array}``.
    kind: ``"riemannian"`` (default), ``"euclidean"`` or ``"frozen"``.
    **kwargs: passed to :class:`flax.nnx.Linear` (``rngs``, ``use_bias``, initialisers, dtypes).

  Example:
    >>> from flax import nnx
    >>> layer = Dense(3, 2, mass=1e-2, rngs=nnx.Rngs(0))
    >>> layer.riemod_mass, layer.riemod_kind
    (0.01, 'riemannian')
  """

  _riemod_dense = True

  def __init__(self, in_features: int, out_features: int, *, mass: Any = None,
               kind: str = "riemannian", **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    _declare(self, mass, kind)

  def __call__(self, x, *args, **kwargs):
    return tapped_call(self, None, x, lambda v: super(Dense, self).__call__(v, *args, **kwargs))


class Conv(nnx.Conv):
  """A 2-D NHWC convolution with a metric declaration.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: e.g. ``(3, 3)``.
    mass: ``None``, a positive float, or ``{"kernel": (kh, kw, c_in, c_out), "bias": (c_out,)}``.
    kind: ``"riemannian"`` (default), ``"euclidean"`` or ``"frozen"``.
    **kwargs: passed to :class:`flax.nnx.Conv` (``strides``, ``padding``, ``rngs``, ...).

  Example:
    >>> from flax import nnx
    >>> Conv(1, 4, (3, 3), strides=2, rngs=nnx.Rngs(0)).kernel.shape
    (3, 3, 1, 4)
  """

  _riemod_conv = True

  def __init__(self, in_features: int, out_features: int, kernel_size, *, mass: Any = None,
               kind: str = "riemannian", **kwargs):
    super().__init__(in_features, out_features, kernel_size, **kwargs)
    _declare(self, mass, kind)

  def __call__(self, x, *args, **kwargs):
    return tapped_call(self, None, x, lambda v: super(Conv, self).__call__(v, *args, **kwargs))

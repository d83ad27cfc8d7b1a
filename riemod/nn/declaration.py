"""Per-module metric declarations: the mass and the kind a module trains with.

A declaration travels with the module, so changing how a layer is trained (its mass, or whether it is
trained with the layerwise metric, plain Euclidean steps, or not at all) needs no change to the
training loop.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 4.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

KINDS = ("riemannian", "euclidean", "frozen")


@dataclasses.dataclass(frozen=True, eq=False)
class MetricDeclaration:
  """How one module is trained.

  Attributes:
    mass: the diagonal mass ``D_a``: ``None`` (use the transform's default), a positive float, or a
      per-parameter pytree/array of positive values shaped like the module's parameters (a dict
      ``{"kernel": ..., "bias": ...}`` for dense and conv layers).
    kind: ``"riemannian"`` (default: the Riemannian step ``(K^T K + D)^{-1} g``), ``"euclidean"``
      (``D^{-1} g``) or ``"frozen"`` (no update).

  Example:
    >>> MetricDeclaration(mass=1e-2).kind
    'riemannian'
  """

  mass: Any = None
  kind: str = "riemannian"

  def __post_init__(self):
    object.__setattr__(self, "mass", validate_mass(self.mass, "mass"))
    if self.kind == "layerwise":
      raise ValueError('kind="layerwise" was renamed kind="riemannian" (trained with its metric); '
                       '"layerwise" now only names the block-diagonal structure of a Geometry.')
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r} is not one of {KINDS}; pick one of them.")


def validate_mass(mass: Any, name: str) -> Any:
  """Returns ``mass`` as a float or a pytree of numpy arrays, raising if any entry is not > 0.

  Array masses are checked eagerly (they are declarations, known before training); traced values
  are passed through unchecked.
  """
  if mass is None:
    return None
  if isinstance(mass, (bool, np.bool_)):
    raise TypeError(f"{name}={mass!r}: a bool is not a mass; give a positive number, e.g. 1e-2.")
  if isinstance(mass, (int, float, np.floating, np.integer)):
    value = float(mass)
    if not (math.isfinite(value) and value > 0):
      raise ValueError(
          f"{name}={mass!r}: the mass must be a positive number (it damps the metric "
          "G = K^T K + mass); use e.g. 1e-2, or kind='frozen' to stop training a module.")
    return value
  import jax

  def check(leaf):
    if isinstance(leaf, jax.core.Tracer):
      return leaf
    arr = np.asarray(leaf)
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
      raise TypeError(f"{name} has dtype {arr.dtype}; give real positive numbers.")
    if not np.all(np.isfinite(arr)) or not np.all(arr > 0):
      raise ValueError(
          f"{name} has entries that are not finite and positive (min {arr.min()!r}); every "
          "per-parameter mass must be > 0.")
    return arr

  return jax.tree.map(check, mass)

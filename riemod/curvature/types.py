"""The curvature pytree: what a natural-gradient step needs besides the gradient.

These are plain data types at the bottom of riemod: the measurement
(:func:`riemod.value_grad_and_curvature`) produces them, the composer (:class:`riemod.Geometry`)
consumes them. Both sides import this module; it imports neither.
"""

from __future__ import annotations

import dataclasses

import jax

from riemod.curvature.factors import Factor


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModuleCurvature:
  """One module's share of the curvature.

  Attributes:
    factor: its ``K_a`` (``None`` for euclidean and frozen modules, which need none).
    mass: declared masses ``{leaf name: array}`` or ``None`` (the transform's default applies).
    name: the module's path, e.g. ``"layers/0"``.
    kind: ``"riemannian"``, ``"euclidean"`` or ``"frozen"``.
    leaf_indices: positions of its parameters in ``jax.tree.leaves(params)``.
    leaf_names: the parameters' names (``"kernel"``, ``"bias"``, ...), aligned with ``leaf_indices``.
  """

  factor: Factor | None
  mass: dict[str, jax.Array] | None
  name: str = dataclasses.field(metadata=dict(static=True))
  kind: str = dataclasses.field(metadata=dict(static=True))
  leaf_indices: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  leaf_names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Curvature:
  """What the optimizer needs besides the gradient: a pytree, safe under jit and optax.chain.

  Attributes:
    modules: one :class:`ModuleCurvature` per module, in parameter order.
    leaf_shapes: the shapes of ``jax.tree.leaves(params)``, to check the curvature matches.
    coordinates: the loss gradient's coordinates ``e`` in the factor rows (shape ``(d,)``):
      ``g_a = K_a^T e`` for every module when the output metric is the loss's exact Gauss-Newton
      factor (or, with ``curvature_batch``, the part of ``g`` from the curvature's samples).
      ``None`` when the metric has no such coordinates (sampled Fisher, sketches). The composer
      uses them for the range-aware solve ``D^{-1} K^T (I + K D^{-1} K^T)^{-1} e``, which has no
      ``1 / mass`` cancellation.
    num_rows: ``d = k * B``, the number of factor rows.
    output_metric: the output metric's name.
  """

  modules: tuple[ModuleCurvature, ...]
  coordinates: jax.Array | None
  leaf_shapes: tuple[tuple[int, ...], ...] = dataclasses.field(metadata=dict(static=True))
  num_rows: int = dataclasses.field(metadata=dict(static=True))
  output_metric: str = dataclasses.field(metadata=dict(static=True))


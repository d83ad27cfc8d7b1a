"""The curvature pytree: what a natural-gradient step needs besides the gradient.

These are plain data types at the bottom of riemod: the measurement
(:func:`riemod.value_grad_and_curvature`) produces them, the composer (:class:`riemod.Geometry`)
consumes them. Both sides import this module; it imports neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from riemod._util import all_finite
from riemod.curvature import _mesh
from riemod.curvature.factors import DenseFactor, Factor, RowsFactor


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
    shard: inside the ``jax.shard_map`` the curvature was measured in (``axis_name``), the same
      factor on this device's samples only (``None`` elsewhere). ``factor`` holds every device's
      rows; a consumer that needs only some of them (the spread layerwise step gathers each
      block's rows to its owner alone, the Kronecker statistics sum their own samples) reads the
      shard, and XLA drops the gather of ``factor`` where nothing reads it.
  """

  factor: Factor | None
  mass: dict[str, jax.Array] | None
  name: str = dataclasses.field(metadata=dict(static=True))
  kind: str = dataclasses.field(metadata=dict(static=True))
  leaf_indices: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  leaf_names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
  shard: Factor | None = None

  def map_factor(self, fn) -> "ModuleCurvature":
    """The module with ``fn`` applied to its factor and to its shard alike.

    Every change of a factor goes through here (a mass policy's change of variables, a
    restriction to some leaves): ``fn`` acts sample by sample, so the shard stays this device's
    part of the new factor.
    """
    if self.factor is None:
      return self
    return dataclasses.replace(self, factor=fn(self.factor),
                               shard=None if self.shard is None else fn(self.shard))


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
    leaf_paths: the parameters' paths (see :func:`leaf_paths`), aligned with ``leaf_shapes``
      (``None``: unknown). They let :meth:`restrict` find the leaves an ``optax.masked`` or
      ``optax.multi_transform`` group (or an ``nnx.Optimizer`` with a narrower ``wrt``) selects.
    axis_name: the mapped axes (inside ``jax.shard_map``) the rows were gathered over, ``()``
      when none: the rows are then the whole batch's, the same on every device of the axes, and
      the composer spreads the layerwise blocks' factorisations over those devices.
    value: the loss on the batch the curvature was measured on (``None``: not recorded).
      :func:`riemod.apply_if_valid` watches it for divergence when ``update`` gets no
      ``value=``, so a run whose loss blows up while every number stays finite is refused
      without the user passing the loss.
  """

  modules: tuple[ModuleCurvature, ...]
  coordinates: jax.Array | None
  leaf_shapes: tuple[tuple[int, ...], ...] = dataclasses.field(metadata=dict(static=True))
  num_rows: int = dataclasses.field(metadata=dict(static=True))
  output_metric: str = dataclasses.field(metadata=dict(static=True))
  leaf_paths: tuple[str, ...] | None = dataclasses.field(default=None,
                                                          metadata=dict(static=True))
  axis_name: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  value: jax.Array | None = None

  def replicated(self) -> "Curvature":
    """The curvature without the modules' per-device shards: the same on every device.

    Return this from a ``jax.shard_map`` with ``out_specs=P()`` (the shards differ between
    devices, which JAX's replication check refuses). Steps taken with it are the same, gathered
    in full on every device.
    """
    return dataclasses.replace(self, modules=tuple(
        dataclasses.replace(m, shard=None) for m in self.modules))

  def all_finite(self) -> jax.Array:
    """Whether every number in the curvature is finite (the same answer on every device).

    Inside the ``jax.shard_map`` it was measured in, the devices check their own shards and
    agree by one ``pmin``: the gathered rows hold nothing else, and reading them would keep
    their gather alive where the step needs only each block's rows on its owner.
    """
    axes = self.axis_name
    if _mesh.bound(axes) and all(m.shard is not None for m in self.modules
                                 if m.factor is not None):
      own = all_finite([dataclasses.replace(m, factor=None) for m in self.modules]) & all_finite(
          (self.coordinates, self.value))
      return jax.lax.pmin(own.astype(jnp.int32), axes) > 0
    return all_finite(self)

  def restrict(self, paths: Sequence[str]) -> "Curvature":
    """The curvature of the selected parameters only: ``K`` restricted to their columns.

    For a parameter subset ``S`` the metric on ``S`` with the rest held fixed is
    ``K_S^T K_S + D_S``: modules without selected leaves are dropped, a module with some of its
    leaves selected keeps only their columns (a dense layer's kernel keeps its Gram-Hadamard
    form; anything else is materialised), and the gradient's coordinates ``e`` stay valid
    (``g_a = K_a^T e`` holds leaf by leaf).

    Args:
      paths: the selected leaves' paths, in their order in the (masked) parameter tree.

    Returns:
      A :class:`Curvature` whose leaves are ``paths``, in that order.

    Example:
      >>> import jax.numpy as jnp, riemod
      >>> params = {"body": {"w": jnp.ones((3, 2))}, "head": {"w": jnp.ones((2, 1))}}
      >>> f = lambda p, x: jnp.tanh(x @ p["body"]["w"]) @ p["head"]["w"]
      >>> _, _, curv = riemod.value_grad_and_curvature(
      ...     f, jnp.ones((4, 3)), lambda y: 0.5 * jnp.mean(y ** 2), riemod.metrics.identity(),
      ...     params=params)
      >>> [m.name for m in curv.restrict(["head/w"]).modules]
      ['head']
    """
    if self.leaf_paths is None:
      raise ValueError(
          "This curvature carries no parameter paths, so the parameters an optax.masked / "
          "optax.multi_transform group selects cannot be found in it: compute it with "
          "riemod.value_grad_and_curvature.")
    position = {path: i for i, path in enumerate(self.leaf_paths)}
    unknown = [p for p in paths if p not in position]
    if unknown:
      raise ValueError(
          f"The updates hold parameters {unknown} that the curvature does not have (its "
          f"parameters are {list(self.leaf_paths)}): pass the curvature of the model whose "
          "gradients are being transformed.")
    new_index = {position[p]: j for j, p in enumerate(paths)}
    modules = []
    for module in self.modules:
      kept = [(name, new_index[i]) for name, i in zip(module.leaf_names, module.leaf_indices)
              if i in new_index]
      if not kept:
        continue
      names = tuple(name for name, _ in kept)
      if len(kept) != len(module.leaf_names):
        module = module.map_factor(lambda factor: _restrict_factor(factor, names))
      mass = None if module.mass is None else {n: module.mass[n] for n in names}
      modules.append(dataclasses.replace(
          module, mass=mass, leaf_indices=tuple(j for _, j in kept), leaf_names=names))
    modules.sort(key=lambda m: min(m.leaf_indices))
    return dataclasses.replace(
        self, modules=tuple(modules), leaf_shapes=tuple(self.leaf_shapes[position[p]] for p in paths),
        leaf_paths=tuple(paths))


def _restrict_factor(factor: Factor, names: tuple[str, ...]) -> Factor:
  """``K_a`` restricted to the columns of the leaves ``names``."""
  if isinstance(factor, DenseFactor) and names == ("kernel",):
    # The kernel's rows x (x) c do not involve the bias: the same factor without bias rows.
    return dataclasses.replace(factor, structure=dataclasses.replace(factor.structure,
                                                                     has_bias=False),
                               bias_weight=None)
  rows = factor.rows()  # (d, *leaf shape), rows r-major over (factor row, sample)
  # Kept as (R, B, ...): the sample axis stays its own, so a shard's restriction is this
  # device's samples of the whole batch's restriction.
  lead = (factor.num_rows // factor.num_samples, factor.num_samples)
  return RowsFactor({n: rows[n].reshape(lead + rows[n].shape[1:]) for n in names})


def _path_name(entries: tuple[Any, ...]) -> str:
  names = []
  for key in entries:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return "/".join(names)


def leaf_paths(tree: Any) -> tuple[str, ...]:
  """The path of every leaf of ``tree`` as ``"module/.../name"``, in ``jax.tree.leaves`` order.

  An ``nnx.Variable``'s own ``value`` entry is dropped, so an ``nnx.State`` of variables and its
  pure arrays (``nnx.as_pure``) give the same paths. Masked leaves (``optax.MaskedNode``) have no
  leaves and so no paths.

  Example:
    >>> import jax.numpy as jnp
    >>> leaf_paths({"layer": {"bias": jnp.zeros(2), "kernel": jnp.ones((3, 2))}})
    ('layer/bias', 'layer/kernel')
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for path, _ in flat:
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
      path = path[:-1]
    out.append(_path_name(path))
  return tuple(out)


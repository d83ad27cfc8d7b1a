"""The composed metric ``G = K^T K + D``: modules grouped into blocks, each block factored once.

``structure="layerwise"`` gives every Riemannian module its own block (``G`` block diagonal over
modules); ``structure="full"`` puts them all in one block whose kernel is the sum of the module
kernels, so the cross-module blocks of ``K^T K`` are included without an ``n x n`` matrix.
Euclidean modules have ``G = D`` and frozen modules are left out (zero step, zero noise).

A :class:`ComposedMetric` is built only by :meth:`riemod.Geometry.compose`. The same object serves
the optimizer (:meth:`ComposedMetric.step`), the certificates (``solve``, ``matvec``) and the
Riemannian samplers (``sample``), so there is one implementation of every solve. A mass policy's
change of variables ``S`` (see :mod:`riemod.masses`) is applied here, at the boundary: every
method takes and returns vectors in the parameters' own coordinates.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 3.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from riemod.composer.masses import UNSCALED
from riemod.composer.spectral import factorize
from riemod.composer.woodbury import BlockFactorization, factorize_block
from riemod.curvature import _mesh
from riemod.curvature.types import Curvature, ModuleCurvature

STRUCTURES = ("layerwise", "full")


class StepReport(NamedTuple):
  """What one optimizer step measured, per block (arrays of length ``num_blocks``).

  Attributes:
    metric_grad_norm_sq: ``g^T G^{-1} g`` over the whole network (a scalar).
    condition: each block's condition estimate (see :class:`~riemod.composer.BlockFactorization`).
    residual: relative residual of each block's small solves.
    jitter: the jitter each block's factorisation needed (0 when none).
    error: each block's estimated relative error of its direction (``NaN`` for an invalid mass).
  """

  metric_grad_norm_sq: jax.Array
  condition: jax.Array
  residual: jax.Array
  jitter: jax.Array
  error: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ComposedMetric:
  """``G = K^T K + D`` over a whole parameter tree, factored block by block.

  All methods take and return pytrees with the structure of the parameters (leaves may carry one
  leading batch axis for several right-hand sides, except in :meth:`step`).

  Attributes:
    curvature: the curvature in the mass policy's variables (``S K``).
    inverse_masses: per module ``{leaf name: 1 / mass}`` in those variables, the mass scale
      included.
    blocks: the factored blocks.
    scales: per module, the policy's change of variables ``S`` (``None``: identity), an object
      with ``apply(leaves, inverse=, transpose=)`` (see :mod:`riemod.masses`).
    mass_ok: whether the default mass and scale are finite and > 0 (checked at run time for
      traced masses).
    block_modules: for each block, the indices (into ``curvature.modules``) of its modules.
    structure: ``"layerwise"`` or ``"full"``.
  """

  curvature: Curvature
  inverse_masses: tuple[dict[str, jax.Array], ...]
  blocks: tuple[BlockFactorization, ...]
  scales: tuple[Any, ...]
  mass_ok: jax.Array
  block_modules: tuple[tuple[int, ...], ...] = dataclasses.field(metadata=dict(static=True))
  structure: str = dataclasses.field(metadata=dict(static=True))

  # -- the policy's change of variables, at the boundary: vectors (steps, draws) map by S or
  # S^{-1}, covectors (gradients, G v) by S^T or S^{-T}.
  def _rescale(self, tree: Any, inverse: bool = False, transpose: bool = False) -> Any:
    leaves, treedef = _checked_leaves(tree, self.curvature)
    out = list(leaves)
    for module, change in zip(self.curvature.modules, self.scales):
      if change is None:
        continue
      mapped = change.apply(self._module_leaves(leaves, module), inverse=inverse,
                            transpose=transpose)
      for name, index in zip(module.leaf_names, module.leaf_indices):
        out[index] = mapped[name]
    return jax.tree.unflatten(treedef, out)

  def _module_leaves(self, leaves, module: ModuleCurvature) -> dict[str, jax.Array]:
    return {name: leaves[i] for name, i in zip(module.leaf_names, module.leaf_indices)}

  def _map(self, tree: Any, block_fn, diagonal_fn) -> tuple[Any, list]:
    """Applies ``block_fn(block, inputs, members)`` per block and ``diagonal_fn(module, inverse
    mass, leaf, index)`` to the leaves of modules outside every block."""
    leaves, treedef = _checked_leaves(tree, self.curvature)
    out = [None] * len(leaves)
    extras = []
    modules = self.curvature.modules
    for block, members in zip(self.blocks, self.block_modules):
      inputs = [self._module_leaves(leaves, modules[i]) for i in members]
      results, extra = block_fn(block, inputs, members)
      extras.append(extra)
      for i, result in zip(members, results):
        for name, index in zip(modules[i].leaf_names, modules[i].leaf_indices):
          out[index] = result[name]
    in_blocks = {i for members in self.block_modules for i in members}
    for i, module in enumerate(modules):
      if i in in_blocks:
        continue
      for name, index in zip(module.leaf_names, module.leaf_indices):
        out[index] = diagonal_fn(module, self.inverse_masses[i][name], leaves[index], index)
    return jax.tree.unflatten(treedef, out), extras

  def solve(self, tree: Any) -> Any:
    """``G^{-1} v`` (frozen modules: zero)."""
    return self.solve_with_residuals(tree)[0]

  def solve_with_residuals(self, tree: Any) -> tuple[Any, list[jax.Array]]:
    """``G^{-1} v`` and the relative residual of each block's small solve."""
    out, residuals = self._map(
        self._rescale(tree, transpose=True), lambda block, v, _: block.solve(v),
        lambda m, inv, g, _: jnp.zeros_like(g) if m.kind == "frozen" else inv * g)
    return self._rescale(out), residuals

  def step(self, grads: Any, previous: Any = None, momentum=None) -> tuple[Any, StepReport]:
    """The optimizer's direction ``G^{-1}(g + mu D phi)`` (SPRING when ``previous`` is given).

    Range-aware: where the curvature carries the gradient's coordinates in the factor rows, the
    in-range part of ``g`` is solved without the Woodbury subtraction (see
    :meth:`~riemod.composer.BlockFactorization.step`). Frozen modules get zero; euclidean ones
    ``D^{-1} g + mu phi``.

    Args:
      grads: the gradient, shaped like the parameters.
      previous: the previous direction (SPRING momentum), or ``None``.
      momentum: SPRING ``mu``.

    Returns:
      ``(direction, report)``.
    """
    with_momentum = previous is not None
    prev_leaves = None
    if with_momentum:
      prev_leaves, _ = _checked_leaves(self._rescale(previous, inverse=True), self.curvature)
    modules = self.curvature.modules
    coordinates = self.curvature.coordinates
    quadratic = []
    rhs = self._rescale(grads, transpose=True)
    spread = _spread_steps(self, rhs, prev_leaves, momentum)

    def block_fn(block, inputs, members):
      prev = ([self._module_leaves(prev_leaves, modules[i]) for i in members]
              if with_momentum else None)
      result = (spread[members] if spread else
                block.step(inputs, coordinates, prev, momentum))
      quadratic.append(result.metric_grad_norm_sq)
      return result.direction, result

    def diagonal(m, inv, g, index):
      if m.kind == "frozen":
        return jnp.zeros_like(g)
      quadratic.append(jnp.vdot(g, inv * g).real)
      return inv * g + momentum * prev_leaves[index] if with_momentum else inv * g

    direction, results = self._map(rhs, block_fn, diagonal)
    dtype = jax.tree.leaves(grads)[0].dtype if jax.tree.leaves(grads) else jnp.float32
    stack = lambda values: (jnp.stack([jnp.asarray(v, dtype) for v in values]) if values
                            else jnp.zeros((0,), dtype))
    error = stack([r.error for r in results])
    report = StepReport(
        metric_grad_norm_sq=jnp.asarray(sum(quadratic), dtype),
        condition=stack([r.condition for r in results]),
        residual=stack([r.residual for r in results]),
        jitter=stack([r.jitter for r in results]),
        error=jnp.where(self.mass_ok, error, jnp.nan))
    return self._rescale(direction), report

  def matvec(self, tree: Any) -> Any:
    """``G v`` (frozen modules: zero)."""
    out = self._map(
        self._rescale(tree, inverse=True), lambda block, v, _: (block.matvec(v), None),
        lambda m, inv, g, _: jnp.zeros_like(g) if m.kind == "frozen" else g / inv)[0]
    return self._rescale(out, inverse=True, transpose=True)

  def mass_times(self, tree: Any) -> Any:
    """``D v``: the mass alone (frozen modules: zero)."""
    leaves, treedef = _checked_leaves(self._rescale(tree, inverse=True), self.curvature)
    out = list(leaves)
    for module, inverse in zip(self.curvature.modules, self.inverse_masses):
      for name, index in zip(module.leaf_names, module.leaf_indices):
        out[index] = (jnp.zeros_like(leaves[index]) if module.kind == "frozen"
                      else leaves[index] / inverse[name])
    return self._rescale(jax.tree.unflatten(treedef, out), inverse=True, transpose=True)

  def smallest_masses(self) -> list[jax.Array]:
    """Per module (in ``curvature.modules`` order), ``lam_min`` of its mass ``D_a`` in the
    parameters' own coordinates (policy and mass scale included; frozen modules too, though their
    rows of ``G`` are zero): exact for diagonal masses, and for the Kronecker mass
    ``mass lam_min(A) lam_min(S)`` (a lower bound if a module carried several masses).

    Example:
      >>> import jax.numpy as jnp, riemod
      >>> f = lambda p, x: x @ p["w"]
      >>> _, _, curv = riemod.value_grad_and_curvature(
      ...     f, jnp.ones((4, 3)), lambda y: 0.5 * jnp.mean(y**2), riemod.metrics.identity(),
      ...     params={"w": jnp.ones((3, 1))})
      >>> geometry = riemod.Geometry(mass=0.5)
      >>> [float(m) for m in geometry.compose(curv, geometry.init({"w": jnp.ones((3, 1))})).smallest_masses()]
      [0.5]
    """
    return [(UNSCALED if change is None else change).smallest_mass(inverse)
            for change, inverse in zip(self.scales, self.inverse_masses)]

  def sample(self, key: jax.Array, like: Any) -> Any:
    """An exact draw from ``N(0, G^{-1})`` shaped like ``like`` (frozen modules: zero).

    Example:
      >>> import jax, jax.numpy as jnp, riemod
      >>> f = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((3, 1))}
      >>> _, g, curv = riemod.value_grad_and_curvature(
      ...     f, jnp.ones((4, 3)), lambda y: 0.5 * jnp.mean(y**2), riemod.metrics.identity(),
      ...     params=params)
      >>> geometry = riemod.Geometry(mass=1.0)
      >>> geometry.compose(curv, geometry.init(params)).sample(jax.random.key(0), params)["w"].shape
      (3, 1)
    """
    block_keys = iter(jax.random.split(key, len(self.blocks) + 1)[1:])
    diagonal_key = jax.random.fold_in(key, len(self.blocks) + 1)

    def diagonal(m, inv, g, index):
      if m.kind == "frozen":
        return jnp.zeros_like(g)
      noise = jax.random.normal(jax.random.fold_in(diagonal_key, index), g.shape, g.dtype)
      return jnp.sqrt(inv) * noise

    out = self._map(like, lambda block, v, _: (block.sample(next(block_keys), v), None),
                    diagonal)[0]
    return self._rescale(out)

  def block_names(self) -> list[str]:
    """One name per block: its modules' names joined by ``+``."""
    return ["+".join(self.curvature.modules[i].name for i in members)
            for members in self.block_modules]


def _spread_steps(metric: ComposedMetric, rhs: Any, prev_leaves, momentum) -> dict:
  """Every block's :class:`~riemod.composer.woodbury.BlockStep`, keyed by its modules, each
  factored and solved on one device of the curvature's mapped axes (``{}``: replicated step).

  Spread when the curvature was gathered over mapped axes (``axis_name``) that are bound here,
  the structure is layerwise and there are several Cholesky blocks and devices: block ``b`` is
  factored and solved only on the device :func:`_mesh.assign` gives it (balanced by
  :func:`_mesh.factorisation_flops`), and the directions and diagnostics are summed over the
  devices (one all-reduce of parameter-sized pieces). The block's rows reach its owner alone:
  the modules' shards (each device's own samples) go to the owner in one ``all_to_all``
  (:func:`_mesh.to_owners`), so the whole batch's factors ``compose`` made, their gather and
  their factorisation are unused by the step and compiled away. (A curvature without shards,
  :meth:`Curvature.replicated`, uses the gathered rows on every device.) A single block is
  factored on every device (its sample-space kernel assembled in slabs over the devices, see
  :func:`compose`); truncated or Nystrom blocks stay replicated.
  """
  axes = metric.curvature.axis_name
  if (not _mesh.bound(axes) or metric.structure != "layerwise" or len(metric.blocks) < 2
      or any(type(block) is not BlockFactorization for block in metric.blocks)
      or _mesh.size(axes) < 2):
    return {}
  leaves, _ = _checked_leaves(rhs, metric.curvature)
  modules = metric.curvature.modules

  def solve(block, members):
    def run(factors=None):
      inputs = [metric._module_leaves(leaves, modules[i]) for i in members]
      prev = (None if prev_leaves is None else
              [metric._module_leaves(prev_leaves, modules[i]) for i in members])
      factors = block.factors if factors is None else [f.for_products() for f in factors]
      # Factored here, inside the owner's branch, so the other devices skip it.
      own = factorize_block(factors, block.inv_masses, block.space, block.refinement_steps)
      return own.step(inputs, metric.curvature.coordinates, prev, momentum)
    return run

  costs = [_mesh.factorisation_flops(sum(f.num_params for f in block.factors),
                                     block.factors[0].num_rows, block.space)
           for block in metric.blocks]
  shards = [[modules[i].shard for i in members] for members in metric.block_modules]
  if any(f is None for block in shards for f in block):
    shards = None
  results = _mesh.spread(axes, costs, [solve(block, members) for block, members
                                       in zip(metric.blocks, metric.block_modules)], shards)
  return dict(zip(metric.block_modules, results))


def _checked_leaves(tree: Any, curvature: Curvature):
  """Leaves shaped like the parameters, or all with one leading axis of the same size (a batch
  of right-hand sides)."""
  leaves, treedef = jax.tree.flatten(tree)
  shapes = tuple(tuple(jnp.shape(l)) for l in leaves)
  leads = {s[:len(s) - len(p)] for s, p in zip(shapes, curvature.leaf_shapes)}
  batched = len(leads) == 1 and len(next(iter(leads))) == 1 and all(
      s[1:] == p for s, p in zip(shapes, curvature.leaf_shapes))
  if shapes != curvature.leaf_shapes and not batched:
    raise ValueError(
        "The curvature does not belong to these parameters: it was computed for parameter "
        f"shapes {list(curvature.leaf_shapes)} but got {list(shapes)}. Pass the curvature from "
        "value_grad_and_curvature on the same model. To train only some parameters, wrap the "
        "riemod transform in optax.masked / optax.multi_transform (or give nnx.Optimizer a "
        "narrower wrt=): it then restricts the curvature to the selected parameters by path.")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"A gradient leaf has dtype {jnp.result_type(leaf)}; the metric acts on "
                      "floating-point gradients only.")
  return leaves, treedef


def _inverse_masses(module: ModuleCurvature, mass: jax.Array, dtype) -> dict[str, jax.Array]:
  if module.mass is None:
    # Cast first: a float32 scalar mass (a schedule's value) must not be inverted in float32.
    return {name: 1.0 / mass.astype(dtype) for name in module.leaf_names}
  return {name: (1.0 / (module.mass[name].astype(dtype))) for name in module.leaf_names}


def compose(curvature: Curvature, scales: list[Any], *, mass: jax.Array, mass_scale: jax.Array,
            structure: str, space: str, refinement_steps: int, cutoff: float | None = None,
            rank: int | None = None, oversampling: int = 10, key: jax.Array | None = None
            ) -> ComposedMetric:
  """Factors ``G`` block by block (called by :meth:`riemod.Geometry.compose`, which validates the
  arguments and applies the mass policy first)."""
  dtype = _dtype_of(curvature)
  mass = jnp.asarray(mass, dtype) * jnp.asarray(mass_scale, dtype)
  mass_ok = jnp.isfinite(mass) & (mass > 0)
  inverse_masses = tuple(
      {k: v / jnp.asarray(mass_scale, dtype) if m.mass is not None else v
       for k, v in _inverse_masses(m, mass, dtype).items()}
      for m in curvature.modules)
  solvable = [i for i, m in enumerate(curvature.modules)
              if m.kind == "riemannian" and m.factor is not None]
  groups = [(i,) for i in solvable] if structure == "layerwise" else (
      [tuple(solvable)] if solvable else [])
  if len(groups) == 1 and cutoff is None and space != "nystrom" and _mesh.bound(
      curvature.axis_name):
    # One block inside the shard_map its rows were gathered in: nothing to spread, but every
    # device assembles only its samples' slab of the kernel (the factorisation stays replicated).
    members = groups[0]
    blocks = (factorize_block([curvature.modules[i].factor.for_products() for i in members],
                              [inverse_masses[i] for i in members], space, refinement_steps,
                              axes=curvature.axis_name),)
  else:
    blocks = tuple(factorize([curvature.modules[i].factor.for_products() for i in members],
                             [inverse_masses[i] for i in members], space=space,
                             refinement_steps=refinement_steps, cutoff=cutoff, rank=rank,
                             oversampling=oversampling,
                             key=None if key is None else jax.random.fold_in(key, b))
                   for b, members in enumerate(groups))
  return ComposedMetric(curvature, inverse_masses, blocks, tuple(scales), mass_ok, tuple(groups),
                        structure)


def _dtype_of(curvature: Curvature):
  for m in curvature.modules:
    if m.factor is not None:
      return jax.tree.leaves(m.factor)[0].dtype
    if m.mass is not None:
      return jax.tree.leaves(m.mass)[0].dtype
  return jnp.result_type(float)

"""The composed metric ``G``: modules grouped into blocks, each block factored once.

``structure="layerwise"`` gives every layerwise module its own block (``G`` block diagonal over
modules); ``structure="full"`` puts all layerwise modules in one block whose kernel is the sum of the
module kernels, so the cross-module blocks of ``K^T K`` are included without an ``n x n`` matrix.
Euclidean modules have ``G = D`` and frozen modules are left out (zero step, zero noise).

The same object serves the optimizer (``solve``), the certificates (``solve`` and ``matvec``) and
the Riemannian samplers (``sample``), so there is one implementation of every solve.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 3.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from riemod.composer.woodbury import BlockFactorization, factorize_block

if TYPE_CHECKING:  # riemod.curvature imports the composer's factors; avoid the import cycle.
  from riemod.curvature import Curvature, ModuleCurvature

STRUCTURES = ("layerwise", "full")


def _inverse_mass(module: ModuleCurvature, default_mass: float, dtype):
  if module.mass is None:
    # Cast first: a float32 scalar mass (a schedule's value) must not be inverted in float32.
    return {name: 1.0 / jnp.asarray(default_mass, dtype) for name in module.leaf_names}
  return {name: (1.0 / module.mass[name]).astype(dtype) for name in module.leaf_names}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ComposedMetric:
  """``G = K^T K + D`` over a whole parameter tree, factored block by block.

  Build it with :func:`compose_metric`. All methods take and return pytrees with the structure of
  the parameters.

  Attributes:
    curvature: the curvature it was built from.
    inverse_masses: per module ``{leaf name: 1 / mass}``.
    blocks: the factored blocks.
    block_modules: for each block, the indices (into ``curvature.modules``) of its modules.
    structure: ``"layerwise"`` or ``"full"``.
  """

  curvature: Curvature
  inverse_masses: tuple[dict[str, jax.Array], ...]
  blocks: tuple[BlockFactorization, ...]
  block_modules: tuple[tuple[int, ...], ...] = dataclasses.field(metadata=dict(static=True))
  structure: str = dataclasses.field(metadata=dict(static=True))

  def _module_leaves(self, leaves, module: ModuleCurvature) -> dict[str, jax.Array]:
    return {name: leaves[i] for name, i in zip(module.leaf_names, module.leaf_indices)}

  def _map(self, tree: Any, block_fn, diagonal_fn, pass_members: bool = False
           ) -> tuple[Any, list]:
    leaves, treedef = _checked_leaves(tree, self.curvature)
    out = [None] * len(leaves)
    extras = []
    modules = self.curvature.modules
    for block, members in zip(self.blocks, self.block_modules):
      inputs = [self._module_leaves(leaves, modules[i]) for i in members]
      results, extra = (block_fn(block, inputs, members) if pass_members
                        else block_fn(block, inputs))
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
    """``G^{-1} v`` (frozen modules: zero). Leaves may carry one leading batch axis."""
    return self.solve_with_residuals(tree)[0]

  def solve_with_residuals(self, tree: Any) -> tuple[Any, list[jax.Array]]:
    """``G^{-1} v`` and the relative residual of each block's small solve."""
    return self._map(
        tree, lambda block, v: block.solve(v),
        lambda m, inv, g, _: jnp.zeros_like(g) if m.kind == "frozen" else inv * g)

  def spring_solve(self, tree: Any, previous: Any, momentum) -> tuple[Any, jax.Array, list]:
    """SPRING: ``G^{-1}(g + mu D phi)``, with ``g^T G^{-1} g`` and per-block residuals.

    One factorisation, and in sample space a single extra ``K phi`` product (see
    :meth:`BlockFactorization.spring_solve`).
    """
    prev_leaves, _ = _checked_leaves(previous, self.curvature)
    modules = self.curvature.modules
    quadratic = []

    def block_fn(block, inputs, members):
      prev = [self._module_leaves(prev_leaves, modules[i]) for i in members]
      direction, g_ginv_g, residual = block.spring_solve(inputs, prev, momentum)
      quadratic.append(g_ginv_g)
      return direction, residual

    def diagonal(m, inv, g, index):
      if m.kind == "frozen":
        return jnp.zeros_like(g)
      quadratic.append(jnp.vdot(g, inv * g))
      return inv * g + momentum * prev_leaves[index]

    direction, residuals = self._map(tree, block_fn, diagonal, pass_members=True)
    return direction, sum(quadratic), residuals

  def matvec(self, tree: Any) -> Any:
    """``G v`` (frozen modules: zero)."""
    return self._map(
        tree, lambda block, v: (block.matvec(v), None),
        lambda m, inv, g, _: jnp.zeros_like(g) if m.kind == "frozen" else g / inv)[0]

  def mass_times(self, tree: Any) -> Any:
    """``D v``: the mass alone (frozen modules: zero)."""
    leaves, treedef = _checked_leaves(tree, self.curvature)
    out = list(leaves)
    for module, inverse in zip(self.curvature.modules, self.inverse_masses):
      for name, index in zip(module.leaf_names, module.leaf_indices):
        out[index] = (jnp.zeros_like(leaves[index]) if module.kind == "frozen"
                      else leaves[index] / inverse[name])
    return jax.tree.unflatten(treedef, out)

  def sample(self, key: jax.Array, like: Any) -> Any:
    """An exact draw from ``N(0, G^{-1})`` shaped like ``like`` (frozen modules: zero).

    Example:
      >>> import jax, jax.numpy as jnp, riemod
      >>> f = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.ones((3, 1))}
      >>> _, g, curv = riemod.value_grad_and_curvature(
      ...     f, jnp.ones((4, 3)), lambda y: 0.5 * jnp.mean(y**2), riemod.metrics.identity(),
      ...     params=params)
      >>> compose_metric(curv, mass=1.0).sample(jax.random.key(0), params)["w"].shape
      (3, 1)
    """
    block_keys = iter(jax.random.split(key, len(self.blocks) + 1)[1:])
    diagonal_key = jax.random.fold_in(key, len(self.blocks) + 1)

    def diagonal(m, inv, g, index):
      if m.kind == "frozen":
        return jnp.zeros_like(g)
      noise = jax.random.normal(jax.random.fold_in(diagonal_key, index), g.shape, g.dtype)
      return jnp.sqrt(inv) * noise

    return self._map(like, lambda block, v: (block.sample(next(block_keys), v), None),
                     diagonal)[0]

  def block_names(self) -> list[str]:
    return ["+".join(self.curvature.modules[i].name for i in members)
            for members in self.block_modules]


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
        "value_grad_and_curvature on the same model (and nnx.Optimizer(..., wrt=nnx.Param)).")
  for leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"A gradient leaf has dtype {jnp.result_type(leaf)}; the metric acts on "
                      "floating-point gradients only.")
  return leaves, treedef


def compose_metric(curvature: Curvature, *, mass: float = 1e-2, structure: str = "layerwise",
                   space: str = "auto", mass_scale: jax.Array | float = 1.0,
                   refinement_steps: int = 0) -> ComposedMetric:
  """Factors the metric ``G = K^T K + D`` of a :class:`~riemod.Curvature`.

  Args:
    curvature: from :func:`riemod.value_grad_and_curvature`.
    mass: the default mass for modules that declare none (> 0).
    structure: ``"layerwise"`` (one block per module) or ``"full"`` (one block for all).
    space: ``"auto"``, ``"sample"`` or ``"parameter"`` (see :func:`factorize_block`).
    mass_scale: multiplies every mass (used by adaptive damping; 1 by default).
    refinement_steps: iterative refinement of every block's small solves (see
      :func:`factorize_block`).

  Returns:
    A :class:`ComposedMetric`.
  """
  from riemod.curvature import Curvature

  if not isinstance(curvature, Curvature):
    raise TypeError(f"curvature={type(curvature).__name__}: pass the Curvature returned by "
                    "riemod.value_grad_and_curvature.")
  if structure not in STRUCTURES:
    raise ValueError(f"structure={structure!r}: use one of {STRUCTURES}.")
  if isinstance(mass, (int, float)) and not mass > 0:
    raise ValueError(f"mass={mass!r}: the default mass must be > 0.")
  dtype = _dtype_of(curvature)
  inverse_masses = tuple(
      {k: v / mass_scale for k, v in _inverse_mass(m, mass, dtype).items()}
      for m in curvature.modules)
  solvable = [i for i, m in enumerate(curvature.modules)
              if m.kind == "layerwise" and m.factor is not None]
  groups = [(i,) for i in solvable] if structure == "layerwise" else (
      [tuple(solvable)] if solvable else [])
  blocks = tuple(factorize_block([curvature.modules[i].factor for i in members],
                                 [inverse_masses[i] for i in members], space=space,
                                 refinement_steps=refinement_steps)
                 for members in groups)
  return ComposedMetric(curvature, inverse_masses, blocks, tuple(groups), structure)


def _dtype_of(curvature: Curvature):
  for m in curvature.modules:
    if m.factor is not None:
      return jax.tree.leaves(m.factor)[0].dtype
    if m.mass is not None:
      return jax.tree.leaves(m.mass)[0].dtype
  return jnp.result_type(float)

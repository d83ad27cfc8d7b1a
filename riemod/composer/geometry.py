"""The geometry: one description of the metric ``G = K^T K + D``, from curvature to solves.

A :class:`Geometry` is a frozen, hashable description: the default mass (a number or an optax
schedule), the mass policy (:mod:`riemod.masses`), the block structure, the solve space and the
iterative refinement. Its state (:class:`GeometryState`: gradients seen, the mass scale a guard
adapts, the policy's moments) is a pytree that lives in the optimizer state.
:meth:`Geometry.compose` is the only path from a :class:`~riemod.Curvature` to ``G``: the
optimizer, the guard, the certificates and the Riemannian sampler all call it, so they all use
the same ``G``.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from riemod._util import value_now
from riemod.composer import masses as _masses
from riemod.composer.metric import STRUCTURES, ComposedMetric, compose
from riemod.curvature.types import Curvature

SPACES = ("auto", "sample", "parameter", "nystrom")


class GeometryState(NamedTuple):
  """The geometry's running state (a pytree, kept in the optimizer state).

  Attributes:
    count: gradients folded in so far (the mass schedule is evaluated at ``count - 1``, the step
      being taken).
    mass_scale: a factor on every mass, declared or default (adapted by :func:`riemod.guarded`).
    moments: the mass policy's statistics (``None`` for the constant mass).
  """

  count: jax.Array
  mass_scale: jax.Array
  moments: Any = None


def validate_mass(mass: Any, name: str = "mass") -> None:
  """Raises for a mass that is known now (Python, NumPy or concrete JAX scalar, or a schedule's
  value at step 0) and is not finite and > 0; traced values are checked at run time (the step's
  error estimate becomes NaN, which the non-finite policy refuses)."""
  if mass is None:
    raise ValueError(f"{name}=None: pass a positive number (e.g. 1e-2) or an optax schedule of "
                     "the step count.")
  value = value_now(mass, name)
  if isinstance(value, jax.core.Tracer):
    return
  array = np.asarray(value)
  if array.ndim:
    raise ValueError(f"{name} has shape {array.shape}: the default mass is a scalar. Declare "
                     "per-parameter masses on the modules (riemod.nn.Dense(..., mass=...) or "
                     "declarations=) instead.")
  if not np.issubdtype(array.dtype, np.number) or not (math.isfinite(float(array))
                                                      and float(array) > 0):
    what = "its value at step 0" if callable(mass) else "it"
    raise ValueError(f"{name}={mass!r}: {what} must be a finite positive number (it damps "
                     "G = K^T K + mass), e.g. 1e-2.")


@dataclasses.dataclass(frozen=True)
class Geometry:
  """The metric ``G = K^T K + D`` that riemod steps, certifies and samples with.

  Attributes:
    mass: default mass for modules that declare none (> 0), or an optax schedule of the step.
      ``mass -> inf`` gives ``g / mass`` (SGD with learning rate ``lr / mass``). ``None``
      (default): the policy's own ``default_mass``, 1e-2 for the constant and adaptive masses
      (``D = 1e-2 I``, in the units of ``K^T K``), 1 for the Kronecker mass (whose ``A (x) S``
      already carries the curvature's units, so the mass there is a relative weight).
    mass_policy: :func:`riemod.masses.constant` (default), :func:`riemod.masses.adaptive` or
      :func:`riemod.masses.kronecker`.
    structure: ``"layerwise"`` (block diagonal: one block per module) or ``"full"`` (one block
      for the whole network; cross-module curvature included, never an ``n x n`` matrix).
    space: ``"auto"``, ``"sample"`` (Woodbury, ``d x d``) or ``"parameter"`` (``n x n``) solves
      per block; ``"auto"`` picks the smaller. ``"nystrom"``: sample space with the ``d x d``
      kernel replaced by a randomized rank-``rank`` Nystrom sketch (for batches too large for a
      ``d x d`` factorisation; see :mod:`riemod.composer.spectral`). The sketch's test vectors
      are drawn from ``jax.random.key(seed)`` folded with the step count, so they change every
      step and a run is reproducible.
    refinement_steps: iterative refinement of every small solve against the metric as an
      operator (0: none; 1 recovers most digits an ill-conditioned float32 solve loses).
    cutoff: ``None`` (default: every direction damped by the mass) or a relative cut-off in
      ``(0, 1)``: a truncated pseudo-inverse that drops each block's directions whose eigenvalue
      of the whitened ``D^{-1/2} K^T K D^{-1/2}`` is below ``cutoff`` times the largest (zero step
      there, the null space of ``K`` included) and solves the others with the mass as usual.
      With a tiny mass this is ``numpy.linalg.lstsq(K^T K, g, rcond=cutoff)``: Gauss-Newton
      least squares as ENGD solves it, from an eigendecomposition of the ``n x n`` (parameter
      space) or ``d x d`` (sample space) matrix; eigenvalues are resolved to ``~eps`` relative,
      so use cut-offs ``>= ~1e-15`` in float64.
    rank: the Nystrom sketch's rank (``space="nystrom"`` only).
    oversampling: extra test vectors of the sketch (``rank + oversampling`` products with the
      kernel; 5-10 make the sketch's error close to the best rank-``rank`` one).
    seed: the sketch's random seed.

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> geometry = riemod.Geometry(mass=1e-3, structure="full")
    >>> f = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.zeros((3, 1))}
    >>> _, g, curv = riemod.value_grad_and_curvature(
    ...     f, jnp.eye(3), lambda y: 0.5 * jnp.mean((y - 1.0) ** 2), riemod.metrics.identity(),
    ...     params=params)
    >>> metric = geometry.compose(curv, geometry.init(params))
    >>> step = metric.solve(g)          # G^{-1} g, the Gauss-Newton step (lr = 1)
    >>> bool(jnp.allclose(metric.matvec(step)["w"], g["w"], atol=1e-5))
    True
  """

  mass: Any = None
  mass_policy: Any = dataclasses.field(default_factory=_masses.ConstantMass)
  structure: str = "layerwise"
  space: str = "auto"
  refinement_steps: int = 0
  cutoff: float | None = None
  rank: int | None = None
  oversampling: int = 10
  seed: int = 0

  def __post_init__(self):
    _masses._validate(self.mass_policy)
    validate_mass(self.default_mass)
    if self.structure not in STRUCTURES:
      raise ValueError(f"structure={self.structure!r}: use one of {STRUCTURES}.")
    if self.space not in SPACES:
      raise ValueError(f"space={self.space!r}: use one of {SPACES}.")
    if not isinstance(self.refinement_steps, int) or self.refinement_steps < 0:
      raise ValueError(f"refinement_steps={self.refinement_steps!r}: use an int >= 0 (0: none, "
                       "1 usually suffices).")
    _validate_solver(self)

  def init(self, params: Any) -> GeometryState:
    """A fresh state for parameters shaped like ``params``."""
    return GeometryState(jnp.zeros((), jnp.int32), jnp.ones((), jnp.result_type(float)),
                         self.mass_policy.init(params))

  def advance(self, state: GeometryState, grads: Any,
              curvature: Curvature | None = None) -> GeometryState:
    """Folds one step's gradient and curvature into the state (before the step that uses it is
    composed). The adaptive policy reads the gradient, the Kronecker policy the curvature."""
    count = state.count + 1
    return state._replace(count=count, moments=self.mass_policy.update(
        state.moments, grads, curvature, count))

  def mass_at(self, state: GeometryState) -> jax.Array:
    """The default mass of the step being taken, before the mass scale."""
    mass = self.default_mass
    if callable(mass):
      return jnp.asarray(mass(jnp.maximum(state.count - 1, 0)))
    return jnp.asarray(mass)

  @property
  def default_mass(self) -> Any:
    """The mass of modules that declare none: ``mass``, or the policy's ``default_mass``.

    Example:
      >>> import riemod
      >>> riemod.Geometry().default_mass, riemod.Geometry(mass_policy=riemod.masses.kronecker()
      ...                                                 ).default_mass
      (0.01, 1.0)
    """
    return self.mass if self.mass is not None else self.mass_policy.default_mass

  @property
  def exact_solve(self) -> bool:
    """Whether the composed ``solve`` inverts the composed ``matvec`` (up to round-off): not
    with a ``cutoff`` (a truncated pseudo-inverse) nor ``space="nystrom"`` (a sketched kernel).

    Example:
      >>> import riemod
      >>> riemod.Geometry().exact_solve, riemod.Geometry(cutoff=1e-12).exact_solve
      (True, False)
    """
    return self.cutoff is None and self.space != "nystrom"

  def compose(self, curvature: Curvature, state: GeometryState) -> ComposedMetric:
    """Factors ``G`` for this curvature and state: the only path from curvature to ``G``.

    Returns:
      A :class:`~riemod.composer.ComposedMetric` (``solve``, ``matvec``, ``sample``, ``step``).
    """
    if not isinstance(curvature, Curvature):
      raise TypeError(f"curvature={type(curvature).__name__}: pass the Curvature returned by "
                      "riemod.value_grad_and_curvature.")
    scaled, scales = self.mass_policy.rescale(curvature, state.moments, state.count)
    key = (None if self.space != "nystrom" else
           jax.random.fold_in(jax.random.key(self.seed), state.count))
    return compose(scaled, scales, mass=self.mass_at(state), mass_scale=state.mass_scale,
                   structure=self.structure, space=self.space,
                   refinement_steps=self.refinement_steps, cutoff=self.cutoff, rank=self.rank,
                   oversampling=self.oversampling, key=key)


def _validate_solver(geometry: Geometry) -> None:
  """The truncation and sketch options, checked when the geometry is built."""
  cutoff, rank = geometry.cutoff, geometry.rank
  if cutoff is not None and not (isinstance(cutoff, (int, float)) and 0 < cutoff < 1):
    raise ValueError(f"cutoff={cutoff!r}: a relative eigenvalue cut-off in (0, 1), e.g. 1e-14 "
                     "(parameter space) or 1e-10 (sample space); None for the damped solve.")
  if geometry.space == "nystrom":
    if not isinstance(rank, int) or rank < 1:
      raise ValueError(f"rank={rank!r}: space='nystrom' needs the sketch rank, an int >= 1 "
                       "(e.g. rank=200).")
    if cutoff is not None:
      raise ValueError("cutoff= and space='nystrom' do not combine: the sketch keeps only the "
                       "kernel's leading directions already; use space='sample' for a cut-off.")
  elif rank is not None:
    raise ValueError(f"rank={rank!r} is the Nystrom sketch's rank: pass space='nystrom' with it.")
  if not isinstance(geometry.oversampling, int) or geometry.oversampling < 0:
    raise ValueError(f"oversampling={geometry.oversampling!r}: use an int >= 0 (e.g. 10).")
  if not isinstance(geometry.seed, int):
    raise ValueError(f"seed={geometry.seed!r}: the sketch's seed is an int.")



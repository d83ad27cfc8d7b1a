"""Spectral block solves: a truncated pseudo-inverse of ``G``, and a Nystrom sketch of the kernel.

Both describe a block through the spectrum of its whitened factor ``K~ = K D^{-1/2}`` (``d x n``,
singular values ``s_i``, left vectors ``u_i``, right vectors ``v_i``), in which
``G = D^{1/2} (K~^T K~ + I) D^{1/2}`` and the sample-space kernel is ``Q = K D^{-1} K^T = K~ K~^T``.

**Truncated pseudo-inverse** (``Geometry(cutoff=c)``). Directions with ``s_i^2 < c s_max^2`` are
dropped instead of damped: ``G^+ = D^{-1/2} (sum over kept i of v_i v_i^T / (s_i^2 + 1)) D^{-1/2}``,
and the step is zero in every dropped direction (the null space of ``K`` included). For a constant
mass ``m`` the kept directions get ``1 / (s_i^2 + m)`` in the unwhitened singular values, so with a
tiny mass this is the minimum-norm least-squares step ``K^+ e`` with a relative cut-off ``c`` on
the eigenvalues of ``K^T K``: ``numpy.linalg.lstsq(K^T K, g, rcond=c)``, or ``rcond=sqrt(c)`` on
``K`` itself. A small mass alone damps every direction whose eigenvalue is near or below it, which
slows the last digits of a least-squares fit; the cut-off removes only the directions the data do
not determine and leaves the rest undamped.

* Parameter space (``n < d``): the eigendecomposition of the ``n x n`` matrix ``K~^T K~``
  (``O(d n^2 + n^3)``; a thin SVD of ``K~`` would resolve smaller singular values, at an order
  of magnitude more time for a tall ``K``).
* Sample space: the eigendecomposition of the ``d x d`` kernel ``Q`` (``O(d^3)``), with
  ``v_i = K~^T u_i / s_i``; the gradient's in-range part ``K^T e`` is solved from ``U^T e``
  (``V^T K~^T e = S U^T e``), without forming ``K^T e`` first.

Either way eigenvalues are resolved to about ``eps * s_max^2``, so cut-offs below ``~1e-15`` in
float64 keep round-off directions (``lstsq``'s default ``rcond`` on ``K^T K`` is ``n eps``).

**Randomized Nystrom** (``Geometry(space="nystrom", rank=r, oversampling=p)``). For batches whose
``d x d`` kernel is too large to factor, ``Q`` is replaced by a rank-``r`` sketch
``Q^ = U diag(lam) U^T`` built from ``r + p`` products ``Q omega`` with Gaussian test vectors (only
``K`` and ``K^T`` products: ``Q`` is never formed). Directions outside the sketch are given its
smallest eigenvalue ``lam_r`` instead of 0: ``Q~ = Q^ + lam_r (I - U U^T)``. With a tiny mass the
kernel's tail is far above 1, and treating it as 0 would step ``1 / mass`` times the gradient
there; ``lam_r`` damps those directions instead. The capacitance is then inverted in closed
form, ``C^-1 ~ U diag(1 / (1 + lam)) U^T + (I - U U^T) / (1 + lam_r)``, and everything else is the
sample-space step (range-aware push-through, Woodbury remainder, SPRING momentum). Cost ``O((r + p) d n)`` for
the sketch and ``O(d (r + p)^2)`` for its factorisation. Since ``C^-1 - C~^-1 =
C~^-1 (Q~ - Q) C^-1`` and both inverses have norm ``<= 1``, the capacitance error is at most
``|Q - Q~| <= |Q - Q^| + lam_r``: small where the kernel's spectrum has decayed below 1 by rank
``r``. The block's
``residual`` reports ``|(I + Q) t - b| / |b|`` of its capacitance solves against the exact kernel
(one more ``K`` and ``K^T`` product), so the sketch's error is measured on every step. With
``r + p >= d`` the sketch is exact (up to round-off).

References:
  J. A. Tropp, A. Yurtsever, M. Udell and V. Cevher, *Fixed-rank approximation of a positive-
  semidefinite matrix from streaming data*, NeurIPS 2017 (the stable Nystrom sketch, Alg. 3).
  M. Guzman-Cordero, F. Dangel, G. Goldshlager and M. Zeinhofer, *Improving Energy Natural
  Gradient Descent through Woodbury, Momentum, and Randomization*, NeurIPS 2025 (Nystrom with
  SPRING for PINNs).
  J. Mueller and M. Zeinhofer, *Achieving High Accuracy with PINNs via Energy Natural Gradient
  Descent*, ICML 2023 (ENGD's least-squares solve with a relative cut-off).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from riemod.composer import woodbury as _wb
from riemod.composer.woodbury import BlockFactorization, BlockStep, Params

# Margin of the error estimates over round-off (as the Cholesky blocks').
_SAFETY = _wb._ERROR_SAFETY


def _no_factor(dtype) -> tuple[jax.Array, jax.Array]:
  """The placeholder ``(chol, factored)`` of a block that keeps no Cholesky factor."""
  return jnp.zeros((0, 0), dtype), jnp.asarray(True)


def _norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.vdot(x, x).real for x in jax.tree.leaves(tree)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TruncatedBlock(BlockFactorization):
  """A block solved by the truncated pseudo-inverse of ``G`` (see the module docstring).

  Attributes:
    left: ``U`` (``d x d``): eigenvectors of ``Q`` in sample space; ``None`` in parameter space.
    values: ``s`` (``p``): singular values of ``K~``, descending.
    right: ``V`` (``n x n``): eigenvectors of ``K~^T K~`` in parameter space; ``None`` in sample
      space (``K~^T u_i / s_i``).
    keep: ``(p,)`` whether direction ``i`` is kept (``s_i^2 >= cutoff s_max^2``, ``s_i > 0``).
    whiten: ``D^{-1/2}`` as one flat vector (parameter space), ``None`` in sample space.
  """

  left: jax.Array | None = None
  values: jax.Array | None = None
  right: jax.Array | None = None
  keep: jax.Array | None = None
  whiten: jax.Array | None = None

  @property
  def jitter(self) -> jax.Array:
    return jnp.zeros((), self.values.dtype)

  # -- the solve in whitened coordinates: coefficients in the kept right singular vectors
  def _right_coefficients(self, b: Sequence[Params]) -> jax.Array:
    """``V^T D^{-1/2} b`` (``(..., p)``) for covectors ``b`` per module."""
    if self.space == "parameter":
      return (self.whiten * self._flatten(b)) @ self.right
    kdb = sum(f.matvec(_wb._scale(m, v)) for f, m, v in zip(self.factors, self.inv_masses, b))
    return _wb._safe_div(kdb @ self.left, self.values)  # V^T K~^T = S U^T

  def _from_right(self, c: jax.Array) -> tuple[Params, ...]:
    """``D^{-1/2} V c`` per module for coefficients ``c`` (``(..., p)``)."""
    if self.space == "parameter":
      return self._unflatten(self.whiten * (c @ self.right.T))
    t = _wb._safe_div(c, self.values) @ self.left.T  # V c = K~^T U (c / s)
    return tuple(_wb._scale(m, f.rmatvec(t)) for f, m in zip(self.factors, self.inv_masses))

  def _weights(self, power: int) -> jax.Array:
    """``s^power / (s^2 + 1)`` on the kept directions, 0 elsewhere."""
    s = self.values
    return jnp.where(self.keep, s**power / (s * s + 1), 0)

  def solve(self, rhs: Sequence[Params]) -> tuple[tuple[Params, ...], jax.Array]:
    """``G^+ rhs`` per module (leaves may carry a leading batch) and the relative residual of the
    solve on the kept subspace."""
    c = self._right_coefficients(rhs)
    x = self._from_right(self._weights(0) * c)
    return x, self._residual(x, rhs)

  def _residual(self, x: Sequence[Params], b: Sequence[Params]) -> jax.Array:
    """``|P (G x - b)| / |P b|`` with ``P`` the projection on the kept directions."""
    gx = self.matvec(x)
    r = self._right_coefficients([_wb._add(a, c, -1.0) for a, c in zip(gx, b)])
    scale = jnp.linalg.norm(jnp.where(self.keep, self._right_coefficients(b), 0))
    return _wb._safe_div(jnp.linalg.norm(jnp.where(self.keep, r, 0)), scale)

  def step(self, rhs: Sequence[Params], coordinates: jax.Array | None,
           previous: Sequence[Params] | None, momentum) -> BlockStep:
    """The direction ``G^+(g + mu D phi)`` (see :meth:`BlockFactorization.step` for the
    arguments). Range-aware: the part ``alpha K^T e`` of ``g`` is solved from ``U^T e``, the
    remainder from its own coefficients; SPRING's ``G^+ D phi`` likewise drops what is cut off."""
    dtype = jax.tree.leaves(tuple(rhs))[0].dtype
    eps = jnp.finfo(dtype).eps
    if self.space == "parameter":  # V^T D^{-1/2} g directly: n numbers, no cancellation
      c = self._weights(0) * self._right_coefficients(rhs)
    else:
      remainder, in_range = _wb._split_range(self.factors, rhs, coordinates, eps)
      c = self._weights(0) * self._right_coefficients(remainder)
      if in_range is not None:  # V^T D^{-1/2} K^T e = S U^T e: no K^T e, no 1/s
        c = c + self._weights(1) * (in_range @ self.left)
    x_g = self._from_right(c)
    direction = x_g
    if previous is not None:  # G^+ D phi = D^{-1/2} (K~^T K~ + I)^+ D^{1/2} phi
      mass_phi = [{k: v[k] / m[k] for k in v} for v, m in zip(previous, self.inv_masses)]
      x_phi = self._from_right(self._weights(0) * self._right_coefficients(mass_phi))
      direction = [_wb._add(a, b, momentum) for a, b in zip(x_g, x_phi)]
    s2 = self.values**2
    smallest = jnp.min(jnp.where(self.keep, s2, jnp.inf))
    condition = (s2[0] + 1) / (smallest + 1)
    # Both eigendecompositions resolve eigenvalues to eps s_max^2: relative error up to
    # eps cond on the kept directions.
    error = _SAFETY * eps * condition
    return BlockStep(tuple(direction), _wb._dot(rhs, x_g), self._residual(x_g, rhs), error,
                     condition, self.jitter)

  def sample(self, key: jax.Array, like: Sequence[Params]) -> tuple[Params, ...]:
    """A draw from ``N(0, G^+)``: ``D^{-1/2} V diag(keep / sqrt(s^2 + 1)) z``."""
    z = jax.random.normal(key, self.values.shape, self.values.dtype)
    return self._from_right(jnp.sqrt(self._weights(0)) * z)


def precision_cutoff(max_error: float = 1e-2, dtype=None) -> float:
  """The smallest relative cut-off whose kept directions are solved to ``max_error``.

  A truncated block reports the relative error ``SAFETY eps cond`` of its step, with ``cond``
  the ratio of its largest kept eigenvalue (whitened, plus one) to its smallest; a cut-off ``c``
  keeps ``cond < 1 / c``. So ``c = SAFETY eps / max_error`` keeps every direction the precision
  check (``max_error`` of :func:`riemod.apply_if_valid`) accepts and drops the rest: the
  least-squares step as exact as the dtype allows, never refused for its conditioning. In
  float64 with ``max_error=1e-2`` this is ``8.9e-14``; in float32 ``4.8e-5``.

  Args:
    max_error: the precision check's largest accepted relative error (> 0).
    dtype: the solve's float dtype (default: JAX's default float, float64 under
      ``jax_enable_x64``).

  Example:
    >>> import numpy as np
    >>> float(precision_cutoff(1e-2, np.float64))
    8.881784197001252e-14
  """
  if isinstance(max_error, bool) or not (isinstance(max_error, (int, float)) and max_error > 0):
    raise ValueError(f"max_error={max_error!r}: the largest accepted relative error, a positive "
                     "number (e.g. 1e-2).")
  eps = float(jnp.finfo(jnp.result_type(float) if dtype is None else dtype).eps)
  return min(_SAFETY * eps / max_error, 0.5)


def truncated_block(factors, inv_masses, space: str, cutoff: float) -> TruncatedBlock:
  """Factors one block for the truncated pseudo-inverse (``space``: ``"parameter"`` or
  ``"sample"``, already resolved)."""
  d = factors[0].num_rows
  dtype = jax.tree.leaves(factors[0])[0].dtype
  if space == "parameter":
    rows = [f.rows() for f in factors]
    k = jnp.concatenate([r[name].reshape(d, -1) for f, r in zip(factors, rows)
                         for name in f.leaf_names], axis=1)
    whiten = jnp.sqrt(jnp.concatenate([
        jnp.broadcast_to(m[name], r[name].shape[1:]).reshape(-1)
        for f, m, r in zip(factors, inv_masses, rows) for name in f.leaf_names]))
    whitened = k * whiten
    eigenvalues, vectors = jnp.linalg.eigh(whitened.T @ whitened)
    left, right = None, vectors[:, ::-1]
    values = jnp.sqrt(jnp.maximum(eigenvalues[::-1], 0))
  else:
    kernel = sum(f.gram(m) for f, m in zip(factors, inv_masses))
    eigenvalues, vectors = jnp.linalg.eigh(kernel)
    left, right, whiten = vectors[:, ::-1], None, None
    values = jnp.sqrt(jnp.maximum(eigenvalues[::-1], 0))
  s2 = values**2
  keep = (s2 >= cutoff * s2[0]) & (values > 0)
  chol, factored = _no_factor(dtype)
  return TruncatedBlock(tuple(factors), tuple(inv_masses), chol, factored, space, 0,
                        left=left, values=values, right=right, keep=keep, whiten=whiten)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NystromBlock(BlockFactorization):
  """A sample-space block whose kernel is a randomized Nystrom sketch (see the module docstring).

  Attributes:
    basis: ``U`` (``d x r``), orthonormal eigenvectors of the sketch.
    eigenvalues: ``lam`` (``r``), descending, ``>= 0``.
  """

  basis: jax.Array | None = None
  eigenvalues: jax.Array | None = None

  @property
  def jitter(self) -> jax.Array:
    return jnp.zeros((), self.eigenvalues.dtype)

  def _apply_inverse(self, rhs: jax.Array) -> jax.Array:
    """``(I + Q~)^{-1} rhs`` for rows ``rhs``, ``Q~ = U diag(lam) U^T + lam_r (I - U U^T)``."""
    lam, tail = self.eigenvalues, self.eigenvalues[-1]
    coefficients = rhs @ self.basis
    inside = (coefficients / (1 + lam)) @ self.basis.T
    return inside + (rhs - coefficients @ self.basis.T) / (1 + tail)

  def _cho_solve(self, rhs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Capacitance solves with the sketch; the residual is taken against the exact operator
    ``I + K D^{-1} K^T``, so it reports the sketch's error (refinement steps, if any, are
    Richardson steps preconditioned by the sketch)."""
    x = self._apply_inverse(rhs)
    for _ in range(self.refinement_steps):
      x = x + self._apply_inverse(rhs - self._operator(x))
    norm = jnp.maximum(jnp.linalg.norm(rhs), jnp.finfo(rhs.dtype).tiny)
    return x, jnp.linalg.norm(rhs - self._operator(x)) / norm

  def _capacitance_max(self) -> jax.Array:
    return 1 + self.eigenvalues[0]

  def _solve_and_estimate(self, rhs: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    return (*self._cho_solve(rhs), self._capacitance_max(), self.jitter)


def nystrom_block(factors, inv_masses, rank: int, oversampling: int, key: jax.Array,
                  refinement_steps: int = 0) -> NystromBlock:
  """Sketches one block's kernel ``Q = K D^{-1} K^T`` at rank ``rank`` from
  ``rank + oversampling`` Gaussian test vectors (stable Nystrom: a shift ``nu`` of the order of
  round-off keeps the small core matrix positive definite and is subtracted afterwards)."""
  d = factors[0].num_rows
  dtype = jax.tree.leaves(factors[0])[0].dtype
  width = min(rank + oversampling, d)
  omega, _ = jnp.linalg.qr(jax.random.normal(key, (d, width), dtype))
  # Q omega from K and K^T products only: rows of omega^T through K^T, D^{-1}, K.
  y = sum(f.matvec(_wb._scale(m, f.rmatvec(omega.T)))
          for f, m in zip(factors, inv_masses)).T  # (d, width)
  nu = jnp.sqrt(jnp.asarray(d, dtype)) * jnp.finfo(dtype).eps * jnp.linalg.norm(y)
  y = y + nu * omega
  core = omega.T @ y
  chol = jnp.linalg.cholesky(0.5 * (core + core.T))
  b = jax.scipy.linalg.solve_triangular(chol, y.T, lower=True).T  # y chol^{-T}
  u, sigma, _ = jnp.linalg.svd(b, full_matrices=False)
  lam = jnp.maximum(sigma**2 - nu, 0)
  r = min(rank, width)
  placeholder, factored = _no_factor(dtype)
  return NystromBlock(tuple(factors), tuple(inv_masses), placeholder, factored, "nystrom",
                      refinement_steps, basis=u[:, :r], eigenvalues=lam[:r])


def factorize(factors: Sequence, inv_masses: Sequence[Params], space: str = "auto",
              refinement_steps: int = 0, cutoff: float | None = None, rank: int | None = None,
              oversampling: int = 10, key: jax.Array | None = None) -> BlockFactorization:
  """Factors one block: Cholesky (:func:`~riemod.composer.factorize_block`), truncated
  pseudo-inverse (``cutoff``) or Nystrom sketch (``space="nystrom"`` with ``rank`` and ``key``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from riemod.curvature.factors import RowsFactor
    >>> f = RowsFactor({"w": jnp.ones((1, 2, 3))})   # rank one: two equal rows
    >>> block = factorize([f], [{"w": jnp.asarray(1.0)}], cutoff=1e-12)
    >>> [round(float(v), 6) for v in block.solve([{"w": jnp.ones(3)}])[0][0]["w"]]
    [0.142857, 0.142857, 0.142857]
  """
  factors, inv_masses = tuple(factors), tuple(inv_masses)
  if space == "nystrom":
    if cutoff is not None:
      raise ValueError("cutoff= and space='nystrom' do not combine: the sketch already keeps "
                       "only the leading directions of the kernel.")
    if rank is None or key is None:
      raise ValueError("space='nystrom' needs rank= (sketch rank) and a PRNG key.")
    return nystrom_block(factors, inv_masses, rank, oversampling, key, refinement_steps)
  if cutoff is None:
    return _wb.factorize_block(factors, inv_masses, space, refinement_steps)
  _, space = _wb._block_plan(factors, inv_masses, space)
  return truncated_block(factors, inv_masses, space, cutoff)

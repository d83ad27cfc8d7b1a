"""Generalised Lanczos for the spectrum of ``G^{-1} H`` (matrix free).

``G^{-1} H`` is not symmetric, but it is self-adjoint in the ``G`` inner product
``<u, v>_G = u^T G v``. Lanczos in that inner product needs one Hessian-vector product (``H q``),
one metric solve (``G^{-1} H q``) and one metric product (``G q``, to keep the basis
``G``-orthonormal) per step. The Ritz values are taken from the projected matrix
``Q^T H Q`` (with ``Q^T G Q = I``) rather than from the three-term recurrence: every Ritz value is
then a Rayleigh quotient of ``(H, G)``, so the extreme Ritz values bracket the spectrum from inside
(``lam_min <= ritz_min``, ``ritz_max <= lam_max``), also after a breakdown (an invariant subspace
found), where Lanczos restarts from a fresh direction. The basis is fully reorthogonalised (two Gram-Schmidt passes), which is cheap at the
20 or so steps a certificate uses.

References:
  Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 5
  (spectra of ``G^{-1} H`` by Hessian-vector products and Woodbury solves).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Operator = Callable[[jax.Array], jax.Array]


class LanczosResult(NamedTuple):
  """Ritz values of ``G^{-1} H``.

  Attributes:
    eigenvalues: the ``m`` Ritz values, ascending.
    lam_min: the smallest Ritz value (an upper estimate of the smallest eigenvalue).
    lam_max: the largest Ritz value (a lower estimate of the largest eigenvalue).
    orthogonality: ``max |Q G Q^T - I|``, the loss of ``G``-orthonormality of the basis.
  """

  eigenvalues: jax.Array
  lam_min: jax.Array
  lam_max: jax.Array
  orthogonality: jax.Array


# metric_products=False takes G w from the solve unless |w|_G < CANCELLATION |G^{-1} H q|_G.
CANCELLATION = 0.1


def _pattern(n: int, j, dtype) -> jax.Array:
  """A deterministic spread-out direction (restart after a breakdown; no RNG to compile)."""
  k = jnp.arange(n, dtype=dtype) + 1
  return jnp.cos(k * (0.7548776662466927 * (j + 1)) + 0.5698402909980532 * j)


def generalized_lanczos(hvp: Operator, solve: Operator, matvec: Operator, start: jax.Array,
                        num_steps: int) -> LanczosResult:
  """Ritz values of ``G^{-1} H`` on flat vectors.

  Args:
    hvp: ``v -> H v`` (symmetric ``H``, e.g. a Hessian-vector product).
    solve: ``v -> G^{-1} v`` (``G`` symmetric positive definite).
    matvec: ``v -> G v``.
    start: the starting vector ``(n,)`` (any nonzero vector; random is best).
    num_steps: Krylov dimension ``m``; capped at ``n``. With ``m = n`` the Ritz values are the
      eigenvalues.

  Returns:
    A :class:`LanczosResult`.

  Example:
    >>> import jax.numpy as jnp
    >>> h, g = jnp.diag(jnp.array([1.0, 4.0])), jnp.diag(jnp.array([1.0, 2.0]))
    >>> r = generalized_lanczos(lambda v: h @ v, lambda v: jnp.linalg.solve(g, v),
    ...                         lambda v: g @ v, jnp.ones(2), 2)
    >>> [round(float(e), 4) for e in r.eigenvalues]
    [1.0, 2.0]
  """
  return _lanczos(hvp, solve, matvec, start, num_steps)[0]


def top_ritz_pair(hvp: Operator, solve: Operator, matvec: Operator, start: jax.Array,
                  num_steps: int, *, metric_products: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
  """The largest Ritz value of ``G^{-1} H`` and its Ritz vector (``G``-normalised).

  The same Lanczos as :func:`generalized_lanczos`; the Ritz vector is what a warm start of the
  next estimate needs (the step-size controller keeps it between estimates).

  With ``metric_products=False`` the basis's ``G`` products come from the solves instead of
  ``matvec``: a new direction is ``w = G^{-1} H q - Q c``, so ``G w = H q - (G Q) c`` with
  ``G Q`` already known, and ``matvec`` is called once (on ``start``) instead of once per step.
  That is exact when ``solve`` inverts ``matvec`` exactly; in floating point the basis is
  ``G``-orthonormal only to the solve's relative error times ``|G^{-1} H q|_G / |w|_G`` (what the
  orthogonalisation cancelled), and so are the Ritz values; where that factor would exceed
  ``1 / CANCELLATION`` (10) the product is taken after all. Pass it only when ``solve`` is
  ``G^{-1}`` (not a truncated or sketched inverse).

  Example:
    >>> import jax.numpy as jnp
    >>> h, g = jnp.diag(jnp.array([1.0, 4.0])), jnp.diag(jnp.array([1.0, 2.0]))
    >>> lam, v = top_ritz_pair(lambda v: h @ v, lambda v: jnp.linalg.solve(g, v),
    ...                        lambda v: g @ v, jnp.ones(2), 2)
    >>> round(float(lam), 4), [round(abs(float(c)), 4) for c in v]
    (2.0, [0.0, 0.7071])
  """
  result, basis, vectors = _lanczos(hvp, solve, matvec, start, num_steps, metric_products)
  return result.lam_max, basis.T @ vectors[:, -1]


def _lanczos(hvp, solve, matvec, start, num_steps, metric_products=True):
  """``(LanczosResult, G-orthonormal basis (m, n), eigenvectors of the projected matrix)``."""
  start = jnp.asarray(start)
  if start.ndim != 1:
    raise ValueError(f"start must be a flat vector; got shape {start.shape}.")
  n = start.shape[0]
  m = int(min(num_steps, n))
  if m < 1:
    raise ValueError(f"num_steps={num_steps}: Lanczos needs at least one step.")
  dtype = start.dtype
  eps = jnp.finfo(dtype).eps

  def orthogonalise(w, basis, gbasis):
    """``(w - Q c, c)``: two classical Gram-Schmidt passes in the G inner product (rows beyond
    the current step are zero and contribute nothing)."""
    total = 0.0
    for _ in range(2):
      c = gbasis @ w
      w, total = w - basis.T @ c, total + c
    return w, total

  gstart = matvec(start)
  norm = jnp.sqrt(jnp.maximum(jnp.vdot(start, gstart), jnp.finfo(dtype).tiny))
  basis = jnp.zeros((m, n), dtype).at[0].set(start / norm)
  gbasis = jnp.zeros((m, n), dtype).at[0].set(gstart / norm)
  hbasis = jnp.zeros((m, n), dtype)

  def body(j, carry):
    basis, gbasis, hbasis = carry
    hq = hvp(basis[j])
    hbasis = hbasis.at[j].set(hq)
    w0 = solve(hq)
    scale = jnp.sqrt(jnp.abs(jnp.vdot(w0, hq)))
    w, c = orthogonalise(w0, basis, gbasis)
    # G w = H q - G Q^T c without a metric product (exact up to the solve's error).
    gw = hq - gbasis.T @ c
    beta_sq = jnp.vdot(w, gw)
    breakdown = ~(beta_sq > (jnp.sqrt(eps) * scale) ** 2)

    def fresh():
      # As w's dtype: an operator may return a wider float than the start vector.
      return orthogonalise(_pattern(n, j, dtype), basis, gbasis)[0].astype(w.dtype)

    def restart():
      new = fresh()
      return new, matvec(new).astype(gw.dtype)

    # A branch, not a select: computed on every step, the restart direction and its two
    # Gram-Schmidt passes were more than half of what five steps spend outside their operators
    # on 25,000 parameters (benchmarks/results/lanczos.md).
    if metric_products:
      w = jax.lax.cond(breakdown, fresh, lambda: w)
      gw = matvec(w)
    else:
      # The identity's error is the solve's relative error over |w|_G / |G^{-1} H q|_G: where
      # orthogonalisation cancelled most of the solve (a nearly invariant Krylov space), the
      # product is taken.
      cancelled = ~(beta_sq > CANCELLATION ** 2 * scale ** 2)
      w, gw = jax.lax.cond(breakdown, restart, lambda: jax.lax.cond(
          cancelled, lambda: (w, matvec(w).astype(gw.dtype)), lambda: (w, gw)))
    wnorm = jnp.sqrt(jnp.maximum(jnp.vdot(w, gw), jnp.finfo(dtype).tiny))
    basis = basis.at[j + 1].set(w / wnorm)
    gbasis = gbasis.at[j + 1].set(gw / wnorm)
    return basis, gbasis, hbasis

  # The last basis vector needs only its Hessian product: no solve or metric product extends the
  # basis past m (one solve and one metric product in five at the controller's 5 steps).
  basis, gbasis, hbasis = jax.lax.fori_loop(0, m - 1, body, (basis, gbasis, hbasis))
  hbasis = hbasis.at[m - 1].set(hvp(basis[m - 1]))
  projected = basis @ hbasis.T
  projected = 0.5 * (projected + projected.T)
  # Two Gram-Schmidt passes keep Q^T G Q = I to round-off (reported as ``orthogonality``), so the
  # projected matrix is the Rayleigh-Ritz matrix of the pencil.
  eigenvalues, vectors = jnp.linalg.eigh(projected)
  orthogonality = jnp.max(jnp.abs(basis @ gbasis.T - jnp.eye(m, dtype=dtype)))
  return (LanczosResult(eigenvalues, eigenvalues[0], eigenvalues[-1], orthogonality), basis,
          vectors)

"""Rank decisions shared by the bracket search (``lie``) and the orbit method (``orbit``): an
incremental span with the gap between kept and dropped singular values recorded."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.sparse


class AmbiguousRankWarning(RuntimeWarning):
  """A rank decision was close to the tolerance or differed between random points."""


def _svd(a: np.ndarray):
  """Thin SVD; LAPACK's divide and conquer (gesdd) fails to converge on rare matrices, QR iteration
  (gesvd) then gives the same decomposition."""
  try:
    return np.linalg.svd(a, full_matrices=False)
  except np.linalg.LinAlgError:
    return scipy.linalg.svd(a, full_matrices=False, lapack_driver="gesvd")


class _RankTracker:
  """Orthonormal basis of a growing span, with scaled relative-tolerance decisions.

  The span's orthogonal complement ``C`` (``N x (N - rank)``, from a complete QR of the basis) is kept
  beside it: the residual of candidates ``rows (I - P) = rows C C^T`` has the singular values of
  ``rows C``, which is ``N / (N - rank)`` times cheaper to form and factor once the span is large.
  """

  def __init__(self, dimension, rtol, ambiguity):
    self.basis = np.zeros((dimension, 0))
    self.rtol, self.ambiguity = rtol, ambiguity
    self.smallest_kept, self.largest_dropped = np.inf, 0.0
    self._complement = None

  @property
  def rank(self):
    return self.basis.shape[1]

  def complement(self) -> np.ndarray:
    dimension, rank = self.basis.shape
    if self._complement is None or self._complement.shape[1] != dimension - rank:
      if rank == 0:
        self._complement = np.eye(dimension)
      else:
        full, _ = np.linalg.qr(self.basis, mode="complete")
        self._complement = full[:, rank:]
    return self._complement

  def add(self, rows: np.ndarray) -> np.ndarray:
    """Adds the rows (already scaled to their round-off level) that enlarge the span.

    The decision uses the singular values of the rows' residual ``rows (I - P)`` (``P`` the projector
    on the current span), computed as those of ``R`` in ``rows C = Q R`` (``C`` the complement, ``Q``
    orthonormal columns): a block of ``m`` candidates costs one product and one QR, no ``m x N`` SVD.

    Returns the indices of the rows kept.
    """
    rows = np.asarray(rows, np.float64)
    count, dimension = rows.shape
    kept = []
    if count == 0 or self.rank >= dimension:
      return np.asarray(kept, dtype=int)
    complement = self.complement()
    free = complement.shape[1]
    # rows C, reduced to its triangular factor when tall; whichever order is cheaper.
    if count <= free:
      reduced = rows @ complement
    elif free * (dimension + free) < dimension * dimension:
      reduced = np.linalg.qr(rows @ complement, mode="r")
    else:
      reduced = (np.linalg.qr(rows, mode="r") if count > dimension else rows) @ complement
    # ``added`` (orthonormal, in complement coordinates) spans what this call adds; ``frame`` the rest.
    added = np.zeros((free, 0))
    frame = np.eye(free)
    available = np.ones(count, bool)
    while True:
      _, singular, right = _svd(reduced @ frame)
      new_rank = int(np.sum(singular > self.rtol))
      if singular.size > new_rank:
        self.largest_dropped = max(self.largest_dropped, float(singular[new_rank]))
      if new_rank == 0:
        break
      self.smallest_kept = min(self.smallest_kept, float(singular[new_rank - 1]))
      # Candidates that carry the new directions: pivoted QR on each row's component along them.
      directions = complement @ (frame @ right[:new_rank].T)
      weights = rows @ directions
      weights[~available] = 0.0
      _, _, pivots = scipy.linalg.qr(weights.T, mode="economic", pivoting=True)
      chosen = pivots[:new_rank]
      chosen = chosen[available[chosen]]
      if chosen.size == 0:
        break
      picked = ((rows[chosen] @ complement) @ frame) @ frame.T  # residuals, complement coordinates
      q, _ = np.linalg.qr(picked.T)
      q = q - added @ (added.T @ q)
      q, _ = np.linalg.qr(q)
      added = np.concatenate([added, q], axis=1)
      kept.extend(chosen.tolist())
      available[chosen] = False
      if added.shape[1] >= free or not available.any():
        break
      full, _ = np.linalg.qr(added, mode="complete")
      frame = full[:, added.shape[1]:]
    if added.shape[1]:
      self.basis = np.concatenate([self.basis, complement @ added], axis=1)
    return np.asarray(kept, dtype=int)

  def near_tolerance(self) -> bool:
    low, high = self.rtol / self.ambiguity, self.rtol * self.ambiguity
    return bool(low < self.largest_dropped or (self.smallest_kept < high))


def _finite_or_raise(values: np.ndarray, what: str):
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{what} produced NaN/inf at a random point: phi (or the metric) is not "
                     "differentiable there. Use a smooth reparametrization (e.g. the path-lifting on a "
                     "fixed activation region instead of relu itself).")


_VANISHING = dict(rank=0, generator_rank=0, history=[0], smallest_kept=float("inf"), largest_dropped=0.0,
                  ambiguous=True, complete=True)


def _start_tracker(generators: np.ndarray, dimension: int, rtol: float, ambiguity: float,
                   left_vectors: bool = True):
  """The generators' rank at the point and a tracker holding its singular-value gap (None: all vanish).

  Without ``left_vectors`` a tall ``generators`` matrix is first reduced to its triangular QR factor,
  which has the same singular values and right singular vectors (``left`` is then None).
  """
  _finite_or_raise(generators, "The Jacobian of phi")
  tracker = _RankTracker(dimension, rtol, ambiguity)
  if left_vectors:
    left, singular, right = _svd(generators)
  else:
    reduced = np.linalg.qr(generators, mode="r") if generators.shape[0] > generators.shape[1] else generators
    left = None
    _, singular, right = _svd(reduced)
  if singular.size == 0 or singular[0] == 0.0:
    warnings.warn("All fields vanish at this point (phi has a zero Jacobian): every function is "
                  "conserved locally. Is phi constant or piecewise constant?", AmbiguousRankWarning,
                  stacklevel=4)
    return None
  generator_rank = int(np.sum(singular > rtol * singular[0]))
  if generator_rank < singular.size:
    tracker.largest_dropped = float(singular[generator_rank] / singular[0])
  tracker.smallest_kept = float(singular[generator_rank - 1] / singular[0])
  return tracker, generator_rank, left, singular, right

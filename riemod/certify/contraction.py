"""Local contraction of the Riemannian update map, per module and composed.

The step ``theta <- theta - eta G^{-1} grad l`` has the local Jacobian ``F = I - eta G^{-1} H``.
``F`` is self-adjoint in the ``G`` inner product, so its ``G``-norm is its spectral radius:

* contraction factor ``rho = max_i |1 - eta lam_i(G^{-1} H)| = max(|1 - eta lam_min|, |1 - eta lam_max|)``;
* largest stable learning rate ``2 / lam_max``;
* the map contracts (``rho < 1``) iff ``0 < lam_min`` and ``eta < 2 / lam_max``.

Per module ``a`` the same holds for ``F_aa = I - eta G_a^{-1} H_aa`` (the Hessian restricted to the
module's parameters, ``G_a`` its metric block). With a block-diagonal ``G`` the off-diagonal blocks
``F_ab = -eta G_a^{-1} H_ab`` couple the modules; their sizes in the module metrics,
``c_ab = eta ||G_a^{-1/2} H_ab G_b^{-1/2}||``, complete the non-negative matrix ``N`` with
``N_aa = rho_a``, ``N_ab = c_ab``.

Composition rule (riemod's discrete-time reading of the contraction-analysis rules of Lohmiller &
Slotine 1998 for cascades and feedback): in the block-weighted norm
``||x||_d = max_a ||x_a||_{G_a} / d_a`` the update map satisfies ``||F||_d <= max_a (N d)_a / d_a``.
Choosing ``d`` as the Perron vector of ``N`` gives the composed rate ``rho(N)``, the spectral radius
of ``N``. For a cascade (``N`` triangular: no feedback) ``rho(N) = max_a rho_a``: the slowest module
sets the rate, whatever the (bounded) coupling, as the cascade rule says. With feedback ``rho(N)``
also pays for the couplings (a small-gain condition). ``rho(N)`` always bounds the whole-network
factor from above, so a composed certificate is conservative.

References:
  Lohmiller & Slotine, *On contraction analysis for non-linear systems*, Automatica 34 (1998).
  Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 5.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from riemod.certify.lanczos import LanczosResult, generalized_lanczos

Operator = Callable[[jax.Array], jax.Array]


class Contraction(NamedTuple):
  """Contraction quantities of one block (or of the whole network).

  Attributes:
    lam_min: smallest Ritz value of ``G^{-1} H``.
    lam_max: largest Ritz value of ``G^{-1} H``.
    factor: ``max |1 - lr lam|`` over ``[lam_min, lam_max]``.
    max_stable_learning_rate: ``2 / lam_max`` (``inf`` when ``lam_max <= 0``).
  """

  lam_min: jax.Array
  lam_max: jax.Array
  factor: jax.Array
  max_stable_learning_rate: jax.Array


def contraction_factor(lam_min, lam_max, learning_rate):
  """``max(|1 - lr lam_min|, |1 - lr lam_max|)``: the ``G``-norm of ``I - lr G^{-1} H``.

  Example:
    >>> float(contraction_factor(0.5, 2.0, 0.5))
    0.75
  """
  lam_min, lam_max = jnp.asarray(lam_min), jnp.asarray(lam_max)
  return jnp.maximum(jnp.abs(1 - learning_rate * lam_min), jnp.abs(1 - learning_rate * lam_max))


def max_stable_learning_rate(lam_max):
  """``2 / lam_max`` (``inf`` when there is no positive curvature).

  Example:
    >>> float(max_stable_learning_rate(4.0))
    0.5
  """
  lam_max = jnp.asarray(lam_max)
  safe = jnp.where(lam_max > 0, lam_max, 1.0)
  return jnp.where(lam_max > 0, 2.0 / safe, jnp.inf)


def contraction_of(result: LanczosResult, learning_rate) -> Contraction:
  """Contraction quantities from Lanczos Ritz values."""
  return Contraction(result.lam_min, result.lam_max,
                     contraction_factor(result.lam_min, result.lam_max, learning_rate),
                     max_stable_learning_rate(result.lam_max))


def spectrum(hvp: Operator, solve: Operator, matvec: Operator, start: jax.Array, num_steps: int,
             mask: jax.Array | np.ndarray | None = None) -> LanczosResult:
  """Ritz values of ``G^{-1} H``, or of ``G_a^{-1} H_aa`` for the block selected by ``mask``.

  Args:
    hvp, solve, matvec: flat-vector operators ``H v``, ``G^{-1} v``, ``G v``; with ``mask``,
      ``solve`` and ``matvec`` must be block diagonal (a layerwise metric).
    start: a flat start vector (random).
    num_steps: Lanczos steps; with a ``mask`` it must not exceed the block size (a static numpy
      mask caps it; a traced mask, e.g. under ``vmap`` over blocks, leaves that to the caller).
    mask: a 0/1 vector selecting the block, or ``None`` for the whole network.
  """
  if mask is None:
    return generalized_lanczos(hvp, solve, matvec, start, num_steps)
  if isinstance(mask, np.ndarray):
    num_steps = int(min(num_steps, int(np.sum(mask))))
  m = jnp.asarray(mask, start.dtype)
  return generalized_lanczos(lambda v: m * hvp(m * v), lambda v: m * solve(m * v),
                             lambda v: m * matvec(m * v), m * start, num_steps)


def coupling_norm(hvp: Operator, solve: Operator, mask_a, mask_b, start: jax.Array,
                  num_iterations: int) -> jax.Array:
  """``||G_a^{-1/2} H_ab G_b^{-1/2}||_2`` by power iteration (two HVPs per iteration).

  Iterates ``v_b <- G_b^{-1} H_ba G_a^{-1} H_ab v_b`` normalised in ``G_b``; the ``G``-norms come
  from the right-hand sides already at hand (``G_a u_a = H_ab v_b``), so no metric product is needed.
  ``solve`` must be block diagonal (a layerwise metric).
  """
  dtype = start.dtype
  ma, mb = jnp.asarray(mask_a, dtype), jnp.asarray(mask_b, dtype)
  tiny = jnp.finfo(dtype).tiny

  def half(v, m_out):
    rhs = m_out * hvp(v)
    u = m_out * solve(rhs)
    return u, jnp.vdot(u, rhs)

  def body(_, v):
    u, _ = half(v, ma)
    w, w_norm_sq = half(u, mb)
    return w / jnp.sqrt(jnp.maximum(w_norm_sq, tiny))

  # Start from G_b^{-1} z: its G_b-norm squared is z^T G_b^{-1} z, no metric product needed.
  z = mb * start
  v = mb * solve(z)
  v = v / jnp.sqrt(jnp.maximum(jnp.vdot(v, z), tiny))
  v = jax.lax.fori_loop(0, num_iterations, body, v)
  _, sigma_sq = half(v, ma)
  return jnp.sqrt(jnp.maximum(sigma_sq, 0.0))


def composed_rate(block_matrix) -> float:
  """The composed contraction rate ``rho(N)`` of a non-negative block matrix ``N``.

  ``N[a, a]`` are the modules' contraction factors and ``N[a, b]`` the couplings from module ``b``
  into module ``a`` (host-side, ``N`` is small).

  Example:
    >>> composed_rate([[0.5, 0.0], [3.0, 0.8]])   # a cascade: the slowest module's rate
    0.8
  """
  n = np.asarray(block_matrix, dtype=np.float64)
  if n.ndim != 2 or n.shape[0] != n.shape[1]:
    raise ValueError(f"block_matrix must be square; got shape {n.shape}.")
  if not np.all(np.isfinite(n)) or np.any(n < 0):
    raise ValueError("block_matrix must hold finite non-negative norms.")
  if n.size == 0:
    return 0.0
  return float(np.max(np.abs(np.linalg.eigvals(n))))


def cascade_weights(block_matrix, slack: float = 1e-9) -> tuple[np.ndarray, float]:
  """Block weights ``d`` and the rate they certify: ``||F||_d <= max_a (N d)_a / d_a``.

  ``d`` is the Perron vector of ``N + slack * 11^T`` (positive even for a cascade, whose own
  Perron vector may vanish), so the certified rate tends to ``rho(N)`` as ``slack -> 0``.

  Example:
    >>> d, rate = cascade_weights([[0.5, 0.0], [0.1, 0.8]])
    >>> round(rate, 6)
    0.8
  """
  n = np.asarray(block_matrix, dtype=np.float64)
  shifted = n + slack * np.ones_like(n)
  values, vectors = np.linalg.eig(shifted)
  d = np.abs(np.real(vectors[:, np.argmax(np.abs(values))]))
  d = d / np.max(d)
  rate = float(np.max((n @ d) / d))
  return d, rate

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


def gauss_newton_product(apply_flat: Operator, flat: jax.Array,
                         loss_fn: Callable[[jax.Array], jax.Array]) -> Operator:
  """``v -> J^T (d^2 l / dy^2) J v``: the Gauss-Newton part of the Hessian, matrix free.

  ``J`` is the Jacobian of ``apply_flat`` (flat parameters to outputs) at ``flat``. The full
  Hessian adds ``sum_s (dl/dy_s) d^2 y_s / dw^2``, a term that is indefinite and scales with the
  residuals; the Gauss-Newton part is positive semidefinite for a convex ``loss_fn`` and stays as
  the residuals shrink. One linearised forward pass is shared by every product.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> gnvp = gauss_newton_product(lambda w: x @ w, jnp.zeros(2),
    ...                             lambda y: 0.5 * jnp.sum(y ** 2))
    >>> [float(v) for v in gnvp(jnp.array([1.0, 0.0]))]      # x^T x e_1
    [2.0, 2.0]
  """
  outputs, forward = jax.linearize(apply_flat, flat)
  backward = jax.linear_transpose(forward, flat)
  output_grad = jax.grad(loss_fn)

  def product(v):
    u = forward(v)
    return backward(jax.jvp(output_grad, (outputs,), (u,))[1])[0]

  return product


class Verdict(NamedTuple):
  """What a certificate says about a step size, kept apart from curvature and contraction.

  Attributes:
    status: ``"contracting"`` (every direction shrinks: ``lam_min > 0`` and the step is inside the
      edge), ``"stable"`` (inside the edge of stability; flat or negative directions remain),
      ``"edge"`` (past the edge of the full Hessian only: the Gauss-Newton model is inside it, or
      was not measured), ``"unstable"`` (past the edge of the Gauss-Newton model, or the loss rose
      over the run) or ``"failed"`` (a non-finite spectrum).
    edge_ratio: ``lr * lam_max(G^{-1} H) / 2``; the step is inside the edge of stability of the
      local quadratic model when it is below 1.
    gauss_newton_edge_ratio: the same with the Gauss-Newton part of ``H`` (``None`` if not
      measured).
    step_size: the step-size condition, in words.
    curvature: negative curvature, in words: directions of descent, not instability.
    contraction: where the step contracts and with which factor, stating on which part.
    text: the one-line verdict (``status: reason``).
  """

  status: str
  edge_ratio: float
  gauss_newton_edge_ratio: float | None
  step_size: str
  curvature: str
  contraction: str
  text: str

  def __str__(self) -> str:
    return self.text


def _g(value: float) -> str:
  return f"{value:.3g}"


def classify(lam_min: float, lam_max: float, learning_rate: float, *,
             gauss_newton: tuple[float, float] | None = None,
             history: tuple[float, float, int] | None = None) -> Verdict:
  """Reads a spectrum of ``G^{-1} H`` as a verdict on the step size ``learning_rate``.

  Three statements are kept apart:

  * **Step size.** On the local quadratic model the step multiplies the component along an
    eigenvector of ``G^{-1} H`` by ``1 - lr lam``; it stays bounded for ``lam > 0`` iff
    ``lr < 2 / lam_max``, the edge of stability, reported as ``edge_ratio = lr lam_max / 2``.
    On a network the top of the full Hessian's spectrum is often set by its indefinite residual
    term (``sum_s (dl/dy_s) d^2 y_s / dw^2``) in directions the metric hardly weighs; that term
    shrinks with the residuals, and runs past its edge routinely converge. The Gauss-Newton part
    ``J^T (d^2 l / dy^2) J`` is positive semidefinite and persists: a step past *its* edge
    overshoots in function space. ``"unstable"`` is therefore reserved for a step past the
    Gauss-Newton edge, or a run whose loss has risen above its first value (``history``). Past the
    full-Hessian edge only, the status is ``"edge"``.
  * **Negative curvature** (``lam_min < 0``): along those directions the step moves away, by a
    factor up to ``1 + lr |lam_min|`` per step, and the loss decreases faster than linearly:
    directions of descent, not instability.
  * **Contraction.** Claimed on the whole spectrum only if ``lam_min > 0`` and the step is inside
    the edge (factor ``max |1 - lr lam|``); otherwise on the positive part of the spectrum
    (each direction with ``0 < lam <= lam_max`` shrinks by ``|1 - lr lam| < 1``, no uniform rate
    when ``lam`` comes close to 0), and on the Gauss-Newton model when it was measured.

  Args:
    lam_min, lam_max: extreme eigenvalues (Ritz values) of ``G^{-1} H``.
    learning_rate: the step size (> 0).
    gauss_newton: ``(lam_min, lam_max)`` of ``G^{-1} H_GN`` (see :func:`gauss_newton_spectrum`).
    history: ``(initial_loss, current_loss, num_steps)`` of the run so far.

  Returns:
    A :class:`Verdict`.

  Example:
    >>> classify(-0.5, 4.0, 0.1).status       # inside the edge, negative curvature
    'stable'
    >>> classify(-90.0, 85.0, 0.1, gauss_newton=(0.0, 3.0)).status
    'edge'
    >>> classify(-90.0, 85.0, 1.0, gauss_newton=(0.0, 3.0)).status
    'unstable'
  """
  lr = float(learning_rate)
  values = [lam_min, lam_max] + (list(gauss_newton) if gauss_newton is not None else [])
  if not all(np.isfinite(v) for v in values):
    text = "failed: non-finite spectrum"
    return Verdict("failed", float("nan"), None, text, "-", "-", text)
  lam_min, lam_max = float(lam_min), float(lam_max)
  ratio = lr * max(lam_max, 0.0) / 2.0
  edge = f"edge of stability lr < 2/lam_max = {_g(2.0 / lam_max)}" if lam_max > 0 else \
      "no positive curvature: no edge"
  step = f"lr lam_max/2 = {_g(ratio)} ({'<' if ratio < 1 else '>='} 1; {edge})"
  gn_ratio = None
  if gauss_newton is not None:
    gn_min, gn_max = (float(v) for v in gauss_newton)
    gn_ratio = lr * max(gn_max, 0.0) / 2.0
    step += f"; Gauss-Newton model lr lam_max/2 = {_g(gn_ratio)}"

  if lam_min < 0:
    curvature = (f"negative curvature down to lam_min = {_g(lam_min)}: directions of descent "
                 f"(the step moves along them by up to 1 + lr|lam_min| = "
                 f"{_g(1 + lr * -lam_min)} per step and the loss falls), not instability")
  else:
    curvature = f"no negative curvature (lam_min = {_g(lam_min)})"

  factor = max(abs(1 - lr * lam_min), abs(1 - lr * lam_max))
  parts = []
  if lam_min > 0 and ratio < 1:
    parts.append(f"contracting on the whole spectrum: factor max|1 - lr lam| = {_g(factor)} < 1")
  elif ratio < 1 and lam_max > 0:
    parts.append(f"contracting on the positive part of the spectrum only: every direction with "
                 f"0 < lam <= {_g(lam_max)} shrinks by |1 - lr lam| < 1 (no uniform rate near "
                 f"lam = 0)")
  else:
    parts.append(f"not contracting on the full Hessian (factor {_g(factor)})")
  if gauss_newton is not None:
    gn_factor = max(abs(1 - lr * gn_min), abs(1 - lr * gn_max))
    if gn_ratio < 1 and gn_max > 0:
      parts.append(f"on the Gauss-Newton model every curved direction (0 < lam <= {_g(gn_max)}) "
                   f"shrinks by |1 - lr lam| < 1 (uniform factor {_g(gn_factor)} over its Ritz "
                   f"range [{_g(gn_min)}, {_g(gn_max)}])")
    else:
      parts.append(f"the Gauss-Newton model does not contract (factor {_g(gn_factor)})")
  contraction = "; ".join(parts)

  diverged = None
  if history is not None:
    initial, current, steps = history
    if int(steps) > 0 and np.isfinite(initial) and (not np.isfinite(current)
                                                    or current > initial):
      diverged = (f"the loss rose over the run ({_g(float(initial))} -> {_g(float(current))} "
                  f"after {int(steps)} steps)")
  if diverged is not None:
    status, reason = "unstable", diverged
  elif gn_ratio is not None and gn_ratio >= 1:
    status, reason = "unstable", (f"past the edge of the Gauss-Newton model: lr lam_max/2 = "
                                  f"{_g(gn_ratio)} >= 1 (lr >= {_g(2.0 / gn_max)})")
  elif ratio >= 1:
    status = "edge"
    if gn_ratio is not None:
      reason = (f"past the edge on the full Hessian only: lr lam_max/2 = {_g(ratio)}, "
                f"Gauss-Newton model {_g(gn_ratio)} < 1 (the excess comes from the indefinite "
                f"residual term, which shrinks with the residuals)")
    else:
      reason = (f"lr lam_max/2 = {_g(ratio)} >= 1 on the full Hessian; without the Gauss-Newton "
                f"model or a loss history this cannot tell edge-of-stability oscillation from "
                f"divergence")
  elif lam_min > 0:
    status, reason = "contracting", f"factor {_g(factor)} < 1, lr lam_max/2 = {_g(ratio)}"
  else:
    status = "stable"
    reason = f"lr lam_max/2 = {_g(ratio)} < 1"
    if lam_min < 0:
      reason += f"; negative curvature (lam_min {_g(lam_min)}) = descent directions"
  return Verdict(status, ratio, gn_ratio, step, curvature, contraction, f"{status}: {reason}")


def gauss_newton_spectrum(apply_flat: Operator, flat: jax.Array,
                          loss_fn: Callable[[jax.Array], jax.Array], solve: Operator,
                          matvec: Operator, start: jax.Array, num_steps: int) -> LanczosResult:
  """Ritz values of ``G^{-1} H_GN``: the metric against the Gauss-Newton part of the Hessian.

  ``H_GN = J^T (d^2 l/dy^2) J`` (:func:`gauss_newton_product`), ``solve``/``matvec`` the flat
  ``G^{-1} v`` and ``G v`` of the optimizer's metric at the same batch. The top Ritz value gives
  the Gauss-Newton edge of stability ``2 / lam_max`` that :func:`classify` uses to tell a
  divergent step from an edge-of-stability one. For a convex ``loss_fn`` the spectrum lies in
  ``[0, lam_max]``; with a layerwise metric whose output metric is the loss's own output Hessian
  (the exact softmax Fisher for cross-entropy) ``lam_max`` is at most the number of modules.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> g = x.T @ x + 0.5 * jnp.eye(2)                       # G = H_GN + mass I
    >>> r = gauss_newton_spectrum(lambda w: x @ w, jnp.zeros(2), lambda y: 0.5 * jnp.sum(y ** 2),
    ...                           lambda v: jnp.linalg.solve(g, v), lambda v: g @ v,
    ...                           jnp.ones(2), 2)
    >>> float(r.lam_max) < 1.0
    True
  """
  return generalized_lanczos(gauss_newton_product(apply_flat, flat, loss_fn), solve, matvec,
                             start, num_steps)

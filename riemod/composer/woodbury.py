"""Solves with ``G = K^T K + D`` for one block of modules, by Woodbury or in parameter space.

Sample space (``d <= n``): ``G^{-1} g = D^{-1} g - D^{-1} K^T C^{-1} K D^{-1} g`` with the capacitance
``C = I + K D^{-1} K^T`` (``d x d``, eigenvalues >= 1), factored once by Cholesky and reused for every
right-hand side. Parameter space (``n < d``): ``G`` itself (``n x n``) by Cholesky. Cost
``O(n d^2 + d^3)`` or ``O(n^2 d + n^3)``; neither forms an inverse.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from riemod.curvature import _mesh
from riemod.curvature.factors import Factor

Params = dict  # one module's {leaf name: array}

# Jitter levels tried in turn, relative to the mean diagonal of the matrix (multiples of eps).
_JITTER_STEPS = 6


def cholesky_with_jitter(matrix: jax.Array | Callable[[jax.Array], jax.Array]
                         ) -> tuple[jax.Array, jax.Array]:
  """Cholesky factor of an SPD matrix, adding jitter only if the plain factorisation fails.

  Jitter escalates as ``mean(diag) * eps * 10^k`` for ``k = 1..5`` until the factor is finite; in
  float32 this rescues matrices whose round-off makes them numerically indefinite.

  Args:
    matrix: the matrix, or a function ``shift -> matrix + shift * I`` that builds it. With a
      builder nothing else holds the matrix, so LAPACK factors it in place (no ``d x d`` copy);
      it is rebuilt, with the jitter on its diagonal, only for a retry.

  Returns:
    ``(lower factor, jitter added)``.

  Example:
    >>> import jax.numpy as jnp
    >>> chol, jitter = cholesky_with_jitter(jnp.array([[4.0, 2.0], [2.0, 2.0]]))
    >>> chol.tolist(), float(jitter)
    ([[2.0, 0.0], [1.0, 1.0]], 0.0)
  """
  if callable(matrix):
    build = matrix
  else:
    build = lambda shift: matrix + shift * jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
  chol = _cholesky(build(0.0))
  return jax.lax.cond(_finite_factor(chol), lambda: (chol, _zero_like(chol)),
                      lambda: _escalate(build))


def _zero_like(chol: jax.Array) -> jax.Array:
  """A zero jitter typed like the factor (varying inside ``shard_map`` where the factor is one
  device's own: the branches of a ``cond`` must agree)."""
  return _mesh.vary_like(jnp.zeros((), chol.dtype), chol)


def _escalate(build: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Refactors ``build(jitter)`` with escalating jitter until the factor is finite.

  The search for the jitter level runs on the matrix with its gradient stopped, and the chosen
  level's factor is then computed once more, outside the loop: reverse-mode differentiation cannot
  pass through a ``while_loop``, but it can pass through that last factorisation (the jitter
  itself is a constant of the step). A finite plain factor comes back after one factorisation and
  no retry; this matters under ``jax.vmap``, where a cond around this evaluates it for every lane.
  """
  plain = lambda shift: jax.lax.stop_gradient(build(shift))
  chol = _cholesky(plain(0.0))
  n, dtype = chol.shape[-1], chol.dtype

  def failed(carry):
    level, factor, _ = carry
    return (level < _JITTER_STEPS - 1) & ~_finite_factor(factor)

  def retry(carry):
    level = carry[0] + 1
    scale = jnp.trace(plain(0.0)) / n
    jitter = (scale * jnp.finfo(dtype).eps * 10.0 ** level).astype(dtype)
    return level, _cholesky(plain(jitter)), jitter

  start = (jnp.asarray(0), chol, _zero_like(chol))
  jitter = jax.lax.while_loop(failed, retry, start)[2]
  return _cholesky(build(jax.lax.stop_gradient(jitter))), jitter


@jax.custom_jvp
def _cholesky(matrix: jax.Array) -> jax.Array:
  # Every matrix factored here is symmetric by construction, and LAPACK reads one triangle:
  # no (A + A^T) / 2 pass. Factoring A^T (the same matrix) lets XLA:CPU hand the row-major A to
  # column-major LAPACK as is, where factoring A costs a transposing d x d pass (measured: ~10% of
  # an exact-Fisher step).
  return jax.lax.linalg.cholesky(matrix.T, symmetrize_input=False)


@_cholesky.defjvp
def _cholesky_jvp(primals, tangents):
  """``dL = L Phi(L^{-1} dA L^{-T})`` (Phi: lower triangle, halved diagonal), as jax's own rule,
  except that a failed (non-finite) factor gets a zero tangent instead of NaN. A failed plain
  factor is never the result (the jittered one replaces it), but its tangent is still computed
  and transposed by reverse mode, where 0 * NaN would poison the jittered path's gradient."""
  (matrix,), (tangent,) = primals, tangents
  chol = _cholesky(matrix)
  ok = _finite_factor(chol)
  safe = jnp.where(ok, chol, jnp.eye(chol.shape[-1], dtype=chol.dtype))
  inner = jax.scipy.linalg.solve_triangular(safe, tangent, lower=True)
  inner = jax.scipy.linalg.solve_triangular(safe, inner.T, lower=True).T
  phi = jnp.tril(inner) - 0.5 * jnp.diag(jnp.diagonal(inner))
  return chol, jnp.where(ok, safe @ phi, jnp.zeros_like(chol))


def _finite_factor(chol: jax.Array) -> jax.Array:
  """Whether a Cholesky factor is finite, from its diagonal alone.

  A failed factorisation comes back as all NaN, and a non-finite entry ``L[i, j]`` enters
  ``L[i, i]`` (and through it every later diagonal entry), so the ``n`` diagonal entries decide
  what a check of all ``n^2`` entries would, at a fraction of the memory traffic.
  """
  return jnp.all(jnp.isfinite(jnp.diagonal(chol, axis1=-2, axis2=-1)))


def _cho_solve_rows(chol: jax.Array, rhs: jax.Array) -> jax.Array:
  """Solves for ``rhs`` of shape ``(d,)`` or ``(m, d)`` (one triangular pair for all columns)."""
  if rhs.ndim == 1:
    return jax.scipy.linalg.cho_solve((chol, True), rhs)
  return jax.scipy.linalg.cho_solve((chol, True), rhs.T).T


def _relative_residual(chol: jax.Array, x: jax.Array, b: jax.Array) -> jax.Array:
  """``|x L L^T - b| / |b|`` for solutions ``x`` (rows) of ``L L^T x = b``.

  The residual is taken against the computed factor, so it measures the accuracy of the
  triangular solves (growing with the factor's condition); how far ``L L^T`` is from the matrix
  shows in the jitter. Using the factor means no ``d x d`` matrix has to outlive the factorisation.
  """
  residual = jnp.einsum("...j,ij->...i", x @ chol, chol) - b
  norm = jnp.linalg.norm(b)
  return jnp.linalg.norm(residual) / jnp.maximum(norm, jnp.finfo(b.dtype).tiny)


def _scale(inv_mass: Params, v: Params) -> Params:
  return {k: inv_mass[k] * v[k] for k in v}


def _add(a: Params, b: Params, alpha=1.0) -> Params:
  return {k: a[k] + alpha * b[k] for k in a}


def _dot(a: Sequence[Params], b: Sequence[Params]) -> jax.Array:
  return sum(jnp.vdot(x, y).real for x, y in zip(jax.tree.leaves(tuple(a)),
                                                  jax.tree.leaves(tuple(b))))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


# A gradient differs from K^T e (the same sum, accumulated in another order) by a few eps times
# sqrt(terms); measured on the tests' models: below 30 eps relative. A remainder under this many
# eps is treated as that round-off.
_ROUNDOFF = 256

# Margin of the error estimate over the measured errors (see BlockFactorization.step).
_ERROR_SAFETY = 4.0

# Power iterations for lam_max of the factored matrix: each costs two triangular products
# (2 d^2), against d^3 / 3 for the factorisation.
_POWER_ITERATIONS = 8


def _largest_eigenvalue(chol: jax.Array) -> jax.Array:
  """``lam_max(L L^T)`` by power iteration on the factor (a slight under-estimate at worst)."""
  d = chol.shape[-1]
  v = jnp.cos(0.7 * jnp.arange(d, dtype=chol.dtype) + 0.3)
  v = v / jnp.linalg.norm(v)

  def iteration(_, carry):
    w = chol @ (carry[0] @ chol)
    lam = jnp.linalg.norm(w)
    return w / jnp.where(lam > 0, lam, 1), lam

  # A loop, not unrolled Python: the unrolled iterations were about a third of a layerwise
  # step's compile time (benchmarks/results/compile.md).
  # Typed like the factor (varying inside shard_map when the factor is one device's own).
  start = _mesh.vary_like((v, jnp.ones((), chol.dtype)), chol)
  return jax.lax.fori_loop(0, _POWER_ITERATIONS, iteration, start)[1]



def _smallest_eigenvalue(chol: jax.Array) -> jax.Array:
  """``lam_min(L L^T)`` by inverse iteration with the factor's triangular solves (``2 n^2`` each;
  converges from above, so the condition estimate it gives is a slight under-estimate at worst)."""
  n = chol.shape[-1]
  v = jnp.cos(0.7 * jnp.arange(n, dtype=chol.dtype) + 0.3)
  v = v / jnp.linalg.norm(v)

  def iteration(_, carry):
    w = jax.scipy.linalg.cho_solve((chol, True), carry[0])
    norm = jnp.linalg.norm(w)
    lam = 1.0 / jnp.where(norm > 0, norm, 1)
    return w * lam, lam

  # Typed like the factor (varying inside shard_map when the factor is one device's own).
  start = _mesh.vary_like((v, jnp.ones((), chol.dtype)), chol)
  return jax.lax.fori_loop(0, _POWER_ITERATIONS, iteration, start)[1]



def _split_range(factors, rhs: Sequence[Params], coordinates: jax.Array | None, eps
                 ) -> tuple[list[Params], jax.Array | None]:
  """``(r, alpha e)`` with ``g = alpha K^T e + r`` (``alpha`` by projection); a remainder below
  ``_ROUNDOFF`` eps of ``|g|`` is round-off and returned as zero. Without coordinates:
  ``(g, None)``."""
  if coordinates is None:
    return list(rhs), None
  norm = lambda tree: jnp.sqrt(sum(jnp.vdot(x, x).real for x in jax.tree.leaves(tree)))
  kte = [f.rmatvec(coordinates) for f in factors]
  alpha = _safe_div(_dot(rhs, kte), _dot(kte, kte))
  remainder = [_add(g, k, -alpha) for g, k in zip(rhs, kte)]
  keep = norm(remainder) > _ROUNDOFF * eps * norm(rhs)
  remainder = jax.tree.map(lambda r: jnp.where(keep, r, jnp.zeros_like(r)), remainder)
  return remainder, alpha * coordinates


class BlockStep(NamedTuple):
  """One block's share of an optimizer step.

  Attributes:
    direction: ``G^{-1}(g + mu D phi)`` per module.
    metric_grad_norm_sq: ``g^T G^{-1} g``.
    residual: relative residual of the small solves.
    error: estimated relative error of the direction (``eps * cond * cancellation``).
    condition: estimate of the factored matrix's condition number (``lam_max(C)`` in sample
      space, where ``C >= I``; ``lam_max(G) / min(D)`` in parameter space).
    jitter: the jitter the block's factorisation needed (0 when none).
  """

  direction: tuple[Params, ...]
  metric_grad_norm_sq: jax.Array
  residual: jax.Array
  error: jax.Array
  condition: jax.Array
  jitter: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockFactorization:
  """A factored block ``G = sum_a K_a^T K_a (block-diag over a) + D``, ready for many solves.

  Attributes:
    factors: the ``K_a`` of the block's modules.
    inv_masses: per module ``{leaf name: 1 / mass}`` (scalar or per-parameter).
    chol: plain Cholesky factor of the capacitance (sample space) or of ``G`` (parameter
      space); all NaN if the factorisation failed (see ``factored``).
    factored: whether ``chol`` is finite. When it is not (a matrix numerically indefinite in
      float32), every method recomputes its result from a factor with escalating jitter (as
      :func:`cholesky_with_jitter`), at no cost when the plain factor is fine.
    space: ``"sample"`` or ``"parameter"``.
    refinement_steps: iterative-refinement steps after each small solve, with the residual taken
      against the matrix as an operator (``t + K D^{-1} K^T t``, or ``K^T K x + D x``), never
      formed: the factorisation's round-off (and any jitter) is corrected at the cost of one
      ``K`` and one ``K^T`` product and two triangular solves per step. Once the condition
      number times the machine epsilon nears 1 refinement no longer converges (nor does the
      plain solve mean much).
  """

  factors: tuple[Factor, ...]
  inv_masses: tuple[Params, ...]
  chol: jax.Array
  factored: jax.Array
  space: str = dataclasses.field(metadata=dict(static=True))
  refinement_steps: int = dataclasses.field(default=0, metadata=dict(static=True))

  # -- parameter-space helpers: all leaves of the block as one flat vector, in a fixed order.
  def _flatten(self, vs: Sequence[Params]) -> jax.Array:
    parts = []
    for f, v in zip(self.factors, vs):
      for name, shape in ((n, f.leaf_shapes[n]) for n in f.leaf_names):
        parts.append(v[name].reshape(v[name].shape[:v[name].ndim - len(shape)] + (-1,)))
    return jnp.concatenate(parts, axis=-1)

  def _unflatten(self, flat: jax.Array) -> tuple[Params, ...]:
    out, start = [], 0
    for f in self.factors:
      module = {}
      for name in f.leaf_names:
        shape = f.leaf_shapes[name]
        size = math.prod(shape)
        module[name] = flat[..., start:start + size].reshape(flat.shape[:-1] + tuple(shape))
        start += size
      out.append(module)
    return tuple(out)

  def _with_factor(self, fn: Callable[[jax.Array], Any]) -> tuple[Any, jax.Array]:
    """``(fn(factor), jitter)``: with the plain factor (jitter 0), or with a jittered one if the
    plain one failed.

    ``fn`` runs on the plain factor unconditionally; the ``lax.cond`` only chooses between its
    (vector-sized) result and a recomputation from the factors. No ``d x d`` array enters the
    cond: on XLA:CPU a factor passed through control flow costs transposing copies (measured: a
    cond around the factor made an exact-Fisher MLP step 1.9x its factorisations, against 1.3x).
    Every call compiles its own failure branch (rebuilding the matrix, the jitter search, the
    refactorisation), so a step reads everything it needs from the factor in one call
    (:meth:`_solve_and_estimate`).
    """
    plain = fn(self.chol)

    def jittered():
      chol, jitter = self._jittered_factor()
      return fn(chol), jitter

    return jax.lax.cond(self.factored, lambda: (plain, _zero_like(self.chol)), jittered)

  @property
  def jitter(self) -> jax.Array:
    """The jitter the factorisation needed (0 when the plain factor was finite)."""
    return jax.lax.cond(self.factored, lambda: _zero_like(self.chol),
                        lambda: self._jittered_factor()[1])

  def _jittered_factor(self) -> tuple[jax.Array, jax.Array]:
    """The factor and jitter of the rebuilt matrix (failure path only). It refactors instead of
    starting from ``self.chol``, which would make the factor an operand of the cond."""
    build, _ = _block_plan(self.factors, self.inv_masses, self.space)
    return _escalate(build)

  def _operator(self, x: jax.Array) -> jax.Array:
    """The factored matrix times ``x`` rows, from the factors (for refinement)."""
    if self.space == "parameter":
      return self._flatten(self.matvec(self._unflatten(x)))
    return x + sum(f.matvec(_scale(m, f.rmatvec(x))) for f, m in zip(self.factors, self.inv_masses))

  def _solve_with(self, chol: jax.Array, rhs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Solutions for ``rhs`` rows with the factor ``chol`` and their relative residual: against
    that factor, or against the operator when refining (then it measures what refinement left)."""
    x = _cho_solve_rows(chol, rhs)
    if not self.refinement_steps:
      return x, _relative_residual(chol, x, rhs)
    for _ in range(self.refinement_steps):
      x = x + _cho_solve_rows(chol, rhs - self._operator(x))
    norm = jnp.maximum(jnp.linalg.norm(rhs), jnp.finfo(rhs.dtype).tiny)
    return x, jnp.linalg.norm(rhs - self._operator(x)) / norm

  def _cho_solve(self, rhs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Solutions for ``rhs`` rows and their relative residual (see :meth:`_solve_with`)."""
    return self._with_factor(lambda chol: self._solve_with(chol, rhs))[0]

  def _solve_and_estimate(self, rhs: jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(solutions, residual, estimate, jitter)`` for ``rhs`` rows, all from the same factor
    (one failure branch): the estimate is ``lam_max(C)`` in sample space and the condition
    estimate ``lam_max(G) / lam_min(G)`` in parameter space."""
    if self.space == "parameter":
      estimate = lambda chol: _largest_eigenvalue(chol) / _smallest_eigenvalue(chol)
    else:
      estimate = _largest_eigenvalue
    (x, residual, value), jitter = self._with_factor(
        lambda chol: (*self._solve_with(chol, rhs), estimate(chol)))
    return x, residual, value, jitter

  def solve(self, rhs: Sequence[Params]) -> tuple[tuple[Params, ...], jax.Array]:
    """``G^{-1} rhs`` per module (leaves may carry a leading batch of right-hand sides), and the
    largest relative residual of the small solves."""
    if self.space == "parameter":
      b = self._flatten(rhs)
      x, residual = self._cho_solve(b)
      return self._unflatten(x), residual
    scaled = [_scale(m, g) for m, g in zip(self.inv_masses, rhs)]
    u = sum(f.matvec(s) for f, s in zip(self.factors, scaled))
    t, residual = self._cho_solve(u)
    out = tuple(_add(s, _scale(m, f.rmatvec(t)), -1.0)
                for f, m, s in zip(self.factors, self.inv_masses, scaled))
    return out, residual

  def step(self, rhs: Sequence[Params], coordinates: jax.Array | None,
           previous: Sequence[Params] | None, momentum) -> BlockStep:
    """The optimizer's direction ``G^{-1}(g + mu D phi)`` with its diagnostics.

    Sample space, range-aware: with coordinates ``e`` of the gradient in the factor rows
    (``g ~ alpha K^T e``), the in-range part is solved by the push-through identity
    ``(K^T K + D)^{-1} K^T e = D^{-1} K^T C^{-1} e``, which has no ``1 / mass`` cancellation;
    only the remainder ``r = g - alpha K^T e`` (structurally non-zero for a sub-batch curvature,
    a prior or weight-decay term, a loss whose cotangent leaves the rows' span) goes through
    Woodbury, ``D^{-1} r - D^{-1} K^T C^{-1} K D^{-1} r``. A remainder at the round-off level of
    the gradient itself (``|r| <= tol |g|``) is dropped: solved, it would only amplify that
    round-off by ``1 / mass``. SPRING momentum (``mu``, previous direction ``phi``) adds
    ``mu G^{-1} D phi = mu (phi - D^{-1} K^T C^{-1} K phi)``. All right-hand sides share one
    factorisation and one batched pair of triangular solves.

    Args:
      rhs: the gradient per module.
      coordinates: ``e`` (``(d,)``) or ``None`` (plain Woodbury).
      previous: the previous direction per module (SPRING), or ``None``.
      momentum: SPRING ``mu`` (ignored without ``previous``).

    Returns:
      A :class:`BlockStep`.
    """
    with_momentum = previous is not None
    g_flat = jax.tree.leaves(tuple(rhs))
    dtype = g_flat[0].dtype
    eps = jnp.finfo(dtype).eps
    norm = lambda tree: jnp.sqrt(sum(jnp.vdot(x, x).real for x in jax.tree.leaves(tree)))
    if self.space == "parameter":
      carried = ([] if not with_momentum else
                 [self._flatten([{k: v[k] / m[k] for k in v}
                                 for v, m in zip(previous, self.inv_masses)])])
      b = self._flatten(rhs)
      solved, residual, condition, jitter = self._solve_and_estimate(jnp.stack([b] + carried))
      x_g = solved[0]
      direction = x_g + momentum * solved[1] if with_momentum else x_g
      g_ginv_g = jnp.vdot(b, x_g).real
      # Measured in float32 against float64 (masses 1e-1..1e-8): a Cholesky solve of G loses
      # 0.03-0.15 eps cond(G) where the error exceeds 1e-4 (0.4 at cond ~10); eps * cond keeps
      # a 6x margin where it matters without refusing float64 Gauss-Newton steps at cond 1e11.
      error = eps * condition
      return BlockStep(self._unflatten(direction), g_ginv_g, residual, error, condition, jitter)

    rows, parts = [], {}
    remainder, in_range = _split_range(self.factors, rhs, coordinates, eps)
    if in_range is not None:
      parts["range"] = len(rows)
      rows.append(in_range)
    scaled = [_scale(m, r) for m, r in zip(self.inv_masses, remainder)]
    parts["remainder"] = len(rows)
    rows.append(sum(f.matvec(s) for f, s in zip(self.factors, scaled)))
    if with_momentum:
      parts["momentum"] = len(rows)
      rows.append(sum(f.matvec(p) for f, p in zip(self.factors, previous)))
    t, residual, lam_max, jitter = self._solve_and_estimate(jnp.stack(rows))

    # The three parts, from one batched K^T product: the in-range part x_e = D^{-1} K^T t_e,
    # the remainder's Woodbury solve x_r = D^{-1} r - D^{-1} K^T t_r, and SPRING's
    # x_phi = G^{-1} D phi = phi - D^{-1} K^T t_phi.
    order = [name for name in ("range", "remainder", "momentum") if name in parts]
    signs = {"range": 1.0, "remainder": -1.0, "momentum": -1.0}
    backs = [f.rmatvec(jnp.stack([signs[n] * t[parts[n]] for n in order])) for f in self.factors]
    piece = lambda n: [{k: m[k] * back[k][order.index(n)] for k in back}
                       for m, back in zip(self.inv_masses, backs)]
    x_r = [_add(s_, b) for s_, b in zip(scaled, piece("remainder"))]
    x_e = piece("range") if "range" in parts else None
    x_g = x_r if x_e is None else [_add(a, b) for a, b in zip(x_e, x_r)]
    direction = x_g
    x_phi = None
    if with_momentum:
      x_phi = [_add(p, b) for p, b in zip(previous, piece("momentum"))]
      direction = [_add(a, b, momentum) for a, b in zip(x_g, x_phi)]
    g_ginv_g = _dot(rhs, x_g)
    # Relative error of the direction, checked on float32 against float64 over masses 1e-1..1e-8
    # (benchmarks/bench_precision.py). Woodbury: the subtraction loses 0.1-0.7 eps lam_max(C) of
    # its own size (calibrated; _ERROR_SAFETY keeps >= 6x). Push-through: the backward-error bound
    # of _pushed_error, 5x or more above every measured error.
    subtracted = norm(x_r) + (jnp.abs(momentum) * norm(x_phi) if with_momentum else 0.0)
    pushed = self._pushed_error(t[parts["range"]], lam_max) if x_e is not None else 0.0
    error = eps * _safe_div(pushed + _ERROR_SAFETY * lam_max * subtracted, norm(direction))
    return BlockStep(tuple(direction), g_ginv_g, residual, error, lam_max, jitter)

  def _pushed_error(self, t_e: jax.Array, lam_max: jax.Array) -> jax.Array:
    """Bound on ``|dx| / eps`` for the push-through step ``x = D^{-1} K^T t``, ``t = C^{-1} e``.

    A backward-stable Cholesky solve returns ``t + dt`` with ``(C + dC)(t + dt) = e``,
    ``|dC| <~ eps lam_max(C)``, so ``dt ~ -C^{-1} dC t``. In whitened variables ``M = K D^{-1/2}``
    (``C = I + M M^T``): ``D^{1/2} dx = M^T dt`` and ``|M^T C^{-1}| = max sigma / (1 + sigma^2)
    <= 1/2``, hence ``|dx| <= eps max(D^{-1/2}) lam_max(C) |t| / 2``. The ``|t| = |C^{-1} e|``
    factor grows when ``e`` leans on the rows' weak directions (a block with few parameters per
    row): there a fit ``4 eps sqrt(lam_max) |x|`` fell short (layerwise, masses 1e-3..1e-4, the
    error reaches ``11 eps sqrt(lam_max)``: benchmarks/results/precision.md). Round-off in the rows and ``e`` themselves adds ``eps sqrt(lam_max)`` times the
    same factors, smaller by ``sqrt(lam_max)``.
    """
    inv_mass_max = jnp.max(jnp.stack([jnp.max(v) for m in self.inv_masses for v in m.values()]))
    return jnp.sqrt(inv_mass_max) * lam_max * jnp.linalg.norm(t_e) / 2

  def _capacitance_max(self) -> jax.Array:
    """``lam_max(C)`` of the sample-space capacitance (for the error estimate)."""
    return self._with_factor(_largest_eigenvalue)[0]

  def matvec(self, v: Sequence[Params]) -> tuple[Params, ...]:
    """``G v`` per module (the metric itself, never formed)."""
    kv = sum(f.matvec(x) for f, x in zip(self.factors, v))
    return tuple(_add(f.rmatvec(kv), {k: x[k] / m[k] for k in x})
                 for f, m, x in zip(self.factors, self.inv_masses, v))

  def sample(self, key: jax.Array, like: Sequence[Params]) -> tuple[Params, ...]:
    """An exact draw from ``N(0, G^{-1})``: ``G^{-1}(K^T z_1 + D^{1/2} z_2)``."""
    key_rows, key_params = jax.random.split(key)
    d = self.factors[0].num_rows
    dtype = jax.tree.leaves(like)[0].dtype
    z1 = jax.random.normal(key_rows, (d,), dtype)
    leaves, treedef = jax.tree.flatten(tuple(like))
    keys = jax.random.split(key_params, len(leaves))
    z2 = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])
    rhs = tuple(_add(f.rmatvec(z1), {k: z[k] / jnp.sqrt(m[k]) for k in z})
                for f, m, z in zip(self.factors, self.inv_masses, z2))
    return self.solve(rhs)[0]

def factorize_block(factors: Sequence[Factor], inv_masses: Sequence[Params],
                    space: str = "auto", refinement_steps: int = 0,
                    axes: tuple = ()) -> BlockFactorization:
  """Factors one block of modules that share a kernel.

  Args:
    factors: the modules' ``K_a`` (all with the same rows).
    inv_masses: per module ``{leaf name: 1 / mass}``.
    space: ``"sample"`` (Woodbury, ``d x d``), ``"parameter"`` (``n x n``) or ``"auto"``
      (parameter space when the block has fewer parameters than rows).
    refinement_steps: iterative refinement of every small solve against the operator (see
      :class:`BlockFactorization`); one step recovers most of the digits an ill-conditioned
      solve loses to round-off while ``cond * eps`` stays well below 1.
    axes: mapped axes the factors' rows were gathered over (``curvature.axis_name``): inside
      the ``shard_map`` binding them, every device assembles only its samples' slab of the
      sample-space kernel and the slabs are all-gathered
      (:func:`riemod.curvature._mesh.assembled_kernel`); the factorisation stays replicated.
      ``()``: assembled in place.

  Example:
    >>> import jax.numpy as jnp
    >>> from riemod.curvature.factors import RowsFactor
    >>> f = RowsFactor({"w": jnp.ones((1, 2, 3))})          # R=1, B=2, three parameters
    >>> block = factorize_block([f], [{"w": jnp.asarray(1.0)}], space="sample")
    >>> x, _ = block.solve([{"w": jnp.ones(3)}])   # one dict per module of the block
    >>> x[0]["w"].shape
    (3,)
  """
  if space not in ("auto", "sample", "parameter"):
    raise ValueError(f"space={space!r}: use 'auto', 'sample' or 'parameter'.")
  if not isinstance(refinement_steps, int) or refinement_steps < 0:
    raise ValueError(f"refinement_steps={refinement_steps!r}: use an int >= 0 (0: none, 1 "
                     "usually suffices).")
  factors, inv_masses = tuple(factors), tuple(inv_masses)
  build, space = _block_plan(factors, inv_masses, space, axes)
  chol = _cholesky(build(0.0))
  return BlockFactorization(factors, inv_masses, chol, _finite_factor(chol), space,
                            refinement_steps)


def _block_plan(factors, inv_masses, space: str, axes: tuple = ()):
  """``(build, space)``: the solve space of a block and a function ``shift -> matrix + shift I``
  of the matrix it factors (capacitance in sample space, ``G`` in parameter space). With mapped
  ``axes`` the sample-space kernel is assembled in slabs over their devices (the failure path's
  rebuild, :meth:`BlockFactorization._jittered_factor`, passes none: no collective runs inside
  its conditional)."""
  rows = {f.num_rows for f in factors}
  if len(rows) != 1:
    raise ValueError(f"The modules of one block have different numbers of factor rows {rows}.")
  d = rows.pop()
  n = sum(f.num_params for f in factors)
  if space == "auto":
    space = "parameter" if n < d else "sample"
  if space == "parameter":
    def build(shift):
      rows = [f.rows() for f in factors]
      k = jnp.concatenate([r[name].reshape(d, -1) for f, r in zip(factors, rows)
                           for name in f.leaf_names], axis=1)
      inv_d = jnp.concatenate([jnp.broadcast_to(m[name], r[name].shape[1:]).reshape(-1)
                               for f, m, r in zip(factors, inv_masses, rows)
                               for name in f.leaf_names])
      return k.T @ k + jnp.diag(1.0 / inv_d + shift)
  else:
    def build(shift):
      kernel = _mesh.assembled_kernel(factors, inv_masses, axes)
      return (1.0 + shift) * jnp.eye(d, dtype=kernel.dtype) + kernel
  return build, space

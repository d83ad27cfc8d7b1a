"""Finding polynomial conservation laws up to a degree by the null-space method.

For a generic polynomial ``P(theta) = sum_m c_m theta^{alpha_m}`` of degree ``<= k`` the conditions
``<grad P, X_j> = 0`` (every field ``X_j`` of the flow) are linear in ``c``; evaluated at enough random
points they pin down the laws exactly (Marcotte, Gribonval & Peyre, NeurIPS 2023, arXiv 2307.00144).
In phase space (momentum flows, ICML 2024, arXiv 2405.12888) riemod searches laws of the form
``exp(s t / tau) P(theta, v)`` for each integer ``s = 0..k``; the decaying charge
``exp(t/tau)(W^T W' - W'^T W)`` is of this form with ``s = 1``.

The null space is computed in float64 with numpy (column-scaled SVD, relative tolerance); the basis is
brought to reduced row-echelon form so that the printed laws are short and readable.

Example:
  >>> import jax.numpy as jnp
  >>> from riemod.conservation import find_polynomial_laws
  >>> found = find_polynomial_laws(lambda x: jnp.prod(x)[None], 3, degree=2)
  >>> [str(law) for law in found.laws]
  ['x1^2 - x3^2', 'x2^2 - x3^2']
"""

from __future__ import annotations

import dataclasses
import fractions
import itertools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from riemod.conservation.flows import FieldFamily, gradient_fields, momentum_lift
from riemod.conservation.reparametrizations import as_reparametrization

__all__ = ["PolynomialLaw", "PolynomialLaws", "find_polynomial_laws", "monomial_exponents",
           "verify_laws"]

_MAX_MONOMIALS = 20000


def monomial_exponents(num_variables: int, degree: int) -> np.ndarray:
  """Exponent rows of all monomials of total degree ``1..degree`` (degree-major, lexicographic)."""
  rows = []
  for total in range(1, degree + 1):
    for combo in itertools.combinations_with_replacement(range(num_variables), total):
      row = np.zeros(num_variables, dtype=np.int64)
      np.add.at(row, list(combo), 1)
      rows.append(row)
  return np.asarray(rows, dtype=np.int64).reshape(-1, num_variables)


def _format_coefficient(value: float) -> str:
  fraction = fractions.Fraction(value).limit_denominator(64)
  if abs(float(fraction) - value) < 1e-9 * max(1.0, abs(value)):
    return str(fraction)
  return f"{value:.6g}"


@dataclasses.dataclass
class PolynomialLaw:
  """A conserved quantity ``exp(rate * t / tau) * sum_m c_m z^{alpha_m}``.

  Calling it evaluates the law with JAX: pass the parameter pytree (gradient flows) or the flat
  phase-space point ``(t, theta, v)`` (momentum flows).

  Attributes:
    coefficients: ``(M,)`` float64 coefficients, exponents: ``(M, n)`` exponents of the variables.
    variables: indices into the flow's coordinates ``z`` that the exponents refer to.
    variable_names: names of those variables.
    rate: ``s`` in the time factor ``exp(s t / tau)`` (0 when absent).
    time_index, tau: where time lives in ``z`` and the momentum time constant (phase space only).
    unravel: parameters -> flat coordinates, for gradient flows.
  """

  coefficients: np.ndarray
  exponents: np.ndarray
  variables: np.ndarray
  variable_names: Sequence[str]
  rate: int = 0
  time_index: Optional[int] = None
  tau: Optional[float] = None
  ravel: Any = None

  def flat_value(self, z: jax.Array) -> jax.Array:
    return _evaluate(z, self.coefficients[None, :], self.exponents, self.variables,
                     np.asarray([self.rate]), self.time_index, self.tau)[0]

  def __call__(self, params_or_point) -> jax.Array:
    if self.ravel is not None and self.time_index is None:
      leaves = jax.tree_util.tree_leaves(params_or_point)
      flat = self.ravel(params_or_point) if len(leaves) != 1 or leaves[0].ndim != 1 else leaves[0]
      return self.flat_value(flat)
    return self.flat_value(params_or_point)

  def __str__(self) -> str:
    terms = []
    for coefficient, exponent in zip(self.coefficients, self.exponents):
      if coefficient == 0:
        continue
      factors = []
      for index in np.flatnonzero(exponent):
        name = self.variable_names[index]
        factors.append(name if exponent[index] == 1 else f"{name}^{exponent[index]}")
      text = "*".join(factors)
      magnitude = _format_coefficient(abs(float(coefficient)))
      text = text if magnitude == "1" else f"{magnitude}*{text}"
      terms.append(("-" if coefficient < 0 else "+", text))
    if not terms:
      return "0"
    body = ("-" if terms[0][0] == "-" else "") + terms[0][1] + "".join(
        f" {sign} {text}" for sign, text in terms[1:])
    if self.rate:
      factor = "exp(t/tau)" if self.rate == 1 else f"exp({self.rate}*t/tau)"
      return f"{factor} * ({body})"
    return body


@dataclasses.dataclass
class PolynomialLaws:
  """Result of ``find_polynomial_laws``.

  Attributes:
    laws: the laws (reduced row-echelon basis of the solution space).
    degree: the degree searched.
    num_independent: functionally independent laws (rank of their gradients at random points).
    family: the flow's fields (used by ``check``).
    singular_gap: per searched rate, (smallest kept, largest null) scaled singular values.
  """

  laws: list
  degree: int
  num_independent: int
  family: FieldFamily
  singular_gap: dict

  def __len__(self):
    return len(self.laws)

  def __str__(self):
    return "\n".join(str(law) for law in self.laws) or "(no polynomial law)"

  def flat_function(self):
    """All laws as one JAX function of the flat coordinates ``z``."""
    if not self.laws:
      return lambda z: jnp.zeros((0,), jnp.asarray(z).dtype)
    first = self.laws[0]
    coefficients = np.stack([law.coefficients for law in self.laws])
    rates = np.asarray([law.rate for law in self.laws])
    return lambda z: _evaluate(z, coefficients, first.exponents, first.variables, rates, first.time_index,
                               first.tau)

  def as_function(self):
    """A JAX callable returning all laws as one vector (parameter pytree or phase-space point)."""
    flat = self.flat_function()
    rep = self.family.reparametrization
    if self.family.time_index is not None or rep is None:
      return flat
    return lambda params: flat(rep.ravel(params))

  def check(self, num_points: int = 3, seed: int = 1, tol: float = 1e-8) -> float:
    """Largest relative ``|<grad h, X_j>|`` over fresh random points; raises if above ``tol``."""
    if not self.laws:
      return 0.0
    return verify_laws(self.family, self.flat_function(), num_points=num_points, seed=seed, tol=tol)


def _evaluate(z, coefficients, exponents, variables, rates, time_index, tau):
  """Values of several polynomial laws sharing one monomial basis (JAX, vectorised)."""
  z = jnp.asarray(z)
  x = z[jnp.asarray(variables)]
  used = np.flatnonzero(np.any(coefficients != 0, axis=0))
  exponents = exponents[used]
  # Repeated products rather than pow: float powers of negative coordinates have NaN derivatives.
  monomials = jnp.ones(used.size, x.dtype)
  for power in range(1, int(exponents.max(initial=0)) + 1):
    monomials = monomials * jnp.prod(jnp.where(jnp.asarray(exponents >= power), x[None, :], 1.0), axis=1)
  values = jnp.asarray(coefficients[:, used], x.dtype) @ monomials
  if time_index is not None and np.any(rates):
    values = values * jnp.exp(jnp.asarray(rates, x.dtype) * z[time_index] / tau)
  return values


def verify_laws(family: FieldFamily, laws, *, num_points: int = 3, seed: int = 1, tol: float = 1e-8) -> float:
  """Checks that functions of the flat coordinates are annihilated by every field of a family.

  Args:
    family: the flow's fields; laws: ``h(z) -> (K,)`` JAX function of flat ``z`` (or a list of scalar
      functions).
    num_points, seed: random points at which to check; tol: relative tolerance.

  Returns:
    the largest ``|<grad h, X_j>| / (||grad h|| ||X_j||)`` found (float64 evaluation).

  Raises:
    AssertionError: when a law is not conserved within ``tol``.

  Example:
    >>> from riemod.conservation import factorization, gradient_fields
    >>> rep = factorization(3, 2, 2)
    >>> laws = lambda z: rep.known_laws(rep.unravel(z))
    >>> verify_laws(gradient_fields(rep), laws) < 1e-8
    True
  """
  if isinstance(laws, (list, tuple)):
    functions = list(laws)
    laws = lambda z: jnp.stack([jnp.reshape(h(z), ()) for h in functions])
  worst = 0.0
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(seed), num_points)
    fields_at = jax.jit(jax.vmap(family.field, in_axes=(None, 0)))
    jacobian = jax.jit(jax.jacrev(lambda z: jnp.atleast_1d(laws(z)).astype(jnp.float64)))
    for key in keys:
      z = family.sample_point(key)
      fields = np.asarray(fields_at(z, jnp.eye(family.num_fields)))
      gradients = np.asarray(jacobian(z))
      if not (np.all(np.isfinite(gradients)) and np.all(np.isfinite(fields))):
        raise ValueError("NaN/inf in the law gradients or fields at a random point.")
      denominator = np.linalg.norm(gradients, axis=1)[:, None] * np.linalg.norm(fields, axis=1)[None, :]
      ratio = np.abs(gradients @ fields.T) / np.maximum(denominator, 1e-300)
      worst = max(worst, float(ratio.max()))
  if worst > tol:
    raise AssertionError(f"a law is not conserved: relative |<grad h, X_j>| = {worst:.2e} > tol={tol:.1e}")
  return worst


def _monomial_gradients(x: np.ndarray, exponents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Values ``(M,)`` and gradients ``(M, n)`` of the monomials at ``x``."""
  powers = x[None, :] ** exponents
  values = np.prod(powers, axis=1)
  lowered = x[None, :] ** np.maximum(exponents - 1, 0)
  gradients = np.empty(exponents.shape)
  for index in range(exponents.shape[1]):
    others = powers.copy()
    others[:, index] = 1.0
    gradients[:, index] = exponents[:, index] * lowered[:, index] * np.prod(others, axis=1)
  return values, gradients


def _reduced_row_echelon(matrix: np.ndarray, tol: float = 1e-9) -> np.ndarray:
  matrix = matrix.copy()
  rows, cols = matrix.shape
  pivot_row = 0
  for col in range(cols):
    if pivot_row == rows:
      break
    best = pivot_row + int(np.argmax(np.abs(matrix[pivot_row:, col])))
    if abs(matrix[best, col]) < tol * max(1.0, np.abs(matrix).max()):
      continue
    matrix[[pivot_row, best]] = matrix[[best, pivot_row]]
    matrix[pivot_row] /= matrix[pivot_row, col]
    for other in range(rows):
      if other != pivot_row:
        matrix[other] -= matrix[other, col] * matrix[pivot_row]
    pivot_row += 1
  matrix[np.abs(matrix) < 1e-10] = 0.0
  return matrix[:pivot_row]


def _family_for(phi, theta_or_shapes, flow, metric, tau) -> FieldFamily:
  if isinstance(phi, FieldFamily):
    return phi
  rep, _ = as_reparametrization(phi, theta_or_shapes)
  if flow == "gradient":
    return gradient_fields(rep, metric=metric)
  if flow == "momentum":
    return momentum_lift(rep, tau=tau)
  raise ValueError(f"flow='{flow}' is unknown; use 'gradient' or 'momentum'.")


def find_polynomial_laws(phi, theta_or_shapes=None, *, degree: int = 2, flow: str = "gradient",
                         metric=None, tau: float = 1.0, seed: int = 0, rtol: float = 1e-9,
                         oversampling: float = 1.5) -> PolynomialLaws:
  """All polynomial conservation laws of degree ``<= degree`` (constants excluded).

  Args:
    phi: a ``Reparametrization``, a ``FieldFamily`` or a JAX function ``phi(theta)``.
    theta_or_shapes: parameters, their shapes, or the flat size (plain functions only).
    degree: maximal total degree ``k >= 1``.
    flow: ``"gradient"`` (with optional ``metric``) or ``"momentum"`` (laws ``exp(s t/tau) P(theta, v)``).
    metric: ``None``, ``"entropic"`` or ``metric(params, grad)``.
    tau: momentum time constant.
    seed: PRNG seed of the random sample points.
    rtol: relative singular-value tolerance of the null space (float64).
    oversampling: rows of the linear system per unknown coefficient.

  Returns:
    ``PolynomialLaws`` with readable ``laws`` (callable with JAX), ``num_independent`` and ``check()``.

  Raises:
    ValueError: ``degree < 1``, too many monomials, or bad ``phi`` / shapes.

  Example:
    >>> from riemod.conservation import factorization
    >>> len(find_polynomial_laws(factorization(3, 2, 2), degree=2))
    3
  """
  if not isinstance(degree, (int, np.integer)) or degree < 1:
    raise ValueError(f"degree={degree!r} must be an integer >= 1 (the maximal polynomial degree).")
  family = _family_for(phi, theta_or_shapes, flow, metric, tau)
  variables = np.asarray([i for i in range(family.dimension) if i != family.time_index])
  exponents = monomial_exponents(len(variables), degree)
  if exponents.shape[0] > _MAX_MONOMIALS:
    raise ValueError(f"degree={degree} on {len(variables)} variables needs {exponents.shape[0]} monomials "
                     f"(limit {_MAX_MONOMIALS}); lower the degree or use count_laws.")
  num_monomials = exponents.shape[0]
  batch_points = max(3, math.ceil(oversampling * num_monomials / max(family.num_fields, 1)) + 2)
  rates = list(range(degree + 1)) if family.time_index is not None else [0]
  names = [family.variable_names[i] for i in variables]
  rep = family.reparametrization
  ravel = rep.ravel if rep is not None else None
  fields_at = jax.jit(jax.vmap(jax.vmap(family.field, in_axes=(None, 0)), in_axes=(0, None)))

  def sample_rows(batch_index):
    with jax.enable_x64(True):
      keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), batch_index), batch_points)
      points = np.asarray(jax.vmap(family.sample_point)(keys), np.float64)
      fields = np.asarray(fields_at(jnp.asarray(points), jnp.eye(family.num_fields)), np.float64)
    if not np.all(np.isfinite(fields)):
      raise ValueError("phi (or the metric) gave NaN/inf derivatives at random points: it is not "
                       "differentiable there.")
    values, gradients = zip(*(_monomial_gradients(point[variables], exponents) for point in points))
    values, gradients = np.stack(values), np.stack(gradients)  # (S, M), (S, M, n)
    rows = {}
    for rate in rates:
      # <grad h, X_j> with h = exp(s t / tau) P: the exp factor is common to the row and dropped.
      system = np.einsum("sjn,smn->sjm", fields[:, :, variables], gradients)
      if rate:
        system = system + (rate / family.tau) * fields[:, :, family.time_index][:, :, None] * values[:, None, :]
      rows[rate] = system.reshape(-1, num_monomials)
    return points, rows

  def null_space(system):
    # Only the (M x M) triangular factor matters for the null space: QR keeps memory bounded.
    column_scale = np.linalg.norm(system, axis=0)
    column_scale[column_scale == 0] = 1.0
    reduced = np.linalg.qr(system / column_scale, mode="r")
    _, singular, right = np.linalg.svd(reduced, full_matrices=True)
    singular = np.concatenate([singular, np.zeros(num_monomials - singular.size)])
    null = singular <= rtol * singular[0]
    return null, singular, right, column_scale

  # The conditions at one point are far from independent (they are linear in a few directions), so
  # points are added in batches until a batch no longer shrinks the solution space.
  points, systems = sample_rows(0)
  nullities = {rate: int(null_space(systems[rate])[0].sum()) for rate in rates}
  for batch_index in range(1, 50):
    more_points, more_rows = sample_rows(batch_index)
    points = np.concatenate([points, more_points])
    changed = False
    for rate in rates:
      systems[rate] = np.concatenate([systems[rate], more_rows[rate]])
      nullity = int(null_space(systems[rate])[0].sum())
      changed |= nullity != nullities[rate]
      nullities[rate] = nullity
    if not changed:
      break

  laws, gaps = [], {}
  for rate in rates:
    null, singular, right, column_scale = null_space(systems[rate])
    kept = singular[~null]
    gaps[rate] = (float(kept.min() / singular[0]) if kept.size else None,
                  float(singular[null].max() / singular[0]) if null.any() else None)
    if not null.any():
      continue
    for row in _reduced_row_echelon(right[null] / column_scale):
      laws.append(PolynomialLaw(coefficients=row, exponents=exponents, variables=variables,
                                variable_names=names, rate=rate, time_index=family.time_index,
                                tau=family.tau, ravel=ravel))

  independent = 0
  if laws:
    coefficients = np.stack([law.coefficients for law in laws])
    rate_column = np.asarray([law.rate for law in laws]) / (family.tau or 1.0)
    for point in points[:3]:
      values, gradients = _monomial_gradients(point[variables], exponents)
      jacobian = coefficients @ gradients
      if family.time_index is not None:
        # d/dt of exp(s t / tau) P is (s / tau) P times the common factor.
        jacobian = np.concatenate([jacobian, (rate_column * (coefficients @ values))[:, None]], axis=1)
      independent = max(independent, int(np.linalg.matrix_rank(jacobian)))
  return PolynomialLaws(laws=laws, degree=int(degree), num_independent=independent, family=family,
                        singular_gap=gaps)

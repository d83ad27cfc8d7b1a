"""Exact sparse polynomial vector fields: the generators of linear and ReLU networks, and their brackets.

The fields whose Lie algebra counts the conservation laws of a linear network, of a ReLU network on
one activation region (path-lifting), of the mirror (NMF) flow and of the momentum lift are
polynomial. riemod stores such a field as a list of terms ``coef * z[i_1] ... z[i_k] e_comp`` (a
monomial is the multiset of its variable indices) and computes a Lie bracket ``[a, b] = Db a - Da b``
term by term. With integer coefficients (``tau = 1`` for momentum) every coefficient of every bracket
is an integer, held exactly in float64 below ``2^53``, so the brackets carry no round-off at all; only
their evaluation at a point does.

This is what lets the counting scale: a bracket of depth ``k`` evaluated by nested forward-mode
differentiation costs about ``3^k`` evaluations of the generators, while here a field kept by the
rank search is one polynomial whose value and Jacobian at the point cost one pass over its terms,
and a bracket is formed only for the candidates the rank search keeps.

Example:
  >>> import numpy as np
  >>> from riemod.conservation import factorization
  >>> from riemod.conservation.polyfields import gradient_poly_family, evaluate
  >>> family = gradient_poly_family(factorization(2, 2, 1))
  >>> family.num_fields, family.dimension
  (4, 4)
  >>> evaluate(family, np.arange(1.0, 5.0))[0]   # grad of U[0,0] V[0,0] at (1, 2, 3, 4)
  array([3., 0., 1., 0.])
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import scipy.sparse

__all__ = [
    "PolyFamily",
    "bracket",
    "brackets_at",
    "entropic_poly_family",
    "evaluate",
    "gradient_poly_family",
    "hessian_along",
    "jacobian",
    "momentum_poly_family",
    "second_derivative_terms",
    "select",
]

# Above this many terms a single bracket is formed in pieces, to bound the temporary memory.
_CHUNK_TERMS = 500_000
# Variable indices (and the padding index N) fit in int16 for the phase spaces riemod counts.
_INDEX = np.int16


class PolyFamily(NamedTuple):
  """A family of polynomial vector fields on ``R^N`` stored as sparse terms.

  Term ``t`` is ``coef[t] * prod_k z[mono[t, k]]`` in component ``comp[t]`` of field ``field[t]``;
  ``mono`` rows are sorted variable indices padded with ``N`` (the index of a constant 1).

  Attributes:
    field, comp: ``(T,)`` int64 field and component of each term.
    mono: ``(T, d)`` int16 monomials (``d`` the largest degree).
    coef: ``(T,)`` float64 coefficients.
    num_fields: number of fields.
    dimension: ``N``.
  """

  field: np.ndarray
  comp: np.ndarray
  mono: np.ndarray
  coef: np.ndarray
  num_fields: int
  dimension: int

  @property
  def num_terms(self) -> int:
    return int(self.coef.size)


def _sort_keys(field, comp, mono, dimension):
  """One int64 key per term when it fits (bit-packed), else None (then a lexicographic sort is used)."""
  bits = int(dimension).bit_length()
  fields_bits = int(max(int(field.max(initial=0)), 1)).bit_length()
  if fields_bits + bits * (mono.shape[1] + 1) > 63:
    return None
  key = field.astype(np.int64)
  for column in [comp] + [mono[:, k] for k in range(mono.shape[1])]:
    key = (key << bits) | column.astype(np.int64)
  return key


def _canonical(field, comp, mono, coef, num_fields: int, dimension: int) -> PolyFamily:
  """Sorts monomials, merges equal terms and drops exact zeros."""
  field = np.asarray(field, np.int64)
  comp = np.asarray(comp, np.int64)
  coef = np.asarray(coef, np.float64)
  mono = np.sort(np.asarray(mono, _INDEX).reshape(coef.size, -1), axis=1)
  # Trailing columns that only hold padding carry no information.
  width = int(np.max(np.sum(mono < dimension, axis=1), initial=0))
  mono = np.ascontiguousarray(mono[:, :width])
  if coef.size:
    key = _sort_keys(field, comp, mono, dimension)
    if key is not None:
      order = np.argsort(key, kind="stable")
      key = key[order]
      new = np.ones(coef.size, bool)
      new[1:] = key[1:] != key[:-1]
    else:
      order = np.lexsort([mono[:, k] for k in range(width - 1, -1, -1)] + [comp, field])
      sorted_mono, sorted_comp, sorted_field = mono[order], comp[order], field[order]
      new = np.ones(coef.size, bool)
      new[1:] = (sorted_field[1:] != sorted_field[:-1]) | (sorted_comp[1:] != sorted_comp[:-1])
      if width:
        new[1:] |= np.any(sorted_mono[1:] != sorted_mono[:-1], axis=1)
    starts = np.flatnonzero(new)
    coef = np.add.reduceat(coef[order], starts)
    picked = order[starts]
    keep = coef != 0.0
    picked, coef = picked[keep], coef[keep]
    field, comp, mono = field[picked], comp[picked], mono[picked]
  return PolyFamily(field, comp, mono, coef, int(num_fields), int(dimension))


def from_terms(field, comp, mono, coef, num_fields: int, dimension: int) -> PolyFamily:
  """Builds a family from (possibly unsorted, repeated) terms; ``mono`` padded with ``dimension``."""
  return _canonical(field, comp, mono, coef, num_fields, dimension)


def select(family: PolyFamily, indices) -> PolyFamily:
  """The sub-family of the fields ``indices`` (renumbered ``0..len-1`` in that order)."""
  indices = np.asarray(indices, np.int64)
  lookup = np.full(family.num_fields, -1, np.int64)
  lookup[indices] = np.arange(indices.size)
  keep = lookup[family.field] >= 0
  return PolyFamily(lookup[family.field[keep]], family.comp[keep], family.mono[keep], family.coef[keep],
                    int(indices.size), family.dimension)


def _monomial_values(mono: np.ndarray, z: np.ndarray) -> np.ndarray:
  extended = np.append(np.asarray(z, np.float64), 1.0)
  return np.prod(extended[mono], axis=1) if mono.shape[1] else np.ones(mono.shape[0])


def evaluate(family: PolyFamily, z) -> np.ndarray:
  """Values ``(num_fields, N)`` of the fields at ``z``."""
  n = family.dimension
  values = family.coef * _monomial_values(family.mono, z)
  flat = np.bincount(family.field * n + family.comp, weights=values, minlength=family.num_fields * n)
  return flat.reshape(family.num_fields, n)


def _jacobian_terms(family: PolyFamily, z):
  """``(row, col, weight)``: ``d (field, comp) / d z[col]`` contributions, row = field * N + comp."""
  n = family.dimension
  extended = np.append(np.asarray(z, np.float64), 1.0)
  factors = extended[family.mono]
  width = factors.shape[1]
  if width == 0:
    empty = np.zeros(0)
    return empty.astype(np.int64), empty.astype(np.int64), empty
  # Product of the other factors of each position: prefix times suffix products (no division, so
  # zero coordinates are fine).
  prefix = np.ones_like(factors)
  suffix = np.ones_like(factors)
  prefix[:, 1:] = np.cumprod(factors[:, :-1], axis=1)
  suffix[:, :-1] = np.cumprod(factors[:, :0:-1], axis=1)[:, ::-1]
  others = prefix * suffix * family.coef[:, None]
  active = family.mono < n
  rows = np.broadcast_to((family.field * n + family.comp)[:, None], family.mono.shape)[active]
  return rows, family.mono[active].astype(np.int64), others[active]


def dense_jacobian(family: PolyFamily, z) -> np.ndarray:
  """Jacobians at ``z`` as a dense ``(num_fields, N, N)`` array (for one or a few fields)."""
  rows, cols, weights = _jacobian_terms(family, z)
  n = family.dimension
  flat = np.bincount(rows * n + cols, weights=weights, minlength=family.num_fields * n * n)
  return flat.reshape(family.num_fields, n, n)


def jacobian(family: PolyFamily, z) -> scipy.sparse.csr_matrix:
  """Stacked Jacobians at ``z``: a sparse ``(num_fields * N, N)`` matrix."""
  rows, cols, weights = _jacobian_terms(family, z)
  n = family.dimension
  return scipy.sparse.csr_matrix((weights, (rows, cols)), shape=(family.num_fields * n, n))


def _hessian_terms(family: PolyFamily, z, directions, max_elements: int):
  """Pieces ``(index, weight)`` of ``hessian_along``: flat ``(k, comp, variable)`` indices, ``k`` local."""
  n = family.dimension
  count = directions.shape[0]
  width = family.mono.shape[1]
  if family.num_terms == 0 or width < 2:
    return  # degree <= 1: no second derivatives
  extended = np.append(np.asarray(z, np.float64), 1.0)
  padded = np.concatenate([directions, np.zeros((count, 1))], axis=1)
  terms = family.num_terms
  term_block = max(1, min(terms, max_elements // width))
  for t0 in range(0, terms, term_block):
    mono = family.mono[t0:t0 + term_block].astype(np.int64)
    comp, coef = family.comp[t0:t0 + term_block], family.coef[t0:t0 + term_block]
    factors = extended[mono]
    active = mono < n
    # Products of the other factors of each position, before (prefix) and after (suffix) it.
    prefix = np.ones_like(factors)
    suffix = np.ones_like(factors)
    prefix[:, 1:] = np.cumprod(factors[:, :-1], axis=1)
    suffix[:, :-1] = np.cumprod(factors[:, :0:-1], axis=1)[:, ::-1]
    block = max(1, max_elements // max(1, mono.size))
    for k0 in range(0, count, block):
      tangent = padded[k0:k0 + block][:, mono]  # (kk, T, d): the direction's entry at each factor
      kk = tangent.shape[0]
      # Forward-mode derivative of the prefix and suffix products along the direction.
      d_prefix = np.zeros_like(tangent)
      d_suffix = np.zeros_like(tangent)
      for q in range(1, width):
        d_prefix[:, :, q] = d_prefix[:, :, q - 1] * factors[:, q - 1] + prefix[:, q - 1] * tangent[:, :, q - 1]
      for q in range(width - 2, -1, -1):
        d_suffix[:, :, q] = d_suffix[:, :, q + 1] * factors[:, q + 1] + suffix[:, q + 1] * tangent[:, :, q + 1]
      weights = (d_prefix * suffix + prefix * d_suffix) * coef[:, None]
      index = (np.arange(k0, k0 + kk)[:, None, None] * n + comp[None, :, None]) * n + mono[None]
      mask = np.broadcast_to(active, weights.shape)
      yield index[mask], weights[mask]


def hessian_along(family: PolyFamily, z, directions, *, max_elements: int = 4_000_000) -> np.ndarray:
  """Second derivatives of a single field ``F`` along directions: ``(k, N, N)``.

  Entry ``[k, c, b]`` is ``sum_a d_b d_a F_c(z) v_k[a]``, the Jacobian at ``z`` of the derivative of ``F``
  along the constant vector ``v_k``. This is what the Jacobian of a bracket ``[X, F]`` needs from ``F``
  (``D[X, F] = D^2F[X] + DF DX - D^2X[F] - DX DF``), so a bracket can be evaluated with its Jacobian at a
  point without expanding its polynomial. Cost: one pass over ``F``'s terms per direction.

  Args:
    family: a family with one field (``num_fields == 1``).
    z: the point, ``(N,)``.
    directions: ``(k, N)`` or ``(N,)``.
    max_elements: bound on the temporary ``(k, terms, degree)`` arrays (processed in pieces).

  Example:
    >>> import numpy as np
    >>> from riemod.conservation.polyfields import from_terms, hessian_along
    >>> f = from_terms([0], [0], [[0, 1, 1]], [1.0], 1, 2)   # F = x y^2 e_0
    >>> hessian_along(f, np.array([1.0, 2.0]), np.array([1.0, 0.0]))[0]   # D(dF/dx) = (0, 2y)
    array([[0., 4.],
           [0., 0.]])
  """
  if family.num_fields != 1:
    raise ValueError(f"hessian_along: expected one field, got num_fields={family.num_fields}; use select().")
  n = family.dimension
  directions = np.atleast_2d(np.asarray(directions, np.float64))
  count = directions.shape[0]
  out = np.zeros(count * n * n)
  for index, weight in _hessian_terms(family, z, directions, max_elements):
    out += np.bincount(index, weights=weight, minlength=count * n * n)
  return out.reshape(count, n, n)


def second_derivative_terms(family: PolyFamily, z) -> list:
  """Per field, the second derivatives at ``z`` as sparse terms ``(row, variable, weight)``.

  ``d_variable d_b F_c(z)`` summed over the terms with ``row = c * N + b``: contracting with a vector
  ``w`` (``weight * w[variable]`` added at ``row``) gives ``D^2F(z)[w]`` flattened, for many ``w`` at the
  cost of the nonzeros only. Meant for the generators (few terms each).
  """
  n = family.dimension
  width = family.mono.shape[1]
  empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
  if width < 2 or family.num_terms == 0:
    return [empty] * family.num_fields
  extended = np.append(np.asarray(z, np.float64), 1.0)
  mono = family.mono.astype(np.int64)
  factors = extended[mono]
  fields, rows, variables, weights = [], [], [], []
  for p in range(width):
    for q in range(width):
      if p == q:
        continue
      active = (mono[:, p] < n) & (mono[:, q] < n)
      others = factors[active].copy()
      others[:, [p, q]] = 1.0
      fields.append(family.field[active])
      rows.append(family.comp[active] * n + mono[active, q])
      variables.append(mono[active, p])
      weights.append(family.coef[active] * np.prod(others, axis=1))
  fields, rows = np.concatenate(fields), np.concatenate(rows)
  variables, weights = np.concatenate(variables), np.concatenate(weights)
  order = np.argsort(fields, kind="stable")
  bounds = np.searchsorted(fields[order], np.arange(family.num_fields + 1))
  return [(rows[order[lo:hi]], variables[order[lo:hi]], weights[order[lo:hi]])
          for lo, hi in zip(bounds[:-1], bounds[1:])]


def brackets_at(fields, values, jacobians, parent: PolyFamily, z, *, parent_value=None,
                parent_jacobian=None, second_derivatives=None):
  """Values and Jacobians at ``z`` of the brackets ``[X_k, P]``, without expanding them.

  ``[X, P](z) = DP X - DX P`` and ``D[X, P](z) = D^2P[X] + DP DX - D^2X[P] - DX DP``: the Jacobian
  of a bracket needs the second derivatives of ``P`` along ``X(z)`` (one pass over ``P``'s terms for all
  ``X_k`` together, ``hessian_along``) and of each ``X_k`` along ``P(z)``, nothing of higher order.

  Args:
    fields: single-field families ``X_k``.
    values: ``(k, N)``, ``X_k(z)``.
    jacobians: ``k`` Jacobians ``DX_k(z)`` (dense or scipy.sparse ``N x N``).
    parent: the single field ``P``.
    z: the point.
    parent_value, parent_jacobian: ``P(z)`` and ``DP(z)`` if already known.
    second_derivatives: the ``second_derivative_terms`` of each ``X_k`` at ``z``, if already known.

  Yields:
    ``(value, jacobian)`` of ``[X_k, P]`` at ``z``, ``(N,)`` and dense ``(N, N)``, in the order of ``fields``.

  Example:
    >>> import numpy as np
    >>> from riemod.conservation.polyfields import bracket, brackets_at, dense_jacobian, evaluate, from_terms
    >>> x = from_terms([0], [1], [[0, 2]], [1.0], 1, 2)      # X = x^1 e_1
    >>> p = from_terms([0], [0], [[1, 1]], [1.0], 1, 2)      # P = y^2 e_0
    >>> z = np.array([2.0, 3.0])
    >>> value, jac = next(brackets_at([x], evaluate(x, z), [dense_jacobian(x, z)[0]], p, z))
    >>> exact = bracket(x, 0, p, 0)                            # [X, P] = 2 x y e_0 - y^2 e_1
    >>> bool(np.allclose(value, evaluate(exact, z)[0]) and np.allclose(jac, dense_jacobian(exact, z)[0]))
    True
  """
  z = np.asarray(z, np.float64)
  values = np.atleast_2d(np.asarray(values, np.float64))
  if parent_value is None:
    parent_value = evaluate(parent, z)[0]
  if parent_jacobian is None:
    parent_jacobian = dense_jacobian(parent, z)[0]
  along = hessian_along(parent, z, values) if values.shape[0] else np.zeros((0,) + parent_jacobian.shape)
  for k, (field, jac_x) in enumerate(zip(fields, jacobians)):
    value = parent_jacobian @ values[k] - jac_x @ parent_value
    if scipy.sparse.issparse(jac_x):
      # DP DX as (DX^T DP^T)^T: sparse times dense.
      mixed = np.asarray(jac_x.T @ parent_jacobian.T).T - np.asarray(jac_x @ parent_jacobian)
    else:
      mixed = parent_jacobian @ jac_x - jac_x @ parent_jacobian
    jacobian = along[k] + mixed
    rows, variables, weights = (second_derivatives[k] if second_derivatives is not None
                                else second_derivative_terms(field, z)[0])
    np.subtract.at(jacobian.reshape(-1), rows, weights * parent_value[variables])
    yield value, jacobian


def _derivative_along(b: PolyFamily, a: PolyFamily, b_field: int, a_field: int, sign: float):
  """Terms of ``sign * (D b_field) a_field``: differentiate each monomial of ``b`` along ``a``."""
  n = b.dimension
  b_mask = b.field == b_field
  a_mask = a.field == a_field
  b_comp, b_mono, b_coef = b.comp[b_mask], b.mono[b_mask], b.coef[b_mask]
  a_comp, a_mono, a_coef = a.comp[a_mask], a.mono[a_mask], a.coef[a_mask]
  order = np.argsort(a_comp, kind="stable")
  a_comp, a_mono, a_coef = a_comp[order], a_mono[order], a_coef[order]
  term, position = np.nonzero(b_mono < n)
  variable = b_mono[term, position]
  start = np.searchsorted(a_comp, variable, "left")
  counts = np.searchsorted(a_comp, variable, "right") - start
  keep = counts > 0
  term, position, start, counts = term[keep], position[keep], start[keep], counts[keep]
  pieces = []
  # Chunks of (term, position) pairs so that the joined arrays stay bounded.
  cumulative = np.cumsum(counts)
  bounds = [0]
  while bounds[-1] < counts.size:
    base = cumulative[bounds[-1] - 1] if bounds[-1] else 0
    stop = int(np.searchsorted(cumulative, base + _CHUNK_TERMS, "right"))
    bounds.append(max(stop, bounds[-1] + 1))
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    c = counts[lo:hi]
    total = int(c.sum())
    pair = np.repeat(np.arange(lo, hi), c)
    offsets = np.repeat(np.cumsum(c) - c, c)
    a_index = start[pair] + np.arange(total) - offsets
    reduced = b_mono[term[pair]].copy()
    reduced[np.arange(total), position[pair]] = n
    mono = np.concatenate([reduced, a_mono[a_index]], axis=1)
    # Merge each piece at once: the joined terms repeat a lot, and merging keeps memory bounded.
    merged = _canonical(np.zeros(total, np.int64), b_comp[term[pair]], mono,
                        sign * b_coef[term[pair]] * a_coef[a_index], 1, n)
    pieces.append((merged.comp, merged.mono, merged.coef))
  return pieces


def bracket(a: PolyFamily, a_field: int, b: PolyFamily, b_field: int) -> PolyFamily:
  """The single field ``[a_i, b_j] = (D b_j) a_i - (D a_i) b_j`` (exact, term by term)."""
  if a.dimension != b.dimension:
    raise ValueError(f"bracket: fields on R^{a.dimension} and R^{b.dimension}.")
  pieces = (_derivative_along(b, a, b_field, a_field, 1.0)
            + _derivative_along(a, b, a_field, b_field, -1.0))
  n = a.dimension
  if not pieces:
    return PolyFamily(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), _INDEX),
                      np.zeros(0), 1, n)
  if len(pieces) == 1 and pieces[0][2].size:
    comp, mono, coef = pieces[0]
    return PolyFamily(np.zeros(coef.size, np.int64), comp, mono, coef, 1, n)
  width = max(p[1].shape[1] for p in pieces)
  monos = [np.pad(p[1], ((0, 0), (0, width - p[1].shape[1])), constant_values=n) for p in pieces]
  comp = np.concatenate([p[0] for p in pieces])
  coef = np.concatenate([p[2] for p in pieces])
  return _canonical(np.zeros(comp.size, np.int64), comp, np.concatenate(monos), coef, 1, n)


def stack(fields) -> PolyFamily:
  """One family from single fields (field ``i`` of the result is ``fields[i]``)."""
  fields = list(fields)
  n = fields[0].dimension
  width = max((f.mono.shape[1] for f in fields), default=0)
  mono = np.concatenate([np.pad(f.mono, ((0, 0), (0, width - f.mono.shape[1])), constant_values=n)
                         for f in fields]) if fields else np.zeros((0, 0), _INDEX)
  field = np.concatenate([np.full(f.coef.size, i, np.int64) for i, f in enumerate(fields)])
  return PolyFamily(field, np.concatenate([f.comp for f in fields]), mono,
                    np.concatenate([f.coef for f in fields]), len(fields), n)


# --- generator families from a polynomial phi --------------------------------------------------------

def _gradient_terms(out, mono, coef, dimension):
  """Terms of ``grad phi_j`` from terms ``coef * mono`` of the outputs ``out`` (mono padded with D)."""
  term, position = np.nonzero(mono < dimension)
  reduced = mono[term].copy()
  reduced[np.arange(term.size), position] = dimension
  return out[term], mono[term, position].astype(np.int64), reduced, coef[term]


def _check_polynomial(polynomial, num_parameters):
  out, mono, coef, num_outputs = polynomial
  mono = np.asarray(mono, _INDEX)
  if mono.size and (mono.min() < 0 or mono.max() > num_parameters):
    raise ValueError("the polynomial of phi refers to a variable outside 0..D-1.")
  return np.asarray(out, np.int64), mono, np.asarray(coef, np.float64), int(num_outputs)


def gradient_poly_family(rep, *, entropic: bool = False) -> PolyFamily:
  """``grad phi_j`` (or ``theta * grad phi_j`` with ``entropic=True``) as polynomial fields."""
  if getattr(rep, "polynomial", None) is None:
    raise ValueError(f"'{rep.name}' has no polynomial form (Reparametrization.polynomial is None).")
  d = rep.num_parameters
  out, mono, coef, num_outputs = _check_polynomial(rep.polynomial(), d)
  field, comp, reduced, coef = _gradient_terms(out, mono, coef, d)
  if entropic:
    reduced = np.concatenate([reduced, comp[:, None].astype(_INDEX)], axis=1)
  return _canonical(field, comp, reduced, coef, num_outputs, d)


def entropic_poly_family(rep) -> PolyFamily:
  """The NMF mirror flow's fields ``theta * grad phi_j``."""
  return gradient_poly_family(rep, entropic=True)


def momentum_poly_family(rep, tau: float = 1.0) -> PolyFamily:
  """Phase-space fields ``X_0 = d/dt + v . d/dtheta - (1/tau) v . d/dv``, ``X_j = grad phi_j . d/dv``.

  Coordinates ``z = (t, theta, v)``, as ``momentum_lift``; field 0 is ``X_0``.
  """
  if getattr(rep, "polynomial", None) is None:
    raise ValueError(f"'{rep.name}' has no polynomial form (Reparametrization.polynomial is None).")
  d = rep.num_parameters
  n = 2 * d + 1
  out, mono, coef, num_outputs = _check_polynomial(rep.polynomial(), d)
  field, comp, reduced, coef = _gradient_terms(out, mono, coef, d)
  # theta_i lives at 1 + i, v_i at 1 + d + i; the padding index d becomes n.
  shifted = np.where(reduced < d, reduced + 1, n).astype(_INDEX)
  width = max(1, shifted.shape[1])
  shifted = np.pad(shifted, ((0, 0), (0, width - shifted.shape[1])), constant_values=n)
  velocity = (1 + d + np.arange(d)).astype(_INDEX)
  drift_comp = np.concatenate([[0], 1 + np.arange(d), 1 + d + np.arange(d)])
  drift_mono = np.full((2 * d + 1, width), n, _INDEX)
  drift_mono[1:1 + d, 0] = velocity
  drift_mono[1 + d:, 0] = velocity
  drift_coef = np.concatenate([[1.0], np.ones(d), np.full(d, -1.0 / float(tau))])
  return _canonical(np.concatenate([np.zeros(n, np.int64), field + 1]),
                    np.concatenate([drift_comp, comp + 1 + d]),
                    np.concatenate([drift_mono, shifted]),
                    np.concatenate([drift_coef, coef]), num_outputs + 1, n)


def polynomial_values(polynomial, theta) -> np.ndarray:
  """Evaluates a polynomial ``phi`` given as ``(out, mono, coef, num_outputs)`` at flat ``theta``."""
  out, mono, coef, num_outputs = polynomial
  values = np.asarray(coef, np.float64) * _monomial_values(np.asarray(mono, np.int64), theta)
  return np.bincount(np.asarray(out, np.int64), weights=values, minlength=int(num_outputs))


def poly_family_for(rep, flow: str, metric, tau: float) -> Optional[PolyFamily]:
  """The polynomial family of a flow when ``phi`` is polynomial and the flow keeps it so, else None."""
  if rep is None or getattr(rep, "polynomial", None) is None:
    return None
  if flow == "gradient":
    if metric is None:
      return gradient_poly_family(rep)
    if isinstance(metric, str) and metric in ("entropic", "mirror", "nmf"):
      return entropic_poly_family(rep)
    return None
  if flow == "momentum" and metric is None:
    return momentum_poly_family(rep, tau)
  return None

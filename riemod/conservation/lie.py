"""Counting conservation laws: ``N - dim Lie(W)(z)`` by numerical Lie brackets.

Marcotte, Gribonval & Peyre (NeurIPS 2023, arXiv 2307.00144): a law is annihilated by every field of
the family and by all their iterated brackets ``[a, b] = Db a - Da b``; by Frobenius the maximal number
of independent laws near a generic point ``z`` is ``N - dim Lie(W)(z)``.

Polynomial fields (linear and ReLU networks on an activation region, factorisations; gradient, mirror
and momentum flows) are bracketed exactly, term by term (``polyfields``): a kept field is one sparse
polynomial with integer coefficients, and a candidate ``[X_j, B](z) = DB(z) X_j(z) - DX_j(z) B(z)`` needs
only the value and Jacobian of ``B`` at ``z``. The cost of a bracket round is then a pass over the kept
fields' terms instead of the ``~3^k`` evaluations of nested forward-mode derivatives at depth ``k``.

Other fields (any JAX ``phi``), no computer algebra: at a random point, take an orthonormal basis of the generators'
span as constant-coefficient fields ``a_i``; each round brackets every ``a_i`` with the fields added
by the previous round (right-nested brackets ``[a_i1, [a_i2, ... a_ik]]`` span the Lie algebra),
evaluated by nested ``jax.jvp``; keep only candidates that raise the rank; stop when a round adds
nothing. Because the generic rank is locally constant, dropped candidates are smooth combinations of
kept ones, whose brackets the later rounds cover. Ranks are computed in float64 (``jax.enable_x64``
around the field evaluation, numpy SVDs) with a relative tolerance on scaled candidates, at several
random points that must agree; singular values near the tolerance raise a warning.

Example:
  >>> import jax.numpy as jnp
  >>> from riemod.conservation import count_laws
  >>> count_laws(lambda x: jnp.prod(x)[None], 3).count
  2
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse

from riemod.conservation import polyfields
from riemod.conservation.flows import FieldFamily, gradient_fields, momentum_lift
from riemod.conservation._rank import (_VANISHING, AmbiguousRankWarning, _finite_or_raise,
                                       _start_tracker)
from riemod.conservation.orbit import orbit_rank

__all__ = ["LawCount", "count_laws", "lie_rank", "AmbiguousRankWarning"]


_SCALE_FLOOR = 1e-3
# Default rtol of the orbit method (see riemod.conservation.orbit: a weak direction returns next round).
ORBIT_RTOL = 1e-3


@dataclasses.dataclass
class LawCount:
  """Result of ``count_laws``.

  Attributes:
    count: maximal number of independent conservation laws, ``dimension - lie_dimension``.
    dimension: ``N`` (``D`` parameters, or ``2D + 1`` in phase space).
    lie_dimension: ``dim Lie(W)`` at generic points (maximum over the points).
    generator_rank: ``dim W(z)`` before any bracket.
    rank_history: per point, the rank after round 0 (generators), 1, 2, ...
    points: the evaluation points (flat float64 arrays).
    smallest_kept: per point, smallest singular value accepted (scaled units).
    largest_dropped: per point, largest singular value rejected.
    ambiguous: whether any decision fell near the tolerance or the points disagreed.
    seconds: wall-clock time.
    description: what was counted.
    parameters: ``D``, the number of network parameters (``dimension`` is ``2D + 1`` in phase space).
    method: how the rank was measured: ``"orbit"``, ``"polynomial"`` (exact brackets) or ``"jvp"``.
  """

  count: int
  dimension: int
  lie_dimension: int
  generator_rank: int
  rank_history: list
  points: list
  smallest_kept: list
  largest_dropped: list
  ambiguous: bool
  seconds: float
  description: str
  parameters: int = 0
  method: str = ""

  def as_dict(self) -> dict:
    return {
        "count": self.count, "parameters": self.parameters, "dimension": self.dimension, "method": self.method,
        "lie_dimension": self.lie_dimension,
        "generator_rank": self.generator_rank, "rank_history": self.rank_history,
        "ambiguous": self.ambiguous, "seconds": self.seconds, "description": self.description,
        "smallest_kept": self.smallest_kept, "largest_dropped": self.largest_dropped,
    }


def _chain_evaluator(field, depth: int):
  """Batched evaluation of right-nested brackets ``[a_i1, [a_i2, ... [a_ik, a_ik+1]]]``.

  Returns the two terms ``Db a`` and ``Da b`` of the outermost bracket separately, because their size
  (not the size of their difference) sets the round-off level of the result.
  """

  def generator(coefficients):
    return lambda z: field(z, coefficients)

  def nested(coefficient_rows, start):
    if start == depth:
      return generator(coefficient_rows[start])
    outer, inner = generator(coefficient_rows[start]), nested(coefficient_rows, start + 1)

    def bracket(z):
      outer_z = outer(z)
      inner_z, d_inner_outer = jax.jvp(inner, (z,), (outer_z,))
      _, d_outer_inner = jax.jvp(outer, (z,), (inner_z,))
      return d_inner_outer - d_outer_inner

    return bracket

  def terms(z, coefficient_rows):
    outer, inner = generator(coefficient_rows[0]), nested(coefficient_rows, 1)
    outer_z = outer(z)
    inner_z, d_inner_outer = jax.jvp(inner, (z,), (outer_z,))
    _, d_outer_inner = jax.jvp(outer, (z,), (inner_z,))
    return d_inner_outer, d_outer_inner

  return jax.jit(jax.vmap(terms, in_axes=(None, 0)))


def _evaluate_chains(evaluator, z, basis_coefficients, chains, chunk):
  """Evaluates chains (index arrays into the generator basis) in fixed-size chunks."""
  results_first, results_second = [], []
  total = chains.shape[0]
  for start in range(0, total, chunk):
    block = chains[start:start + chunk]
    padded = np.concatenate([block, np.repeat(block[:1], chunk - block.shape[0], axis=0)])
    first, second = evaluator(z, jnp.asarray(basis_coefficients)[jnp.asarray(padded)])
    results_first.append(np.asarray(first)[:block.shape[0]])
    results_second.append(np.asarray(second)[:block.shape[0]])
  return np.concatenate(results_first), np.concatenate(results_second)


def _prefer_orbit(family: FieldFamily) -> bool:
  """Whether ``method="auto"`` measures the orbit instead of bracketing polynomials.

  Exact brackets are fast when there are many generators (few rounds of small polynomials: wide layers,
  ReLU paths); with few generators for the dimension (one or two inputs and outputs) the search needs many
  rounds and the polynomials of deep brackets grow past memory, while a pushforward chain costs ``2k``
  flow evaluations at depth ``k``. The switch, ``num_fields^2 <= dimension``, separates the two kinds in
  the benchmark table (benchmarks/results/law_counts.md).
  """
  if family.flow is None:
    return False
  return family.polynomial is None or family.num_fields ** 2 <= family.dimension


def lie_rank(family: FieldFamily, point, *, rtol: Optional[float] = None, ambiguity: float = 1e2,
             max_rounds: Optional[int] = None, chunk: int = 1024, method: str = "auto",
             max_terms: int = 20_000_000, seed: int = 0, _cache: Optional[dict] = None) -> dict:
  """``dim Lie(W)(z)`` at one point, with the rank after every bracket round.

  Args:
    family: the fields (see ``gradient_fields`` / ``momentum_lift``).
    point: flat ``z`` (converted to float64).
    rtol: singular values of the candidates, each scaled by its own round-off level, below ``rtol``
      count as zero (default ``1e-8`` for brackets, ``1e-3`` for the orbit method).
    ambiguity: singular values within a factor ``ambiguity`` of ``rtol`` flag the decision as ambiguous.
    max_rounds: bracket rounds at most (default ``dimension``, i.e. until a round adds nothing).
    chunk: candidates evaluated per vectorised batch (nested-derivative method).
    method: ``"auto"`` (the orbit method when ``family.flow`` is set and there are few generators for the
      dimension, ``num_fields^2 <= dimension``; else exact polynomial brackets when ``family.polynomial``
      is set; else nested forward-mode derivatives),
      ``"orbit"`` (``riemod.conservation.orbit``), ``"polynomial"`` or ``"jvp"``.
    seed: seed of the orbit method's random flow times.
    max_terms: exact brackets held at once, in polynomial terms (~50 bytes each), before a ``ValueError``.

  Returns:
    dict with ``rank``, ``generator_rank``, ``history``, ``smallest_kept``, ``largest_dropped``,
    ``ambiguous``, ``complete`` (False when ``max_rounds`` stopped the search early).
  """
  dimension = family.dimension
  cache = {} if _cache is None else _cache
  max_rounds = dimension if max_rounds is None else int(max_rounds)
  if method not in ("auto", "orbit", "polynomial", "jvp"):
    raise ValueError(f"method='{method}' is unknown; use 'auto', 'orbit', 'polynomial' or 'jvp'.")
  if method == "polynomial" and family.polynomial is None:
    raise ValueError("method='polynomial' needs polynomial fields (family.polynomial is None): phi must "
                     "be a built-in linear/ReLU network or factorization; use method='jvp'.")
  if method == "orbit" or (method == "auto" and _prefer_orbit(family)):
    return orbit_rank(family, point, rtol=ORBIT_RTOL if rtol is None else rtol, ambiguity=ambiguity,
                      max_rounds=max_rounds, seed=seed, _cache=cache)
  rtol = 1e-8 if rtol is None else rtol
  if method != "jvp" and family.polynomial is not None:
    return _polynomial_lie_rank(family.polynomial, point, rtol, ambiguity, max_rounds, cache,
                                max_terms=max_terms)
  with jax.enable_x64(True):
    z = jnp.asarray(point, jnp.float64)
    try:
      if "generators" not in cache:
        cache["generators"] = jax.jit(jax.vmap(family.field, in_axes=(None, 0)))
      generators = np.asarray(cache["generators"](z, jnp.eye(family.num_fields, dtype=jnp.float64)))
    except (TypeError, jax.errors.JAXTypeError) as err:
      raise ValueError(f"phi is not differentiable by JAX ({type(err).__name__}: {err}). Write phi with "
                       "jax.numpy operations, without Python control flow on parameter values.") from err
    started = _start_tracker(generators, dimension, rtol, ambiguity)
    if started is None:
      return dict(_VANISHING)
    tracker, generator_rank, left, singular, right = started
    # Constant combinations whose fields are orthonormal at z: well-conditioned generators.
    basis_coefficients = (left[:, :generator_rank] / singular[:generator_rank]).T
    tracker.basis = right[:generator_rank].T.copy()
    history = [generator_rank]
    newest = np.arange(generator_rank)[:, None]
    complete = True
    for round_index in range(1, max_rounds + 1):
      if tracker.rank >= dimension or newest.shape[0] == 0:
        break
      outer = np.repeat(np.arange(generator_rank), newest.shape[0])
      chains = np.concatenate([outer[:, None], np.tile(newest, (generator_rank, 1))], axis=1)
      if round_index == 1:
        # Antisymmetry: [a_i, a_j] = -[a_j, a_i] and [a_i, a_i] = 0.
        chains = chains[chains[:, 0] < chains[:, 1]]
      if chains.shape[0] == 0:
        history.append(tracker.rank)
        break
      if round_index not in cache:
        cache[round_index] = _chain_evaluator(family.field, round_index)
      evaluator = cache[round_index]
      # Power-of-two batch sizes keep the number of distinct compilations small.
      batch = min(chunk, 1 << int(np.ceil(np.log2(max(len(chains), 1)))))
      first, second = _evaluate_chains(evaluator, z, basis_coefficients, chains, batch)
      candidates = first - second
      _finite_or_raise(candidates, "A Lie bracket of the fields")
      scale = np.linalg.norm(first, axis=1) + np.linalg.norm(second, axis=1)
      # Both terms can vanish only up to round-off inherited from larger intermediate values, so the
      # per-candidate scale is floored relative to the round's largest one.
      scale = np.maximum(scale, _SCALE_FLOOR * scale.max())
      nonzero = scale > 0
      rows = candidates[nonzero] / scale[nonzero, None]
      kept = tracker.add(rows)
      newest = chains[np.flatnonzero(nonzero)[kept]] if kept.size else chains[:0]
      history.append(tracker.rank)
      if kept.size == 0:
        break
    else:
      complete = tracker.rank >= dimension
  return dict(rank=tracker.rank, generator_rank=generator_rank, history=history,
              smallest_kept=tracker.smallest_kept, largest_dropped=tracker.largest_dropped,
              ambiguous=tracker.near_tolerance(), complete=complete)


def _polynomial_lie_rank(poly, point, rtol: float, ambiguity: float, max_rounds: int, cache: dict,
                         chunk_values: int = 4_000_000, max_terms: int = 20_000_000) -> dict:
  """``lie_rank`` for exact polynomial fields: candidates from values and Jacobians at ``z``.

  A candidate ``[X_j, B](z) = DB(z) X_j(z) - DX_j(z) B(z)`` needs only the value and Jacobian of the
  kept field ``B`` at ``z``. For ``B = [X_i, P]`` both follow from its parent ``P``'s polynomial:
  ``B(z) = DP X_i - DX_i P`` and ``DB(z) = D^2P[X_i] + DP DX_i - D^2X_i[P] - DX_i DP`` (one pass over
  ``P``'s terms, ``polyfields.brackets_at``). So ``B``'s own polynomial (exact, integer coefficients,
  ``polyfields.bracket``) is formed only when one of its brackets is kept in turn: the largest
  polynomials, those of the last round, are never expanded. Raw generators ``X_j`` (a subset whose values
  span the generators' span at ``z``) are bracketed, not orthonormal combinations, so expanded fields stay
  sparse with integer coefficients.
  """
  dimension = poly.dimension
  z = np.asarray(point, np.float64)
  generators = polyfields.evaluate(poly, z)
  started = _start_tracker(generators, dimension, rtol, ambiguity, left_vectors=False)
  if started is None:
    return dict(_VANISHING)
  tracker, generator_rank, _, _, right = started
  tracker.basis = right[:generator_rank].T.copy()
  # Generators whose values span W(z) (pivots on their components in that span); by the constant-rank
  # argument the others are smooth combinations of them near z, so their brackets add nothing new.
  _, _, pivots = scipy.linalg.qr((generators @ tracker.basis).T, mode="economic", pivoting=True)
  chosen = np.sort(pivots[:generator_rank])
  position = {int(index): p for p, index in enumerate(chosen)}
  values = generators[chosen]
  # Generator values are sparse (a gradient of phi_j touches few parameters): DB X_j for all j at once.
  sparse_values = scipy.sparse.csr_matrix(values)
  derivatives = polyfields.jacobian(polyfields.select(poly, chosen), z)  # (count * N, N), sparse
  count = chosen.size
  generator_jacobians = [derivatives[p * dimension:(p + 1) * dimension] for p in range(count)]
  generator_polys = {int(index): polyfields.select(poly, [index]) for index in chosen}
  generator_seconds = polyfields.second_derivative_terms(polyfields.select(poly, chosen), z)

  parent_cache = {}

  def jets(block, round_index):
    """``(key, value, Jacobian)`` at z of each field of ``block``, one at a time (bounded memory)."""
    if round_index == 1:
      for key in block:
        p = position[key[0]]
        yield key, values[p], generator_jacobians[p].toarray()
      return
    groups = {}
    for key in block:
      groups.setdefault(key[1:], []).append(key)
    per_group = max(1, chunk_values // (dimension * dimension))
    for parent_key, keys in groups.items():
      parent = parents[parent_key]
      if parent_cache.get("key") != parent_key:
        parent_cache.update(key=parent_key, value=polyfields.evaluate(parent, z)[0],
                            jacobian=polyfields.dense_jacobian(parent, z)[0])
      for start in range(0, len(keys), per_group):
        part = keys[start:start + per_group]
        where = [position[key[0]] for key in part]
        yield from ((key,) + jet for key, jet in zip(part, polyfields.brackets_at(
            [generator_polys[key[0]] for key in part], values[where], [generator_jacobians[p] for p in where],
            parent, z, parent_value=parent_cache["value"], parent_jacobian=parent_cache["jacobian"],
            second_derivatives=[generator_seconds[p] for p in where])))

  newest = [(int(index),) for index in chosen]
  parents = {}  # the polynomials of the parents of ``newest`` (none in round 1: they are generators)
  history = [generator_rank]
  complete = True
  for round_index in range(1, max_rounds + 1):
    if tracker.rank >= dimension or not newest:
      break
    per_chunk = max(1, chunk_values // max(1, count * dimension))
    kept_keys = []
    # Children of one parent are evaluated together (one pass over the parent's terms).
    newest = sorted(newest, key=lambda key: key[1:])
    for start in range(0, len(newest), per_chunk):
      block = newest[start:start + per_chunk]
      firsts, seconds, labels = [], [], []
      for key, value, jac in jets(block, round_index):
        first = np.asarray(sparse_values @ jac.T)
        second = np.asarray(derivatives @ value).reshape(count, dimension)
        outer = np.arange(count)
        if round_index == 1:
          # Antisymmetry: [X_i, X_j] = -[X_j, X_i] and [X_i, X_i] = 0.
          outer = outer[chosen[outer] < key[0]]
        firsts.append(first[outer])
        seconds.append(second[outer])
        labels.extend((int(chosen[j]),) + key for j in outer)
      if not labels:
        continue
      first, second = np.concatenate(firsts), np.concatenate(seconds)
      candidates = first - second
      _finite_or_raise(candidates, "A Lie bracket of the fields")
      scale = np.linalg.norm(first, axis=1) + np.linalg.norm(second, axis=1)
      scale = np.maximum(scale, _SCALE_FLOOR * scale.max())
      # Exactly vanishing candidates (e.g. brackets of two velocity fields) cannot raise the rank.
      nonzero = np.flatnonzero((scale > 0) & np.any(candidates != 0.0, axis=1))
      kept = tracker.add(candidates[nonzero] / scale[nonzero, None])
      kept_keys.extend(labels[i] for i in nonzero[kept])
      if tracker.rank >= dimension:
        break
    history.append(tracker.rank)
    if not kept_keys or tracker.rank >= dimension:
      break
    # Expand exactly the fields whose brackets were kept: they are the next round's parents.
    needed = sorted({key[1:] for key in kept_keys})
    expanded, held = {}, 0
    for key in needed:
      expanded[key] = (generator_polys[key[0]] if len(key) == 1
                       else polyfields.bracket(poly, key[0], parents[key[1:]], 0))
      held += expanded[key].num_terms
      if held > max_terms:
        raise ValueError(
            f"count_laws: the exact brackets needed after round {round_index} hold more than "
            f"max_terms={max_terms:,} polynomial terms (rank {tracker.rank} of {dimension} so far, "
            f"{len(needed)} fields to expand). Long brackets of high-degree fields, typical of 3-4 layer "
            "linear networks with few inputs and outputs, make this count too large. Raise "
            f"max_terms if memory allows (~50 bytes a term), or pass max_rounds={round_index} for an upper "
            "bound on the count.")
    parents = expanded
    newest = kept_keys
  else:
    complete = tracker.rank >= dimension
  return dict(rank=tracker.rank, generator_rank=generator_rank, history=history,
              smallest_kept=tracker.smallest_kept, largest_dropped=tracker.largest_dropped,
              ambiguous=tracker.near_tolerance(), complete=complete)


def _as_family(phi, theta_or_shapes, flow, metric, tau) -> tuple[FieldFamily, Any]:
  if isinstance(phi, FieldFamily):
    return phi, None
  from riemod.conservation.reparametrizations import as_reparametrization  # pylint: disable=g-import-not-at-top
  rep, point = as_reparametrization(phi, theta_or_shapes)
  if flow == "mirror":
    if metric is not None:
      raise ValueError("flow='mirror' is the NMF mirror flow theta' = -theta * grad E; do not pass a metric.")
    flow, metric = "gradient", "entropic"
  if flow == "gradient":
    return gradient_fields(rep, metric=metric), (None if point is None else rep.ravel(point))
  if flow == "momentum":
    if metric is not None:
      raise ValueError("metric is only supported with flow='gradient'; for metric-aware momentum pass "
                       "momentum_lift(phi, position_rate=...) as phi.")
    lifted_point = None
    if point is not None:
      flat = rep.ravel(point)
      lifted_point = jnp.concatenate([jnp.zeros((1,), flat.dtype), flat,
                                      jax.random.normal(jax.random.PRNGKey(7), flat.shape, flat.dtype)])
    return momentum_lift(rep, tau=tau), lifted_point
  raise ValueError(f"flow='{flow}' is unknown; use 'gradient', 'mirror' or 'momentum'.")


def count_laws(phi, theta_or_shapes=None, *, flow: str = "gradient", metric=None, tau: float = 1.0,
               num_points: int = 3, seed: int = 0, rtol: Optional[float] = None, ambiguity: float = 1e2,
               max_rounds: Optional[int] = None, warn: bool = True, method: str = "auto",
               max_terms: int = 20_000_000) -> LawCount:
  """Maximal number of independent conservation laws, ``N - dim Lie(W_phi)``.

  Args:
    phi: a ``Reparametrization``, a ``FieldFamily`` or a JAX function ``phi(theta)``.
    theta_or_shapes: parameters (first evaluation point), a pytree of shapes, or the flat size.
    flow: ``"gradient"`` (optionally with ``metric``), ``"mirror"`` (NMF mirror flow
      ``theta' = -theta * grad E``, the same as ``metric="entropic"``) or ``"momentum"`` (phase-space lift).
    metric: ``None``, ``"entropic"`` or ``metric(params, grad)`` (see ``gradient_fields``).
    tau: momentum time constant (the count does not depend on it).
    num_points: random points; their ranks must agree (the maximum, the generic rank, is used).
    seed: PRNG seed of the random points.
    rtol: relative singular-value tolerance (float64 arithmetic; default ``1e-8``, ``1e-3`` for the orbit
      method, whose weak directions return in the next round).
    ambiguity: warn when a singular value lies within this factor of ``rtol``.
    max_rounds: cap on bracket rounds (default: until a round adds nothing).
    warn: emit ``AmbiguousRankWarning`` when the decision is ambiguous.
    method: ``"auto"``: the orbit method (pushforwards along the generators' closed-form flows,
      ``riemod.conservation.orbit``) when the flows are known (heavy-ball momentum) and the generators are
      few (``num_fields^2 <= dimension``: one or two inputs and outputs); exact polynomial brackets for
      other polynomial fields (built-in linear and ReLU networks, factorisations); nested forward-mode
      derivatives otherwise; ``"orbit"``, ``"polynomial"`` or ``"jvp"`` to force one.
    max_terms: memory guard of the exact brackets: a ``ValueError`` (naming ``max_rounds`` for an upper
      bound) when the fields to expand in a round exceed this many polynomial terms (~50 bytes each).

  Returns:
    ``LawCount`` (``count``, ``lie_dimension``, ``rank_history``, ``points``, ...).

  Raises:
    ValueError / TypeError: bad shapes, non-differentiable ``phi``, ``num_points < 1``, exact brackets
      larger than ``max_terms``.

  Example:
    >>> from riemod.conservation import factorization
    >>> count_laws(factorization(4, 3, 2)).count  # r (r + 1) / 2
    3
  """
  if int(num_points) < 1:
    raise ValueError(f"num_points={num_points} must be >= 1.")
  started = time.perf_counter()
  family, first_point = _as_family(phi, theta_or_shapes, flow, metric, tau)
  keys = jax.random.split(jax.random.PRNGKey(seed), num_points)
  points = []
  with jax.enable_x64(True):
    for index in range(num_points):
      if index == 0 and first_point is not None:
        point = np.asarray(first_point, np.float64)
      else:
        point = np.asarray(family.sample_point(keys[index]), np.float64)
      points.append(point)
  cache = {}
  results = [lie_rank(family, point, rtol=rtol, ambiguity=ambiguity, max_rounds=max_rounds, method=method,
                      max_terms=max_terms, seed=seed + index, _cache=cache)
             for index, point in enumerate(points)]
  ranks = [result["rank"] for result in results]
  ambiguous = any(result["ambiguous"] for result in results) or len(set(ranks)) > 1
  if warn and len(set(ranks)) > 1:
    warnings.warn(f"Lie-algebra rank differs between random points ({ranks}); using the maximum, the "
                  "generic rank. A lower rank means a non-generic point.", AmbiguousRankWarning,
                  stacklevel=2)
  elif warn and ambiguous:
    kept = min(result["smallest_kept"] for result in results)
    dropped = max(result["largest_dropped"] for result in results)
    warnings.warn(f"Rank decision is ambiguous: smallest kept singular value {kept:.2e}, largest "
                  f"dropped {dropped:.2e}, tolerance {rtol or 1e-8:.1e}. Try other points (seed) or rtol.",
                  AmbiguousRankWarning, stacklevel=2)
  if warn and not all(result["complete"] for result in results):
    warnings.warn(f"max_rounds={max_rounds} stopped the bracket search before it converged; the count "
                  "is an upper bound.", AmbiguousRankWarning, stacklevel=2)
  lie_dimension = max(ranks)
  if method == "auto":
    method = ("orbit" if _prefer_orbit(family) else "polynomial" if family.polynomial is not None else "jvp")
  return LawCount(count=family.dimension - lie_dimension, dimension=family.dimension,
                  lie_dimension=lie_dimension,
                  generator_rank=max(result["generator_rank"] for result in results),
                  rank_history=[result["history"] for result in results], points=points,
                  smallest_kept=[result["smallest_kept"] for result in results],
                  largest_dropped=[result["largest_dropped"] for result in results],
                  ambiguous=ambiguous, seconds=time.perf_counter() - started,
                  description=family.description,
                  parameters=(family.reparametrization.num_parameters if family.reparametrization is not None
                              else family.dimension),
                  method=method)

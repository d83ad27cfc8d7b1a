"""Lie-algebra rank as the dimension of an orbit: pushforwards of the generators along exact flows.

By Nagano's theorem the fields of an analytic family ``{X_j}`` and all their brackets span, at a point
``z``, exactly the tangent space of the orbit through ``z`` (the points reached by following the flows
``Phi^j_s`` one after another). When every generator's flow is known in closed form, that tangent space
can be built without forming any bracket: if ``Y`` is tangent to the orbits, so is its pushforward
``(Phi^a_s)_* Y = Y + s [X_a, Y] + s^2/2 [X_a, [X_a, Y]] + ...``, and its value at ``z`` is one Jacobian-vector
product per flow of the chain: ``((Phi^a_s)_* Y)(z) = DPhi^a_s(w) Y(w)`` with ``w = Phi^a_{-s}(z)``.

The search runs like the bracket search of ``lie.py``, with pushforwards in place of brackets. Round 0
keeps the generators whose values at ``z`` are independent; round ``k`` pushes every field kept in round
``k - 1`` forward along every generator's flow for a random time ``s`` (scaled so that the flow moves ``z``
by 10-30 % of its norm) and keeps the candidates whose values raise the rank. A chain of depth ``k`` costs
``2k`` flow evaluations, not the ``~3^k`` of nested derivatives, and no polynomial is expanded, so deep
linear networks with few inputs and outputs under momentum (many rounds of large brackets) are counted in
seconds.

Why it is complete: the search stops when no pushforward of a kept field along any generator adds a
direction. Then (constant rank near a generic ``z``) the span of the kept fields is invariant under every
generator's flow and contains the generators, so it contains the orbit's tangent space; and it is inside
it, because flows map orbits to themselves. Why it is exact to round-off: the flows are closed-form maps
and the pushforwards are JAX Jacobian-vector products in float64; no series is truncated.

Rank decisions: each candidate is divided by the largest vector norm met along its chain (its round-off
level), and a direction is kept when its singular value in the complement of the current span exceeds
``rtol`` (default ``1e-3``). The threshold is high on purpose: a kept direction with singular value
``sigma`` tilts the basis by (row error) / ``sigma``, and at ``1e-5`` that tilt (~``1e-7`` after a dozen
rounds) let a spurious direction through on 1-10-10-1 (rank 152 where the 90 known charges allow 151).
A direction present only weakly (between ``1e-3 rtol`` and ``rtol``, typically a second-order term of a
short chain) is not kept but its chain is extended: in the next round it returns at first order. The
search is certified by its last round, which keeps nothing and leaves nothing weak: ``largest_dropped``
is that round's largest singular value (round-off, ``1e-14..1e-9`` in the benchmark table),
``smallest_kept`` the smallest accepted one (``>= rtol``).

Example:
  >>> import numpy as np
  >>> from riemod.conservation import linear_network, momentum_lift
  >>> from riemod.conservation.orbit import orbit_rank
  >>> family = momentum_lift(linear_network((1, 2, 2, 1)))
  >>> z = np.concatenate([[0.5], np.random.default_rng(0).standard_normal(16)])
  >>> result = orbit_rank(family, z)
  >>> family.dimension - result["rank"]     # the two decaying charges of the hidden layers
  2
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["orbit_rank"]

# Flow times: each flow moves the point by this fraction of |z| (uniform between the two, random sign).
_TIME_RANGE = (0.1, 0.3)
# Candidates evaluated per vectorised call (a fixed size: one compilation per family).
_BATCH = 256
# Candidates handed to the rank tracker at once (bounds the temporary (rows x N) arrays).
_BLOCK_ROWS = 4096
# A candidate whose component outside the span lies between this fraction of rtol and rtol is extended
# next round without being kept; below it, it is round-off.
_WEAK = 1e-3


def _chain_evaluator(family):
  """Jitted ``(z, base, flows, times, depth) -> (value, largest norm, round trip)`` over a batch of chains.

  A chain is ``(Phi^{flows[depth-1]}_{times[depth-1]})_* ... (Phi^{flows[0]}_{times[0]})_* X_base``
  (innermost flow first). Its value at ``z``: walk back ``w = Phi_{-s}(w)`` from the outermost flow to the
  innermost, evaluate ``X_base(w)``, then push it forward flow by flow with ``jax.jvp``, which also walks
  ``w`` back to ``z`` (the distance to ``z`` at the end is returned as a round-off check).
  """
  flow = family.flow
  num_fields = family.num_fields

  def generator(z, index):
    return family.field(z, jax.nn.one_hot(index, num_fields, dtype=z.dtype))

  def chain(z, base, flows, times, depth):
    def back(i, w):
      k = depth - 1 - i
      return flow(w, flows[k], -times[k])

    w = jax.lax.fori_loop(0, depth, back, z)
    u = generator(w, base)

    def forward(i, carry):
      w, u, largest = carry
      w, u = jax.jvp(lambda y: flow(y, flows[i], times[i]), (w,), (u,))
      return w, u, jnp.maximum(largest, jnp.linalg.norm(u))

    w, u, largest = jax.lax.fori_loop(0, depth, forward, (w, u, jnp.linalg.norm(u)))
    return u, largest, jnp.max(jnp.abs(w - z))

  return jax.jit(jax.vmap(chain, in_axes=(None, 0, 0, 0, None)))


def orbit_rank(family, point, *, rtol: float = 1e-3, ambiguity: float = 1e2, max_rounds: Optional[int] = None,
               seed: int = 0, _cache: Optional[dict] = None) -> dict:
  """``dim Lie(W)(z)`` as the dimension of the orbit through ``z``, from pushforwards along exact flows.

  Args:
    family: a ``FieldFamily`` whose ``flow`` is set (closed-form flows of its generators, e.g. the
      heavy-ball ``momentum_lift``).
    point: flat ``z`` (float64).
    rtol: a direction is kept when its scaled singular value exceeds this.
    ambiguity: the decision is flagged ambiguous when the last round's largest singular value exceeds
      ``rtol / ambiguity`` (not round-off: the search may have stopped early) or a chain failed to walk
      back to ``z`` within ``1e-8`` of its norm.
    max_rounds: pushforward rounds at most (default ``dimension``).
    seed: seed of the random flow times.

  Returns:
    dict with ``rank``, ``generator_rank``, ``history`` (rank after each round), ``smallest_kept``,
    ``largest_dropped`` (of the last round), ``ambiguous``, ``complete`` (False when ``max_rounds`` stopped
    the search), as ``lie.lie_rank``.

  Raises:
    ValueError: ``family.flow`` is None, or a flow overflowed.
  """
  from riemod.conservation._rank import _RankTracker, _start_tracker, _VANISHING  # pylint: disable=g-import-not-at-top
  if family.flow is None:
    raise ValueError("orbit_rank needs closed-form flows (family.flow is None); they are known for the "
                     "heavy-ball momentum_lift without position_rate. Use method='polynomial' or 'jvp'.")
  dimension, num_fields = family.dimension, family.num_fields
  max_rounds = dimension if max_rounds is None else int(max_rounds)
  cache = {} if _cache is None else _cache
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    if "orbit" not in cache:
      cache["orbit"] = _chain_evaluator(family)
      cache["orbit_generators"] = jax.jit(jax.vmap(family.field, in_axes=(None, 0)))
    evaluate = cache["orbit"]
    z = jnp.asarray(point, jnp.float64)
    generators = np.asarray(cache["orbit_generators"](z, jnp.eye(num_fields, dtype=jnp.float64)))
    started = _start_tracker(generators, dimension, rtol, ambiguity, left_vectors=False)
    if started is None:
      return dict(_VANISHING)
    _, generator_rank, _, _, _ = started
    # Round 0 through the same tracker as the later rounds (generators scaled to unit norm).
    tracker = _RankTracker(dimension, rtol, ambiguity)
    norms = np.linalg.norm(generators, axis=1)
    alive = np.flatnonzero(norms > 0)
    kept = tracker.add(generators[alive] / norms[alive, None])
    generator_rank = tracker.rank
    # Times scaled per generator so that each flow moves z by 10-30 % of |z|.
    time_scale = np.linalg.norm(np.asarray(point, np.float64)) / np.maximum(norms, 1e-300)
    bases = alive[kept]
    flows = np.zeros((bases.size, max(max_rounds, 1)), np.int32)
    times = np.zeros((bases.size, max(max_rounds, 1)))
    history, smallest_kept = [tracker.rank], tracker.smallest_kept
    last_dropped, round_trip, last_pending = 0.0, 0.0, 0
    # Below this a candidate's component outside the span is taken as round-off.
    noise = rtol * _WEAK
    for depth in range(1, max_rounds + 1):
      if tracker.rank >= dimension or bases.size == 0:
        break
      count = bases.size * num_fields
      chain_base = np.repeat(bases, num_fields)
      chain_flows = np.repeat(flows, num_fields, axis=0)
      chain_times = np.repeat(times, num_fields, axis=0)
      along = np.tile(np.arange(num_fields), bases.size)
      sign = rng.choice([-1.0, 1.0], size=count)
      chain_flows[:, depth - 1] = along
      chain_times[:, depth - 1] = sign * rng.uniform(*_TIME_RANGE, size=count) * time_scale[along]
      tracker.largest_dropped = 0.0
      kept_rows, pending_rows, pending_size = [], [], []
      for start in range(0, count, _BLOCK_ROWS):
        block = slice(start, min(start + _BLOCK_ROWS, count))
        values, largest = [], []
        for lo in range(block.start, block.stop, _BATCH):
          hi = min(lo + _BATCH, block.stop)
          # Pad to the fixed batch size (repeating the first chain) so that one compilation serves all.
          take = np.concatenate([np.arange(lo, hi), np.full(_BATCH - (hi - lo), lo)])
          value, big, back = evaluate(z, jnp.asarray(chain_base[take]), jnp.asarray(chain_flows[take]),
                                      jnp.asarray(chain_times[take]), depth)
          values.append(np.asarray(value)[:hi - lo])
          largest.append(np.asarray(big)[:hi - lo])
          round_trip = max(round_trip, float(np.max(np.asarray(back)[:hi - lo])))
        values, largest = np.concatenate(values), np.concatenate(largest)
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(largest))):
          raise ValueError("count_laws(method='orbit'): a flow overflowed at a random point; use "
                           "method='polynomial'.")
        alive = np.flatnonzero(largest > 0)
        rows = values[alive] / largest[alive, None]
        added = tracker.add(rows)
        kept_rows.extend((block.start + alive[added]).tolist())
        if tracker.rank >= dimension:
          break
        # Candidates left with a component outside the span above round-off: not kept (below rtol), but
        # extended next round, where that component returns at first order.
        residual = np.linalg.norm(rows @ tracker.complement(), axis=1)
        weak = np.flatnonzero(residual > noise)
        pending_rows.extend((block.start + alive[weak]).tolist())
        pending_size.extend(residual[weak].tolist())
      last_dropped = tracker.largest_dropped
      smallest_kept = min(smallest_kept, tracker.smallest_kept)
      history.append(tracker.rank)
      # The strongest weak candidates, at most as many as directions are still free.
      free = dimension - tracker.rank
      order = np.argsort(pending_size)[::-1][:free]
      pending = np.setdiff1d(np.asarray(pending_rows, np.int64)[order], kept_rows)
      last_pending = pending.size
      extend = np.concatenate([np.asarray(kept_rows, np.int64), pending])
      bases, flows, times = chain_base[extend], chain_flows[extend], chain_times[extend]
  # Complete when the last round added nothing (or the span is everything), not when max_rounds cut it.
  complete = bool(bases.size == 0 or tracker.rank >= dimension)
  del last_pending
  norm = max(float(np.linalg.norm(np.asarray(point))), 1.0)
  ambiguous = bool(last_dropped > rtol / ambiguity or not complete or round_trip > 1e-8 * norm)
  return dict(rank=tracker.rank, generator_rank=generator_rank, history=history, smallest_kept=smallest_kept,
              largest_dropped=last_dropped, ambiguous=ambiguous, complete=complete, round_trip=round_trip)

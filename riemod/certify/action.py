"""The action functional and the action gap of a training run.

Continuous form (docs/method.md, section 8, the standard form; the paper's exact functional is not
known)::

    S[w] = int_0^T ( 0.5 w'^T G w' + 0.5 g^T G^{-1} g ) dt
         = int_0^T 0.5 || w' + G^{-1} g ||_G^2 dt + l(w(0)) - l(w(T))

so the action gap ``S - (l(0) - l(T))`` is non-negative and vanishes exactly on the Riemannian
gradient flow ``w' = -G^{-1} g``.

Discrete form riemod uses. A step ``w_{k+1} = w_k - eta_k G_k^{-1} g_k`` is the flow over the
time ``dt = eta_k`` with the integrand frozen at ``w_k``; both terms then equal
``0.5 g_k^T G_k^{-1} g_k``, so::

    S_K = sum_{k<K} eta_k g_k^T G_k^{-1} g_k        gap_K = S_K - (l(w_0) - l(w_K))

The optimizer state accumulates ``S_K`` (``ActionState.action``) and stores the loss
passed as ``value=`` at the first and at the latest update: ``l(w_0)`` and ``l(w_{K-1})``, the
loss *before* the latest step. From the state alone riemod therefore pairs
``S_{K-1} = S_K - eta g_{K-1}^T G_{K-1}^{-1} g_{K-1}`` with ``l(w_0) - l(w_{K-1})``; given the
loss after the latest step, it pairs ``S_K`` with ``l(w_0) - l(w_K)``. For a convex quadratic with
a fixed metric each step adds ``0.5 eta^2 g^T G^{-1} H G^{-1} g >= 0`` to the gap, so the gap is
non-negative and, at a fixed horizon ``T = K eta``, shrinks like ``O(eta)``. With minibatches the
losses come from different batches and the gap also measures the gradient noise.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610),
action principle.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from riemod.state import find_state
from riemod.transforms import ActionState


class ActionTerms(NamedTuple):
  """The action bookkeeping of a run.

  Attributes:
    action: the discrete action ``S`` paired with the loss decrease.
    loss_decrease: ``l(w_0) - l(w_end)``.
    gap: ``action - loss_decrease`` (>= 0 up to round-off and gradient noise on convex problems).
    initial_loss: ``l(w_0)``.
    final_loss: ``l(w_end)``.
    num_steps: the number of steps the pair covers.
    form: which pairing was used (``"state"`` or ``"final_loss"``).
  """

  action: float
  loss_decrease: float
  gap: float
  initial_loss: float
  final_loss: float
  num_steps: int
  form: str


def action_terms(opt_state: Any, *, learning_rate: float | None = None,
                 final_loss: float | None = None,
                 initial_loss: float | None = None) -> ActionTerms:
  """Action, loss decrease and action gap from a riemod optimizer state (searched in chains).

  Args:
    opt_state: a state holding a :class:`riemod.ActionState`; every ``update`` must have
      received ``value=loss``.
    learning_rate: the (constant) learning rate; needed without ``final_loss`` to remove the
      latest step's term.
    final_loss: the loss after the latest step; then the whole action is used.
    initial_loss: ``l(w_0)`` when it is known better than the state's record (e.g. evaluated on
      the same batch as ``final_loss``); by default the loss passed to the first update.

  Returns:
    :class:`ActionTerms` (host floats).

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> f = lambda p, x: x @ p["w"]
    >>> params, x = {"w": jnp.zeros((2, 1))}, jnp.eye(2)
    >>> loss_fn = lambda y: 0.5 * jnp.mean((y - 1.0) ** 2)
    >>> tx = riemod.layerwise_natural_gradient(0.1, mass=1.0)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   loss, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
    ...                                                   params=params)
    ...   u, state = tx.update(g, state, params, curvature=curv, value=loss)
    ...   params = {"w": params["w"] + u["w"]}
    >>> action_terms(state, learning_rate=0.1).gap >= 0
    True
  """
  state = find_state(opt_state, ActionState)
  if not isinstance(state, ActionState):
    raise ValueError("opt_state holds no riemod ActionState: pass the state of "
                     "riemod.layerwise_natural_gradient / natural_gradient (or a chain with it).")
  count = int(state.count)
  if count == 0:
    return ActionTerms(0.0, 0.0, 0.0, float("nan"), float("nan"), 0, "state")
  initial = float(state.initial_loss if initial_loss is None else initial_loss)
  last = float(state.last_loss)
  if not np.isfinite(initial) or (final_loss is None and not np.isfinite(last)):
    raise ValueError("The optimizer state has no losses: pass value=loss to every update "
                     "(tx.update(..., value=loss) or optimizer.update(model, grads, value=loss, "
                     "curvature=curvature)) to track the action gap.")
  action = float(state.action)
  if final_loss is not None:
    final = float(final_loss)
    if not np.isfinite(final):
      raise ValueError(f"final_loss={final_loss!r} is not finite.")
    return ActionTerms(action, initial - final, action - (initial - final), initial, final, count,
                       "final_loss")
  if learning_rate is None:
    raise ValueError("Without final_loss, action_terms needs learning_rate= to drop the latest "
                     "step's term (the state holds the loss before that step).")
  action = action - float(learning_rate) * float(state.metric_grad_norm_sq)
  return ActionTerms(action, initial - last, action - (initial - last), initial, last, count - 1,
                     "state")


def path_action(loss: Callable[[jax.Array], jax.Array], solve: Callable, matvec: Callable,
                path: Callable[[jax.Array], jax.Array], duration: float, *,
                num_segments: int = 64, order: int = 8) -> jax.Array:
  """``S[w]`` of a smooth path ``w(t)``, ``t`` in ``[0, duration]``, by Gauss-Legendre quadrature.

  Args:
    loss: ``w -> l(w)`` on flat parameters (its gradient is taken by autodiff).
    solve: ``(w, v) -> G(w)^{-1} v``.
    matvec: ``(w, v) -> G(w) v``.
    path: ``t -> w(t)`` (differentiated in ``t`` by a JVP).
    duration: ``T``.
    num_segments, order: composite Gauss-Legendre rule (``order`` nodes per segment).

  Returns:
    The action; ``S - (l(w(0)) - l(w(T)))`` is the path's action gap.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda w: 0.5 * jnp.sum(w ** 2)              # H = G = I: the flow is exp(-t) w0
    >>> s = path_action(loss, lambda w, v: v, lambda w, v: v,
    ...                 lambda t: jnp.exp(-t) * jnp.ones(2), 1.0)
    >>> round(float(s - (loss(jnp.ones(2)) - loss(jnp.exp(-1.0) * jnp.ones(2)))), 6)
    0.0
  """
  nodes, weights = np.polynomial.legendre.leggauss(order)
  edges = np.linspace(0.0, duration, num_segments + 1)
  mid, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * (edges[1:] - edges[:-1])
  times = (mid[:, None] + half[:, None] * nodes[None, :]).ravel()
  quad = (half[:, None] * weights[None, :]).ravel()
  dtype = jnp.result_type(path(jnp.asarray(0.0)))
  grad = jax.grad(loss)

  def integrand(t):
    w, velocity = jax.jvp(path, (t,), (jnp.ones_like(t),))
    g = grad(w)
    return 0.5 * jnp.vdot(velocity, matvec(w, velocity)) + 0.5 * jnp.vdot(g, solve(w, g))

  values = jax.vmap(integrand)(jnp.asarray(times, dtype))
  return jnp.sum(jnp.asarray(quad, dtype) * values)

"""Monitors of conserved quantities during optax training.

Gradient flow keeps its conservation laws (docs/conservation.md) exactly; a discrete gradient step
``theta - eta g`` changes a law ``h`` by ``eta^2 / 2 g^T (Hess h) g + O(eta^3)`` because
``<grad h, g> = 0`` (exactly that for quadratic ``h``), so the per-step drift scales as ``eta^2``.
Heavy-ball momentum ``theta_{k+1} = theta_k + beta (theta_k - theta_{k-1}) - eta g_k`` breaks these laws,
but for rotation-invariant models (``U V^T``) it keeps a decaying charge exactly: with ``W = [U; V]``,
``A_k = W_k^T W_{k+1} - W_{k+1}^T W_k`` obeys ``A_{k+1} = beta A_k``, the discrete form of
``exp(t / tau) (W^T W' - W'^T W)`` (Keep the Momentum, ICML 2024, arXiv 2405.12888; time step
``h = eta / (1 - beta)``, ``tau = eta / (1 - beta)^2``, ``exp(t_k / tau) = exp(k (1 - beta)) ~ beta^{-k}``).

Both monitors are optax transforms placed last in a chain: they pass updates through unchanged and
record the quantities in their state.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from riemod.conservation import factorization, drift_monitor
  >>> rep = factorization(3, 2, 2)
  >>> opt = optax.chain(optax.sgd(1e-2), drift_monitor(rep.known_laws))
  >>> params = rep.sample(0)
  >>> state = opt.init(params)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from riemod.state import find_state

__all__ = [
    "ChargeMonitorState",
    "DriftMonitorState",
    "charge_monitor",
    "drift_monitor",
    "find_state",
]

PyTree = Any


class DriftMonitorState(NamedTuple):
  """State of ``drift_monitor``.

  Attributes:
    initial: law values at the first monitored step.
    current: law values after the latest update.
    step_drift: change of the laws made by the latest update.
    max_step_drift: largest ``|step_drift|`` seen so far (scalar).
    count: number of updates monitored.
  """

  initial: jax.Array
  current: jax.Array
  step_drift: jax.Array
  max_step_drift: jax.Array
  count: jax.Array


def _law_shape(laws, params):
  out = jax.eval_shape(laws, params)
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"laws must return floating values; got {out.dtype}.")
  return out.shape, out.dtype


def drift_monitor(laws: Callable[[PyTree], jax.Array]) -> optax.GradientTransformationExtraArgs:
  """Records the drift of conserved quantities ``laws(params)`` caused by each update.

  Put it last in an ``optax.chain`` so that it sees the final updates; it needs ``params`` in
  ``update``. Updates are returned unchanged.

  Args:
    laws: ``params -> (K,)`` conserved quantities (e.g. ``Reparametrization.known_laws`` or
      ``PolynomialLaws.as_function()``).

  Returns:
    An optax transform with state ``DriftMonitorState``.

  Example:
    >>> import optax
    >>> from riemod.conservation import factorization
    >>> rep = factorization(3, 2, 2)
    >>> opt = optax.chain(optax.sgd(0.1), drift_monitor(rep.known_laws))
  """

  def init(params):
    shape, dtype = _law_shape(laws, params)
    values = jnp.asarray(laws(params))
    return DriftMonitorState(initial=values, current=values, step_drift=jnp.zeros(shape, dtype),
                             max_step_drift=jnp.zeros((), dtype), count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("drift_monitor needs params: call update(updates, state, params).")
    before = laws(params)
    after = laws(optax.apply_updates(params, updates))
    step = after - before
    initial = jnp.where(state.count == 0, before, state.initial)
    new_state = DriftMonitorState(initial=initial, current=after, step_drift=step,
                                  max_step_drift=jnp.maximum(state.max_step_drift, jnp.max(jnp.abs(step))),
                                  count=state.count + 1)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)


class ChargeMonitorState(NamedTuple):
  """State of ``charge_monitor``: ``charge = beta^{-k} (W_k^T W_{k+1} - W_{k+1}^T W_k)`` (upper triangle)."""

  charge: jax.Array
  initial: jax.Array
  count: jax.Array


def _stacked_factors(params):
  return jnp.concatenate([params["U"], params["V"]], axis=0)


def charge_monitor(beta: float, stack: Optional[Callable[[PyTree], jax.Array]] = None
                   ) -> optax.GradientTransformationExtraArgs:
  """Tracks the decaying momentum charge of heavy-ball training on a rotation-invariant model.

  Args:
    beta: the heavy-ball momentum (``optax.sgd(lr, momentum=beta)``).
    stack: ``params -> W`` (rows = all factor rows; default ``[U; V]`` of ``factorization``).

  Returns:
    An optax transform (place it last in the chain) with state ``ChargeMonitorState``; the charge is
    constant up to round-off for heavy ball on ``U V^T`` models.

  Example:
    >>> import optax
    >>> opt = optax.chain(optax.sgd(0.05, momentum=0.9), charge_monitor(0.9))
  """
  if not 0 < beta < 1:
    raise ValueError(f"beta={beta} must be in (0, 1).")
  stack = stack or _stacked_factors

  def charge(params, next_params, count):
    current, following = stack(params), stack(next_params)
    antisymmetric = current.T @ following - following.T @ current
    rows, cols = np.triu_indices(antisymmetric.shape[0], k=1)
    return antisymmetric[rows, cols] * jnp.asarray(beta, antisymmetric.dtype) ** (-count.astype(
        antisymmetric.dtype))

  def init(params):
    width = stack(params).shape[1]
    zeros = jnp.zeros((width * (width - 1) // 2,), stack(params).dtype)
    return ChargeMonitorState(charge=zeros, initial=zeros, count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("charge_monitor needs params: call update(updates, state, params).")
    value = charge(params, optax.apply_updates(params, updates), state.count)
    initial = jnp.where(state.count == 0, value, state.initial)
    return updates, ChargeMonitorState(charge=value, initial=initial, count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init, update)


"""Vector-field families of gradient, metric (non-Euclidean) and momentum flows, and ODE integrators.

A conservation law of a flow is a function annihilated by every field of a family (and hence by
their Lie brackets). The families built here (docs/conservation.md explains them):

* gradient flow ``theta' = -grad E``: fields ``grad phi_j`` (Marcotte, Gribonval & Peyre, NeurIPS 2023,
  arXiv 2307.00144);
* metric flow ``theta' = -M(theta) grad E``: fields ``M(theta) grad phi_j``; ``metric="entropic"`` is the
  NMF mirror flow ``theta' = -theta * grad E`` (Keep the Momentum, ICML 2024, arXiv 2405.12888);
* momentum flow ``tau theta'' + theta' = -grad E``, lifted to phase space ``z = (t, theta, v)`` with
  ``X_0 = d/dt + v . d/dtheta - (1/tau) v . d/dv`` and ``X_j = grad phi_j(theta) . d/dv``.

A family is linear in a coefficient vector ``c``: ``field(z, c) = sum_j c_j X_j(z)``, which lets the
counting code bracket constant-coefficient combinations of the generators.

Example:
  >>> from riemod.conservation import factorization, gradient_fields
  >>> family = gradient_fields(factorization(3, 2, 2))
  >>> family.dimension, family.num_fields
  (10, 6)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from riemod.conservation.polyfields import PolyFamily, poly_family_for
from riemod.conservation.reparametrizations import Reparametrization, as_reparametrization

__all__ = [
    "FieldFamily",
    "gradient_fields",
    "integrate_gradient_flow",
    "integrate_momentum_flow",
    "momentum_lift",
]

PyTree = Any
Metric = Union[None, str, Callable[[PyTree, PyTree], PyTree]]


class FieldFamily(NamedTuple):
  """Vector fields ``X_j`` on ``R^N`` whose common annihilators are the conservation laws.

  Attributes:
    field: ``field(z, c) -> (N,)`` equal to ``sum_j c_j X_j(z)`` (linear in ``c``).
    num_fields: number of generators ``X_j`` (length of ``c``).
    dimension: ``N``, the dimension of the space the laws live on.
    sample_point: ``key -> z``, a random generic point in the dtype of the current JAX config.
    variable_names: readable name per coordinate of ``z``.
    description: text used in reports.
    time_index: coordinate holding time ``t`` in phase space, else ``None``.
    tau: momentum time constant for phase-space families, else ``None``.
    reparametrization: the ``Reparametrization`` the fields come from.
    polynomial: the same fields as an exact sparse ``polyfields.PolyFamily`` when they are polynomial
      (linear and ReLU networks, factorisations; gradient, mirror and momentum flows), else ``None``.
      ``count_laws`` then brackets them exactly instead of by nested differentiation.
    flow: ``flow(z, j, s) -> z`` the closed-form flow of generator ``j`` for time ``s`` (traced ``j`` and
      ``s``) when known (the heavy-ball ``momentum_lift``), else ``None``; ``count_laws`` then measures the
      orbit's dimension from pushforwards along these flows (``riemod.conservation.orbit``).
  """

  field: Callable[[jax.Array, jax.Array], jax.Array]
  num_fields: int
  dimension: int
  sample_point: Callable[[jax.Array], jax.Array]
  variable_names: tuple[str, ...]
  description: str
  time_index: Optional[int] = None
  tau: Optional[float] = None
  reparametrization: Optional[Reparametrization] = None
  polynomial: Optional[PolyFamily] = None
  flow: Optional[Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = None


def _output_size(rep: Reparametrization) -> int:
  out = jax.eval_shape(rep.flat_phi, jax.ShapeDtypeStruct((rep.num_parameters,), jnp.float32))
  return out.shape[0]


def _metric_matvec(rep: Reparametrization, metric: Metric) -> Callable[[jax.Array, jax.Array], jax.Array]:
  if metric is None:
    return lambda theta, g: g
  if isinstance(metric, str):
    if metric in ("entropic", "mirror", "nmf"):
      return lambda theta, g: theta * g
    raise ValueError(f"metric='{metric}' is unknown; use None (Euclidean), 'entropic' (NMF mirror flow "
                     "theta' = -theta * grad E) or a callable metric(params, grad) -> M(params) grad.")
  if not callable(metric):
    raise TypeError(f"metric must be None, 'entropic' or a callable; got {type(metric).__name__}.")

  def matvec(theta, g):
    return rep.ravel(metric(rep.unravel(theta), rep.unravel(g)))

  return matvec


def _point_sampler(rep: Reparametrization, positive: bool):
  size = rep.num_parameters

  def sample(key):
    theta = jax.random.normal(key, (size,), jnp.result_type(float))
    return jnp.abs(theta) + 0.1 if positive else theta

  return sample


def gradient_fields(phi, theta_or_shapes=None, *, metric: Metric = None) -> FieldFamily:
  """Fields ``M(theta) grad phi_j(theta)`` of the (metric) gradient flow ``theta' = -M grad E``.

  Args:
    phi: a ``Reparametrization`` or a JAX function ``phi(theta)``.
    theta_or_shapes: parameters, their shapes, or the flat size (see ``as_reparametrization``).
    metric: ``None`` (Euclidean), ``"entropic"`` (mirror flow ``theta' = -theta * grad E``, random points
      positive) or ``metric(params, grad) -> M(params) grad`` on parameter pytrees.

  Returns:
    A ``FieldFamily`` on ``R^D``.

  Example:
    >>> import jax.numpy as jnp
    >>> family = gradient_fields(lambda x: jnp.prod(x)[None], 3)
    >>> family.num_fields
    1
  """
  rep, _ = as_reparametrization(phi, theta_or_shapes)
  matvec = _metric_matvec(rep, metric)

  def field(theta, coefficients):
    # One VJP gives sum_j c_j grad phi_j: the combination is itself the gradient of c . phi.
    _, pullback = jax.vjp(rep.flat_phi, theta)
    return matvec(theta, pullback(coefficients.astype(theta.dtype))[0])

  positive = rep.positive or (isinstance(metric, str))
  flow = "gradient flow" if metric is None else f"metric flow ({metric if isinstance(metric, str) else 'user M'})"
  return FieldFamily(field=field, num_fields=_output_size(rep), dimension=rep.num_parameters,
                     sample_point=_point_sampler(rep, positive), variable_names=rep.variable_names,
                     description=f"{flow} of {rep.name}", reparametrization=rep,
                     polynomial=poly_family_for(rep, "gradient", metric, 1.0))


def momentum_lift(phi, theta_or_shapes=None, *, tau: float = 1.0,
                  position_rate: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None) -> FieldFamily:
  """Phase-space fields of the momentum flow ``tau theta'' + theta' = -grad E``.

  Coordinates ``z = (t, theta, v)`` (``N = 2D + 1``). Generators:
  ``X_0 = d/dt + rate(theta, v) . d/dtheta - (1/tau) v . d/dv`` and ``X_j = grad phi_j . d/dv``, with
  ``rate(theta, v) = v`` for the heavy-ball flow. ``position_rate`` replaces it on flat vectors, e.g.
  ``lambda theta, p: theta * p`` for the metric-aware NMF momentum ``theta' = theta * p``.

  Example:
    >>> from riemod.conservation import factorization
    >>> family = momentum_lift(factorization(3, 2, 2), tau=0.5)
    >>> family.dimension, family.num_fields
    (21, 7)
  """
  if not tau > 0:
    raise ValueError(f"tau={tau} must be positive (the momentum time constant).")
  rep, _ = as_reparametrization(phi, theta_or_shapes)
  size = rep.num_parameters
  rate = position_rate or (lambda theta, v: v)

  def field(z, coefficients):
    theta, velocity = z[1:size + 1], z[size + 1:]
    coefficients = coefficients.astype(z.dtype)
    _, pullback = jax.vjp(rep.flat_phi, theta)
    force = pullback(coefficients[1:])[0]
    drift = coefficients[0]
    return jnp.concatenate([
        jnp.reshape(drift, (1,)),
        drift * rate(theta, velocity),
        -drift / tau * velocity + force,
    ])

  num_outputs = _output_size(rep)

  def heavy_ball_flow(z, index, s):
    # Exact flows of the generators. X_0: t + s, v e^{-s/tau}, theta + tau v (1 - e^{-s/tau});
    # X_j (j >= 1) moves only v, along grad phi_j(theta), which it leaves unchanged.
    time_now, theta, velocity = z[0], z[1:size + 1], z[size + 1:]
    decay = jnp.exp(-s / tau)
    drifted = jnp.concatenate([jnp.reshape(time_now + s, (1,)), theta - tau * velocity * jnp.expm1(-s / tau),
                               velocity * decay])
    _, pullback = jax.vjp(rep.flat_phi, theta)
    push = pullback(jax.nn.one_hot(jnp.maximum(index - 1, 0), num_outputs, dtype=z.dtype))[0]
    pushed = jnp.concatenate([z[:size + 1], velocity + s * push])
    return jnp.where(index == 0, drifted, pushed)

  positive = rep.positive or position_rate is not None
  sample_theta = _point_sampler(rep, positive)

  def sample(key):
    key_time, key_theta, key_velocity = jax.random.split(key, 3)
    dtype = jnp.result_type(float)
    return jnp.concatenate([
        jax.random.uniform(key_time, (1,), dtype),
        sample_theta(key_theta),
        jax.random.normal(key_velocity, (size,), dtype),
    ])

  names = ("t",) + rep.variable_names + tuple(f"v_{name}" for name in rep.variable_names)
  return FieldFamily(field=field, num_fields=num_outputs + 1, dimension=2 * size + 1,
                     sample_point=sample, variable_names=names,
                     description=f"momentum flow (tau={tau}) of {rep.name}", time_index=0, tau=float(tau),
                     reparametrization=rep,
                     polynomial=None if position_rate is not None else poly_family_for(rep, "momentum", None, tau),
                     flow=None if position_rate is not None else heavy_ball_flow)


def _rk4(rhs, state, dt, steps, observe):
  def one_step(carry, _):
    time, y = carry
    k1 = rhs(time, y)
    k2 = rhs(time + dt / 2, jax.tree_util.tree_map(lambda a, b: a + dt / 2 * b, y, k1))
    k3 = rhs(time + dt / 2, jax.tree_util.tree_map(lambda a, b: a + dt / 2 * b, y, k2))
    k4 = rhs(time + dt, jax.tree_util.tree_map(lambda a, b: a + dt * b, y, k3))
    y = jax.tree_util.tree_map(lambda a, b1, b2, b3, b4: a + dt / 6 * (b1 + 2 * b2 + 2 * b3 + b4),
                               y, k1, k2, k3, k4)
    time = time + dt
    return (time, y), observe(time, y)

  start = jnp.zeros((), jnp.result_type(float))
  first = observe(start, state)
  (_, final), observed = jax.lax.scan(one_step, (start, state), None, length=steps)
  observed = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, observed)
  return final, observed


def integrate_gradient_flow(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, *, time: float,
                            steps: int, metric: Optional[Callable[[PyTree, PyTree], PyTree]] = None,
                            observe: Optional[Callable[[PyTree], Any]] = None):
  """Classical RK4 integration of ``theta' = -M(theta) grad loss(theta)``.

  Accurate (error ``O(dt^4)``), so conserved quantities stay constant to near machine precision in
  float64: the reference against which discrete optimisers' drift is measured.

  Args:
    loss_fn: scalar loss of the parameter pytree.
    params: initial parameters.
    time: final time ``T``; steps: number of RK4 steps (``dt = T / steps``).
    metric: optional ``metric(params, grad) -> M grad``; ``"entropic"`` gives ``theta * grad``.
    observe: ``observe(params) -> pytree`` recorded at every step (default: the parameters).

  Returns:
    ``(final_params, observations)`` with a leading axis of length ``steps + 1``.

  Example:
    >>> import jax.numpy as jnp
    >>> final, _ = integrate_gradient_flow(lambda w: 0.5 * jnp.sum(w ** 2), jnp.ones(2), time=1.0, steps=10)
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  if metric == "entropic":
    metric = lambda theta, g: jax.tree_util.tree_map(jnp.multiply, theta, g)
  grad = jax.grad(loss_fn)

  def rhs(_, theta):
    g = grad(theta)
    g = metric(theta, g) if metric is not None else g
    return jax.tree_util.tree_map(jnp.negative, g)

  observe_fn = (lambda t, y: observe(y)) if observe is not None else (lambda t, y: y)
  return jax.jit(lambda y: _rk4(rhs, y, time / steps, steps, observe_fn))(params)


def integrate_momentum_flow(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, velocity=None, *,
                            tau: float, time: float, steps: int,
                            observe: Optional[Callable[[jax.Array, PyTree, PyTree], Any]] = None):
  """RK4 integration of ``tau theta'' + theta' = -grad loss`` as ``theta' = v``, ``tau v' = -v - grad``.

  Args:
    loss_fn: scalar loss of the parameter pytree.
    params, velocity: initial state (velocity defaults to zero).
    tau: momentum time constant; time, steps: horizon and number of RK4 steps.
    observe: ``observe(t, params, velocity) -> pytree`` recorded at every step.

  Returns:
    ``((final_params, final_velocity), observations)``.

  Example:
    >>> import jax.numpy as jnp
    >>> (w, v), _ = integrate_momentum_flow(lambda w: jnp.sum(w ** 2), jnp.ones(2), tau=0.5,
    ...                                     time=1.0, steps=10)
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  if not tau > 0:
    raise ValueError(f"tau={tau} must be positive.")
  if velocity is None:
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
  grad = jax.grad(loss_fn)

  def rhs(_, state):
    theta, v = state
    g = grad(theta)
    return v, jax.tree_util.tree_map(lambda vi, gi: -(vi + gi) / tau, v, g)

  observe_fn = ((lambda t, y: observe(t, y[0], y[1])) if observe is not None else (lambda t, y: y))
  return jax.jit(lambda y: _rk4(rhs, y, time / steps, steps, observe_fn))((params, velocity))

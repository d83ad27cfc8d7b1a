"""Heavy-ball / Hamiltonian optax transform with computational-inertia tracking.

Second-order learning dynamics (Karagoz, *Computational Inertia as a Conserved Quantity in
Frictionless and Damped Learning Dynamics*; see docs/conservation.md)::

    theta' = v,   M v' = -grad L - gamma v + sigma xi(t)

with inertia ``H = 0.5 v^T M v + L``. Predictions checked by the tests:

* frictionless: ``H`` constant; the leapfrog (kick-drift-kick) integrator used here is symplectic, so
  the measured ``H`` oscillates by ``O(dt^2)`` without drift;
* damped: ``H(t) + gamma int_0^t ||v||^2`` constant (``dissipated`` in the state is that integral);
* noisy: at stationarity ``E||v||^2 = sigma^2 tr(M^{-1}) / (2 gamma)``.

The mass ``M`` is any symmetric positive-definite linear operator on the parameter pytree, given by
``matvec`` and ``solve`` callables (``identity_mass``, ``diagonal_mass`` built in; ``operator_mass`` for
the layerwise Riemannian metric of ``riemod.composer``, giving a Riemannian heavy ball).

One step is a symmetric (Strang) splitting, friction-kick-drift-kick-friction ("OBABO"), with
momentum ``p = M v``, gradient ``g_k`` at ``theta_k`` and time step ``dt``::

    p_k        = O_{dt/2}(p_{k-1/2} - dt/2 g_k)      (finish the previous step; p_0 = 0)
    record       H_k = 0.5 p_k^T M^{-1} p_k + L_k       (p_k is the momentum at t_k = k dt)
    p_{k+1/2}  = O_{dt/2}(p_k) - dt/2 g_k
    theta_{k+1} = theta_k + dt M^{-1} p_{k+1/2}

where ``O_s`` is the friction/noise flow over a time ``s`` (exact Ornstein-Uhlenbeck for identity and
diagonal masses; midpoint friction plus Euler-Maruyama noise for general operators). Because the
splitting is symmetric, the recorded ``H_k`` is the exact ``H(t_k)`` up to ``O(dt^2)``, damped or not.
(Applying the whole step's friction at ``t_k`` instead, before the kick, records the energy of
``t_k - dt/2``: a first-order offset, about ``gamma dt ||v||^2 / 2``.)

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from riemod.conservation import heavy_ball
  >>> opt = heavy_ball(0.1)
  >>> params = jnp.ones(3)
  >>> state = opt.init(params)
  >>> loss = lambda w: 0.5 * jnp.sum(w ** 2)
  >>> updates, state = opt.update(jax.grad(loss)(params), state, params, value=loss(params))
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from riemod._util import gaussian_like

__all__ = [
    "HeavyBallState",
    "Mass",
    "diagonal_mass",
    "heavy_ball",
    "identity_mass",
    "operator_mass",
    "scale_by_heavy_ball",
    "stationary_velocity_sq",
]

PyTree = Any
_tmap = jax.tree_util.tree_map


class Mass(NamedTuple):
  """A symmetric positive-definite mass operator on parameter pytrees.

  Attributes:
    matvec: ``v -> M v``.
    solve: ``p -> M^{-1} p``.
    sample: optional ``(key, like) -> N(0, M)`` draw (thermal initial momenta).
    ou_step: optional exact friction/noise step ``(p, key, dt, gamma, sigma) -> p``.
    trace_inverse: optional ``like -> tr(M^{-1})`` (for the stationary prediction).
    name: description.
  """

  matvec: Callable[[PyTree], PyTree]
  solve: Callable[[PyTree], PyTree]
  sample: Optional[Callable[[jax.Array, PyTree], PyTree]] = None
  ou_step: Optional[Callable[..., PyTree]] = None
  trace_inverse: Optional[Callable[[PyTree], jax.Array]] = None
  name: str = "operator"


_normal_like = gaussian_like


def _diagonal_ou(masses_like: Callable[[PyTree], PyTree]):
  def step(momentum, key, dt, gamma, sigma):
    noise = _normal_like(key, momentum)

    def leaf(p, m, xi):
      if gamma > 0:
        decay = jnp.exp(-gamma * dt / m)
        # Exact Ornstein-Uhlenbeck step of dp = -gamma m^{-1} p dt + sigma dW.
        spread = sigma * jnp.sqrt(m * (1.0 - decay ** 2) / (2.0 * gamma))
        return decay * p + spread * xi
      return p + sigma * math.sqrt(dt) * xi

    return _tmap(leaf, momentum, masses_like(momentum), noise)

  return step


def identity_mass(scale: float = 1.0) -> Mass:
  """``M = scale * I``.

  Example:
    >>> identity_mass(2.0).solve(jnp.ones(2))
    Array([0.5, 0.5], dtype=float32)
  """
  if not scale > 0:
    raise ValueError(f"scale={scale} must be positive.")
  masses = lambda like: _tmap(lambda x: jnp.full(jnp.shape(x), scale, jnp.result_type(x)), like)
  return Mass(
      matvec=lambda v: _tmap(lambda x: scale * x, v),
      solve=lambda p: _tmap(lambda x: x / scale, p),
      sample=lambda key, like: _tmap(lambda x: math.sqrt(scale) * x, _normal_like(key, like)),
      ou_step=_diagonal_ou(masses),
      trace_inverse=lambda like: sum(x.size for x in jax.tree_util.tree_leaves(like)) / scale,
      name=f"identity (scale {scale})")


def diagonal_mass(diagonal: PyTree) -> Mass:
  """``M = diag(diagonal)`` (a pytree of positive entries shaped like the parameters).

  Example:
    >>> diagonal_mass(jnp.array([1.0, 4.0])).solve(jnp.ones(2))
    Array([1.  , 0.25], dtype=float32)
  """
  for leaf in jax.tree_util.tree_leaves(diagonal):
    if not bool(jnp.all(jnp.asarray(leaf) > 0)):
      raise ValueError("diagonal_mass: every entry of diagonal must be positive.")
  return Mass(
      matvec=lambda v: _tmap(jnp.multiply, diagonal, v),
      solve=lambda p: _tmap(lambda m, x: x / m, diagonal, p),
      sample=lambda key, like: _tmap(lambda m, x: jnp.sqrt(m) * x, diagonal, _normal_like(key, like)),
      ou_step=_diagonal_ou(lambda like: diagonal),
      trace_inverse=lambda like: sum(jnp.sum(1.0 / m) for m in jax.tree_util.tree_leaves(diagonal)),
      name="diagonal")


def operator_mass(operator=None, *, matvec=None, solve=None, sample=None) -> Mass:
  """A general mass: an object with ``matvec``/``solve`` (and optionally ``sample(key, like)``)
  methods, such as ``riemod.composer.ComposedMetric`` (layerwise Riemannian metric), or the
  callables themselves.

  With the layerwise metric ``G = K^T K + D`` as mass this is the Riemannian heavy ball.

  Example:
    >>> mass = operator_mass(matvec=lambda v: 2.0 * v, solve=lambda p: p / 2.0)
  """
  if operator is not None:
    matvec = matvec or getattr(operator, "matvec", None)
    solve = solve or getattr(operator, "solve", None)
    sample = sample or getattr(operator, "sample", None)
  if not (callable(matvec) and callable(solve)):
    raise TypeError("operator_mass needs matvec and solve callables (or an operator object with "
                    "matvec/solve methods, e.g. riemod.composer.ComposedMetric).")
  return Mass(matvec=matvec, solve=solve, sample=sample, name=type(operator).__name__ if operator else "operator")


class HeavyBallState(NamedTuple):
  """State of ``scale_by_heavy_ball``.

  Attributes:
    momentum: half-step momentum ``p_{k-1/2}`` (``p = M v``).
    count: steps taken.
    kinetic: ``0.5 p_k^T M^{-1} p_k`` at the latest step (synchronised momentum).
    inertia: ``H_k = kinetic + L_k`` (``L_k`` from the ``value`` extra argument; 0 if not given).
    velocity_sq: ``||v_k||^2``.
    dissipated: ``gamma int_0^{t_k} ||v||^2 ds`` (trapezoid over each friction half-step).
    dissipation_total: the same integral including the friction half-step taken after ``t_k``.
    key: PRNG key of the momentum noise.
  """

  momentum: PyTree
  count: jax.Array
  kinetic: jax.Array
  inertia: jax.Array
  velocity_sq: jax.Array
  dissipated: jax.Array
  dissipation_total: jax.Array
  key: jax.Array


def _dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def scale_by_heavy_ball(time_step: float, friction: float = 0.0, noise: float = 0.0,
                        mass: Optional[Mass] = None, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Core heavy-ball / Hamiltonian transform (leapfrog with friction and momentum noise).

  Returns ``-M^{-1} p_{k+1/2}`` (a gradient-like direction): chain with ``optax.scale(-time_step)`` to
  move by ``dt M^{-1} p``, as ``heavy_ball`` does. Pass the loss as ``value=`` to ``update`` to track the
  inertia ``H``.

  Args:
    time_step: ``dt`` of the dynamics (float).
    friction: ``gamma >= 0``; noise: ``sigma >= 0`` (white noise on the momentum, Ito).
    mass: a ``Mass`` (default ``identity_mass()``).
    seed: PRNG seed of the noise.

  Example:
    >>> import optax
    >>> opt = optax.chain(scale_by_heavy_ball(0.1, friction=0.5), optax.scale(-0.1))
  """
  if not time_step > 0:
    raise ValueError(f"time_step={time_step} must be positive.")
  if friction < 0 or noise < 0:
    raise ValueError(f"friction={friction} and noise={noise} must be >= 0.")
  mass = mass or identity_mass()
  dt, gamma, sigma = float(time_step), float(friction), float(noise)

  def init(params):
    dtype = jnp.result_type(*[x.dtype for x in jax.tree_util.tree_leaves(params)])
    zero = jnp.zeros((), dtype)
    return HeavyBallState(momentum=_tmap(jnp.zeros_like, params), count=jnp.zeros((), jnp.int32),
                          kinetic=zero, inertia=zero, velocity_sq=zero, dissipated=zero, dissipation_total=zero,
                          key=jax.random.PRNGKey(seed))

  def friction_step(momentum, key, span):
    """The friction/noise flow over ``span`` (half a time step)."""
    if gamma == 0 and sigma == 0:
      return momentum
    if mass.ou_step is not None:
      return mass.ou_step(momentum, key, span, gamma, sigma)
    # Second-order (midpoint) friction for a general operator: exp(-gamma s M^{-1}) p to O(s^3)
    # with two solves; the noise enters as in Euler-Maruyama.
    midpoint = _tmap(lambda p, v: p - 0.5 * gamma * span * v, momentum, mass.solve(momentum))
    drag = mass.solve(midpoint)
    kick = _normal_like(key, momentum)
    return _tmap(lambda p, v, xi: p - gamma * span * v + sigma * math.sqrt(span) * xi, momentum, drag, kick)

  def damp(momentum, key, dissipation):
    """A friction half-step and its dissipated energy (trapezoid rule for gamma int ||v||^2)."""
    before = mass.solve(momentum)
    after_momentum = friction_step(momentum, key, 0.5 * dt)
    after = mass.solve(after_momentum)
    increment = gamma * 0.5 * dt * 0.5 * (_dot(before, before) + _dot(after, after))
    return after_momentum, dissipation + increment

  def update(grads, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    first = state.count == 0
    # Two noise draws per step (one per friction half-step), never reused across steps.
    key_finish = jax.random.fold_in(state.key, 2 * state.count)
    key_start = jax.random.fold_in(state.key, 2 * state.count + 1)
    kicked = _tmap(lambda p, g: p - 0.5 * dt * g, state.momentum, grads)
    finished, finished_total = damp(kicked, key_finish, state.dissipation_total)
    momentum = _tmap(lambda p, q: jnp.where(first, p, q), state.momentum, finished)
    dissipated = jnp.where(first, state.dissipation_total, finished_total)
    velocity = mass.solve(momentum)
    kinetic = 0.5 * _dot(momentum, velocity)
    velocity_sq = _dot(velocity, velocity)
    loss = jnp.zeros_like(kinetic) if value is None else jnp.asarray(value, kinetic.dtype)
    damped, total = damp(momentum, key_start, dissipated)
    half = _tmap(lambda p, g: p - 0.5 * dt * g, damped, grads)
    direction = _tmap(jnp.negative, mass.solve(half))
    new_state = HeavyBallState(momentum=half, count=state.count + 1, kinetic=kinetic,
                               inertia=kinetic + loss, velocity_sq=velocity_sq,
                               dissipated=dissipated, dissipation_total=total, key=state.key)
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init, update)


def heavy_ball(learning_rate: float, friction: float = 0.0, noise: float = 0.0, mass: Optional[Mass] = None,
               seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Heavy-ball / Hamiltonian descent with time step ``dt = learning_rate``.

  ``friction=0, noise=0``: symplectic Hamiltonian dynamics (inertia conserved); ``friction > 0``: damped
  heavy ball; ``noise > 0``: underdamped Langevin at temperature ``noise^2 / (2 friction)``. With
  ``mass=operator_mass(layerwise_metric)`` it is the Riemannian heavy ball. In classical heavy-ball
  terms (identity mass ``m``): step ``dt^2 / m`` and momentum ``exp(-friction dt / m)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> opt = heavy_ball(0.1, friction=1.0)
    >>> params = jnp.ones(2)
    >>> updates, state = opt.update(params, opt.init(params), params, value=0.5 * jnp.sum(params ** 2))
  """
  return optax.chain(scale_by_heavy_ball(learning_rate, friction, noise, mass, seed),
                     optax.scale(-float(learning_rate)))


def stationary_velocity_sq(noise: float, friction: float, trace_inverse_mass: float) -> float:
  """Prediction ``E||v||^2 = sigma^2 tr(M^{-1}) / (2 gamma)`` at stationarity (temperature
  ``sigma^2 / (2 gamma)``)."""
  if not friction > 0:
    raise ValueError("the stationary prediction needs friction > 0.")
  return noise ** 2 * trace_inverse_mass / (2.0 * friction)


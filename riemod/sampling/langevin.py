"""Stochastic-gradient Langevin samplers as optax transformations: SGLD, SGWORLD, Riemannian SGLD.

All three are fed the gradient of a minibatch estimate of the potential (the negative log
posterior)

    U(theta) = N * mean_i loss_i(theta) - log prior(theta),
    grad U_B = (N / B) sum_{i in B} grad loss_i + grad(-log prior)

(:func:`potential_grad` builds it from the gradient of the batch-mean loss) and return the whole
increment, so ``params = optax.apply_updates(params, updates)`` is one step of the chain. The PRNG
key lives in the state; the noise of step ``t`` is drawn from ``fold_in(key, t)``.

* :func:`sgld`: ``theta <- theta - h grad U_B + sqrt(2 h T) xi``, ``xi ~ N(0, I)``
  (Welling & Teh 2011), fed independent minibatches.
* :func:`sgworld`: the same update fed without-replacement minibatches, a fresh permutation every
  epoch (Yuret, Kabakcioglu, Hinczewski, Strang & Adhikari, *Machine learning in and out of
  equilibrium*). The batching is the whole difference: within an epoch the minibatch errors sum to
  zero at leading order, which removes most of SGLD's minibatch bias.
* :func:`riemannian_sgld`: drift ``-h G_U^{-1} grad U_B`` and noise ``N(0, 2 h T G_U^{-1})`` with
  ``G_U`` the layerwise or full metric of the potential (Girolami & Calderhead 2011; Patterson &
  Teh 2013), drawn exactly through the Woodbury composer.

How the Riemannian sampler maps the curvature to the metric of the potential: ``curvature`` from
:func:`riemod.value_grad_and_curvature` describes the *batch-mean* loss, ``K^T K`` being its
Gauss-Newton matrix. The Gauss-Newton matrix of ``U`` is ``N K^T K + P`` (``P`` the prior
precision). The sampler composes ``G = K^T K + D`` with the default mass ``D = P / N`` and uses

    G_U = N G = N K^T K + P,        G_U^{-1} = G^{-1} / N.

So the drift is ``-(h / N) G^{-1} grad U_B`` and the noise is ``sqrt(2 h T / N) * G.sample()``
(``G.sample`` is an exact ``N(0, G^{-1})`` draw, ``G^{-1}(K^T z_1 + D^{1/2} z_2)``). Masses that
modules declare themselves are used as they are, in the batch-mean scale (a declared mass ``m``
stands for a prior precision ``N m``). With this metric ``h`` is dimensionless: ``h = 1`` with an
exact constant metric is a Newton step, and the chain relaxes at rate ``h`` in every direction.

The correction term ``T sum_j d(G_U^{-1})_{ij} / d theta_j`` of the Riemannian Langevin
diffusion is dropped, as in most stochastic-gradient Riemannian samplers (it needs derivatives of
the metric). It vanishes when the metric does not depend on ``theta`` (linear models, e.g. the
Bayesian linear regression of :mod:`riemod.sampling.blr`, whose Gauss-Newton metric is exact and
constant); otherwise the stationary law carries an ``O(|grad G|)`` bias.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from riemod._util import gaussian_like, prng_key
from riemod.composer import Geometry, masses


class LangevinState(NamedTuple):
  """State of :func:`sgld` and :func:`sgworld`: step counter and the noise key."""

  count: jax.Array
  key: jax.Array


class RiemannianLangevinState(NamedTuple):
  """State of :func:`riemannian_sgld`.

  Attributes:
    count: steps taken.
    key: noise key (step ``t`` uses ``fold_in(key, t)``).
    drift_norm_sq: ``grad U_B^T G_U^{-1} grad U_B`` of the last step (a diagnostic).
    geometry: the geometry's state.
  """

  count: jax.Array
  key: jax.Array
  drift_norm_sq: jax.Array
  geometry: Any = None


def _prng_key(key) -> jax.Array:
  """The key as raw ``uint32`` key data: a state holding it serialises like any array (flax
  serialization, orbax), which a typed key array does not."""
  key = prng_key(key)
  return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def _check_step(step_size) -> None:
  if callable(step_size):
    return
  value = float(step_size)
  if not (value > 0 and np.isfinite(value)):
    raise ValueError(f"step_size={step_size!r}: the step size must be a finite number > 0, e.g. "
                     "1e-5 (or an optax schedule).")


def _check_temperature(temperature) -> None:
  value = float(temperature)
  if not (value >= 0 and np.isfinite(value)):
    raise ValueError(f"temperature={temperature!r}: the temperature must be finite and >= 0 "
                     "(1 samples the posterior, 0 gives plain gradient descent).")


def _step_value(step_size, count):
  return step_size(count) if callable(step_size) else step_size


_gaussian_like = gaussian_like


def _euclidean_langevin(step_size, temperature, key) -> optax.GradientTransformationExtraArgs:
  _check_step(step_size)
  _check_temperature(temperature)
  key = _prng_key(key)

  def init_fn(params):
    del params
    return LangevinState(jnp.zeros((), jnp.int32), key)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    h = _step_value(step_size, state.count)
    noise = _gaussian_like(jax.random.fold_in(state.key, state.count), updates)
    scale = jnp.sqrt(2.0 * h * temperature)
    out = jax.tree.map(lambda g, z: (-h * g + scale * z).astype(g.dtype), updates, noise)
    return out, LangevinState(optax.safe_increment(state.count), state.key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sgld(step_size: optax.ScalarOrSchedule, temperature: float = 1.0, *,
         key: jax.Array | int = 0) -> optax.GradientTransformationExtraArgs:
  """Stochastic-gradient Langevin dynamics: ``theta <- theta - h grad U_B + sqrt(2 h T) xi``.

  Feed it ``grad U_B`` (see :func:`potential_grad`) computed on independent minibatches
  (``Minibatcher(..., replace=True)``). The step size and the noise are coupled, so there is no
  separate ``scale_by_sgld``: the returned updates are the whole increment.

  Args:
    step_size: ``h > 0`` or an optax schedule of the step counter (Welling & Teh decay it).
    temperature: ``T >= 0``; 1 samples the posterior ``exp(-U)``.
    key: PRNG key (or integer seed) of the injected noise, kept in the state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra keyword arguments are ignored).

  Reference: Welling & Teh, *Bayesian Learning via Stochastic Gradient Langevin Dynamics*,
  ICML 2011.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> tx = sgld(1e-2, key=0)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": params["w"] - 1.0}, state)   # U = |w - 1|^2 / 2
    >>> params = optax.apply_updates(params, updates)
    >>> int(state.count)
    1
  """
  return _euclidean_langevin(step_size, temperature, key)


def sgworld(step_size: optax.ScalarOrSchedule, temperature: float = 1.0, *,
            key: jax.Array | int = 0) -> optax.GradientTransformationExtraArgs:
  """SGWORLD: SGLD fed without-replacement minibatches (a fresh permutation every epoch).

  The update is :func:`sgld`'s; what makes it SGWORLD is the batching, which the caller provides
  with ``Minibatcher(N, B, replace=False)`` (e.g. as the ``batcher`` of
  :func:`riemod.sampling.sample`). Every sample then enters exactly once per epoch, the
  epoch's minibatch errors sum to zero at leading order, and the stationary law moves toward the
  Gibbs posterior: at the same step size its covariance error is far below SGLD's.

  Args:
    step_size: ``h > 0`` or an optax schedule.
    temperature: ``T >= 0``.
    key: PRNG key (or integer seed) of the injected noise.

  Reference: Yuret, Kabakcioglu, Hinczewski, Strang & Adhikari, *Machine learning in and out of
  equilibrium*.

  Example:
    >>> import jax.numpy as jnp
    >>> from riemod.sampling import Minibatcher
    >>> tx, batcher = sgworld(1e-5, key=0), Minibatcher(1000, 50, replace=False)
    >>> batcher.steps_per_epoch
    20
  """
  return _euclidean_langevin(step_size, temperature, key)


def riemannian_sgld(
    step_size: optax.ScalarOrSchedule,
    temperature: float = 1.0,
    *,
    data_size: int | None = None,
    prior_precision: float = 1.0,
    geometry: Geometry | None = None,
    key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Riemannian SGLD with the composer's metric: ``-h G_U^{-1} grad U_B + N(0, 2 h T G_U^{-1})``.

  ``G_U = N (K^T K + D)`` with ``D = prior_precision / N`` (see the module docstring): the
  Gauss-Newton metric of the potential, layerwise (block diagonal over modules) or full. The
  noise is an exact draw through the composer; the metric-divergence correction term is dropped
  (exact for metrics that do not depend on the parameters).

  Args:
    step_size: dimensionless ``h > 0`` (``h = 1`` is a Newton step for an exact constant metric),
      or an optax schedule.
    temperature: ``T >= 0``.
    data_size: ``N``, the number of training samples (required: it converts the batch-mean
      curvature into the metric of ``U``).
    prior_precision: ``P > 0`` of the isotropic Gaussian prior, the mass of modules that declare
      none is ``P / N``.
    geometry: the metric as a :class:`~riemod.Geometry` in the batch-mean scale (structure,
      space, mass); ``None`` means ``Geometry(mass=prior_precision / N)``, for which ``G_U`` is
      exactly the Gauss-Newton matrix of ``U``. Any constant mass ``D > 0`` gives a valid
      preconditioner (the stationary law is still ``exp(-U / T)``); a larger one damps the
      directions the batch's curvature does not see, which a network needs when the batch metric
      has rank far below the parameter count (there ``G_U = P`` would let the chain take prior-
      sized steps against the full-data gradient). A parameter-dependent mass policy (adaptive)
      would need the dropped divergence term and is refused.
    key: PRNG key (or integer seed) of the injected noise.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``curvature=`` (from
    :func:`riemod.value_grad_and_curvature` on the batch-mean loss).

  References: Girolami & Calderhead, *Riemann manifold Langevin and Hamiltonian Monte Carlo
  methods*, JRSS B 2011; Patterson & Teh, *Stochastic Gradient Riemannian Langevin Dynamics on the
  Probability Simplex*, NeurIPS 2013.

  Example:
    >>> import jax, jax.numpy as jnp, riemod
    >>> f = lambda p, x: x @ p["w"]
    >>> params, x = {"w": jnp.zeros(3)}, jnp.ones((8, 3))
    >>> loss, g, curv = riemod.value_grad_and_curvature(
    ...     f, x, lambda y: 0.5 * jnp.mean((y - 1.0) ** 2), riemod.metrics.identity(),
    ...     params=params)
    >>> tx = riemannian_sgld(0.1, data_size=8, key=0)
    >>> updates, state = tx.update(potential_grad(g, params, data_size=8), tx.init(params),
    ...                            params, curvature=curv)
    >>> updates["w"].shape
    (3,)
  """
  _check_step(step_size)
  _check_temperature(temperature)
  if data_size is None:
    raise ValueError("riemannian_sgld needs data_size=N (the number of training samples): the "
                     "curvature is that of the batch-mean loss and the metric of the potential "
                     "is N times it.")
  if not isinstance(data_size, (int, np.integer)) or data_size < 1:
    raise ValueError(f"data_size={data_size!r}: pass the number of training samples, an integer "
                     ">= 1.")
  if not (float(prior_precision) > 0 and np.isfinite(float(prior_precision))):
    raise ValueError(f"prior_precision={prior_precision!r}: it must be finite and > 0 (it sets "
                     "the mass P / N that keeps the metric invertible).")
  key = _prng_key(key)
  n = float(data_size)
  if geometry is None:
    geometry = Geometry(mass=float(prior_precision) / n)
  if not isinstance(geometry, Geometry):
    raise TypeError(f"geometry={geometry!r}: pass a riemod.Geometry (or None).")
  if not isinstance(geometry.mass_policy, masses.ConstantMass):
    raise ValueError("riemannian_sgld needs a constant mass policy: a mass that follows the "
                     "gradients makes G depend on the parameters, and the sampler drops the "
                     "divergence term that would then be needed.")

  def init_fn(params):
    return RiemannianLangevinState(jnp.zeros((), jnp.int32), key,
                                   jnp.zeros((), jnp.result_type(float)), geometry.init(params))

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    del params, extra_args
    if curvature is None:
      raise ValueError("riemannian_sgld needs the curvature: tx.update(grad_U, state, params, "
                       "curvature=curvature) with the curvature from "
                       "riemod.value_grad_and_curvature on the batch-mean loss.")
    h = _step_value(step_size, state.count)
    geometry_state = geometry.advance(state.geometry, updates)
    metric = geometry.compose(curvature, geometry_state)
    direction = metric.solve(updates)  # G^{-1} grad U_B
    noise = metric.sample(jax.random.fold_in(state.key, state.count), updates)  # ~ N(0, G^{-1})
    drift_scale = h / n
    noise_scale = jnp.sqrt(2.0 * h * temperature / n)
    out = jax.tree.map(lambda d, z: (-drift_scale * d + noise_scale * z).astype(d.dtype),
                       direction, noise)
    norm_sq = sum(jnp.vdot(g, d).real for g, d in
                  zip(jax.tree.leaves(updates), jax.tree.leaves(direction))) / n
    return out, RiemannianLangevinState(optax.safe_increment(state.count), state.key,
                                        jnp.asarray(norm_sq, state.drift_norm_sq.dtype),
                                        geometry_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def potential_grad(mean_loss_grads: Any, params: Any, *, data_size: int | None,
                   prior_precision: float | Callable[[Any], Any] = 1.0) -> Any:
  """``grad U_B = N * grad(batch-mean loss) + grad(-log prior)`` for an isotropic Gaussian prior.

  Args:
    mean_loss_grads: gradient of ``mean_{i in B} loss_i`` (e.g. from
      :func:`riemod.value_grad_and_curvature`), so ``N`` times it is ``(N / B) sum grad loss_i``.
    params: the current parameters.
    data_size: ``N``, required.
    prior_precision: ``P`` of the prior ``N(0, I / P)`` (gradient ``P theta``), or a function
      ``params -> grad(-log prior)`` for any other prior.

  Example:
    >>> import jax.numpy as jnp
    >>> potential_grad({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, data_size=10)["w"].tolist()
    [11.0, 11.0]
  """
  if data_size is None:
    raise ValueError("data_size is missing: pass the number of training samples N; the "
                     "minibatch estimate of the potential's gradient is N * grad(mean loss) + "
                     "grad(-log prior).")
  if not isinstance(data_size, (int, np.integer)) or data_size < 1:
    raise ValueError(f"data_size={data_size!r}: pass a positive integer.")
  prior = (prior_precision(params) if callable(prior_precision)
           else jax.tree.map(lambda p: prior_precision * p, params))
  return jax.tree.map(lambda g, q: (data_size * g + q).astype(g.dtype), mean_loss_grads, prior)

"""Bayesian linear regression with an exact Gaussian posterior: the reference problem of the samplers.

Model: ``y_i = x_i . w + eps_i``, ``eps_i ~ N(0, s^2)``, prior ``w ~ N(0, I / P)``, features
``x_i ~ N(0, I)``, true weights drawn from the prior. Defaults (the issue's benchmark): ``d = 5``,
``N = 1000``, ``P = 1``, ``s = 0.5``, batches of ``B = 50``. The posterior is exactly
``N(mu, Sigma)`` with

    Sigma^{-1} = P I + X^T X / s^2,       mu = Sigma X^T y / s^2.

The potential is ``U(w) = N * mean_i loss_i(w) + P |w|^2 / 2`` with
``loss_i = (x_i . w - y_i)^2 / (2 s^2)``; the model is written as residuals
``r_i = (x_i . w - y_i) / s`` with the residual output metric, so the Gauss-Newton matrix of the
batch-mean loss is ``X_B^T X_B / (B s^2)`` and, on the full data, ``N K^T K + P I = Sigma^{-1}``
exactly: the Riemannian sampler's "exact metric".

Precision: the chains run in float32 (the default dtype, so nothing depends on
``jax_enable_x64``); the posterior, the sample moments and the errors are computed in float64
with NumPy. The float32 rounding of a step (``~1e-7`` relative) is far below the injected noise
(``sqrt(2 h) >~ 1e-3``).

This module is the single home of the problem for the CLI (``riemod sample blr``), the example,
the tests and the benchmark. :func:`conditional_covariance` measures a sampler's stationary
covariance without the Monte-Carlo noise of its Gaussian draws (see its docstring), which is what
makes SGLD's ``O(h)`` and SGWORLD's ``O(h^2)`` excess errors visible down to ``h = 1e-7``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from riemod import metrics
from riemod.curvature import value_grad_and_curvature
from riemod.sampling.batching import Minibatcher
from riemod.sampling.diagnostics import langevin_stationary_covariance
from riemod.sampling.langevin import potential_grad, riemannian_sgld, sgld, sgworld

SAMPLERS = ("sgld", "sgworld", "riemannian_sgld")
# Step sizes where SGLD's excess error (linear in h) and SGWORLD's (quadratic) separate clearly.
DEFAULT_STEP_SIZES = (1e-7, 3e-7, 1e-6, 3e-6, 1e-5)


class BayesianLinearRegression(NamedTuple):
  """Data and exact posterior (NumPy float64 for the posterior)."""

  x: np.ndarray
  y: np.ndarray
  noise_sd: float
  prior_precision: float
  batch_size: int
  true_weights: np.ndarray
  posterior_mean: np.ndarray
  posterior_cov: np.ndarray

  @property
  def num_data(self) -> int:
    return self.x.shape[0]

  @property
  def dim(self) -> int:
    return self.x.shape[1]

  @property
  def posterior_precision(self) -> np.ndarray:
    return self.prior_precision * np.eye(self.dim) + self.x.T.astype(np.float64) @ self.x / (
        self.noise_sd ** 2)

  def per_sample_gradient_covariance(self, w: np.ndarray | None = None) -> np.ndarray:
    """Covariance ``C`` over the data of ``grad loss_i`` at ``w`` (default: the posterior mean)."""
    w = self.posterior_mean if w is None else w
    x = self.x.astype(np.float64)
    g = x * ((x @ w - self.y) / self.noise_sd ** 2)[:, None]
    return np.cov(g, rowvar=False, bias=True)


def make_blr(seed: int = 0, *, num_data: int = 1000, dim: int = 5, noise_sd: float = 0.5,
             prior_precision: float = 1.0, batch_size: int = 50,
             dtype=np.float32) -> BayesianLinearRegression:
  """Draws the data set and computes the exact posterior.

  Example:
    >>> problem = make_blr()
    >>> problem.x.shape, problem.posterior_cov.shape
    ((1000, 5), (5, 5))
  """
  if noise_sd <= 0 or prior_precision <= 0:
    raise ValueError(f"noise_sd={noise_sd!r} and prior_precision={prior_precision!r} must be > 0.")
  Minibatcher(num_data, batch_size).check()
  rng = np.random.default_rng(seed)
  w = rng.normal(size=dim) / np.sqrt(prior_precision)
  x = rng.normal(size=(num_data, dim))
  y = x @ w + noise_sd * rng.normal(size=num_data)
  x, y = x.astype(dtype), y.astype(dtype)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  precision = prior_precision * np.eye(dim) + x64.T @ x64 / noise_sd ** 2
  cov = np.linalg.inv(precision)
  cov = 0.5 * (cov + cov.T)
  mean = np.linalg.solve(precision, x64.T @ y64 / noise_sd ** 2)
  return BayesianLinearRegression(x, y, float(noise_sd), float(prior_precision), int(batch_size),
                                  w, mean, cov)


def residual_model(params: dict, batch: tuple[jax.Array, jax.Array], noise_sd: float) -> jax.Array:
  """``(x . w - y) / s`` per sample."""
  x, y = batch
  return (x @ params["w"] - y) / noise_sd


def _mean_loss(residuals: jax.Array) -> jax.Array:
  return 0.5 * jnp.mean(residuals ** 2)


def exact_metric_curvature(problem: BayesianLinearRegression):
  """The full-data curvature, from ``d`` pseudo-samples with the same Gauss-Newton matrix.

  ``K^T K = X^T X / (N s^2)`` only depends on ``X^T X = R^T R`` (``R`` upper triangular, ``d x d``),
  so the curvature of the ``d`` rows ``sqrt(d / N) R`` equals the full-data one while the
  composer's noise draw needs ``d`` instead of ``N`` row variates per step.
  """
  x64 = problem.x.astype(np.float64)
  r = np.linalg.cholesky(x64.T @ x64).T
  pseudo_x = jnp.asarray(np.sqrt(problem.dim / problem.num_data) * r, problem.x.dtype)
  pseudo_y = jnp.zeros((problem.dim,), problem.x.dtype)
  params0 = {"w": jnp.zeros(problem.dim, problem.x.dtype)}
  return value_grad_and_curvature(
      lambda p, batch: residual_model(p, batch, problem.noise_sd), (pseudo_x, pseudo_y),
      _mean_loss, metrics.identity(), params=params0)[2]


def grad_fn_for(problem: BayesianLinearRegression, sampler: str, metric: str = "exact"):
  """``grad_fn(params, indices, key) -> (grad U_B, extra kwargs)`` for :func:`~riemod.sampling.sample`.

  Args:
    problem: the regression.
    sampler: one of :data:`SAMPLERS`.
    metric: for ``riemannian_sgld``: ``"exact"`` (Gauss-Newton on the full data, constant and
      equal to the posterior precision) or ``"minibatch"`` (recomputed on every batch).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r}: use one of {SAMPLERS}.")
  if metric not in ("exact", "minibatch"):
    raise ValueError(f"metric={metric!r}: use 'exact' or 'minibatch'.")
  x, y = jnp.asarray(problem.x), jnp.asarray(problem.y)
  n, s, p = problem.num_data, problem.noise_sd, problem.prior_precision

  def model(params, batch):
    return residual_model(params, batch, s)

  def mean_loss_grad(params, batch):
    return jax.grad(lambda q: _mean_loss(model(q, batch)))(params)

  exact_curvature = None
  if sampler == "riemannian_sgld" and metric == "exact":
    exact_curvature = exact_metric_curvature(problem)

  def grad_fn(params, indices, key):
    del key
    batch = (x[indices], y[indices])
    if sampler != "riemannian_sgld":
      return potential_grad(mean_loss_grad(params, batch), params, data_size=n,
                            prior_precision=p), {}
    if exact_curvature is not None:
      grads, curvature = mean_loss_grad(params, batch), exact_curvature
    else:
      _, grads, curvature = value_grad_and_curvature(model, batch, _mean_loss, metrics.identity(),
                                                     params=params)
    return potential_grad(grads, params, data_size=n, prior_precision=p), {"curvature": curvature}

  return grad_fn


def make_sampler(problem: BayesianLinearRegression, sampler: str, step_size: float, *,
                 seed: int = 0, temperature: float = 1.0):
  """The transform and the minibatch schedule of ``sampler`` on ``problem``."""
  key = jax.random.fold_in(jax.random.key(seed), 1)
  if sampler == "sgld":
    return sgld(step_size, temperature, key=key), Minibatcher(problem.num_data,
                                                              problem.batch_size, True)
  if sampler == "sgworld":
    return sgworld(step_size, temperature, key=key), Minibatcher(problem.num_data,
                                                                 problem.batch_size, False)
  if sampler == "riemannian_sgld":
    return (riemannian_sgld(step_size, temperature, data_size=problem.num_data,
                            prior_precision=problem.prior_precision, key=key),
            Minibatcher(problem.num_data, problem.batch_size, True))
  raise ValueError(f"sampler={sampler!r}: use one of {SAMPLERS}.")


def relaxation_rate(problem: BayesianLinearRegression, sampler: str, step_size: float) -> float:
  """Slowest per-step relaxation rate of the mean: ``h lambda_min`` (Euclidean) or ``h``."""
  if sampler == "riemannian_sgld":
    return float(step_size)
  return float(step_size * np.linalg.eigvalsh(problem.posterior_precision)[0])


def stationary_cov_error(problem: BayesianLinearRegression, sampler: str, step_size: float,
                         *, with_replacement: bool = True) -> float:
  """Closed-form covariance error of the chain linearised at the posterior mean.

  Uses :func:`~riemod.sampling.diagnostics.langevin_stationary_covariance` with the minibatch
  noise of ``grad U_B`` at the posterior mean, ``N^2 (N - B) / (B (N - 1)) C``. It treats the
  batches as independent, so it describes SGLD and Riemannian SGLD (``A = Sigma``), not SGWORLD,
  whose batches within an epoch are dependent.
  """
  from riemod.sampling.diagnostics import (langevin_stationary_covariance,
                                           minibatch_gradient_covariance)
  del with_replacement
  n, b = problem.num_data, problem.batch_size
  noise = n ** 2 * minibatch_gradient_covariance(problem.per_sample_gradient_covariance(), n, b)
  hess = problem.posterior_precision
  pre = problem.posterior_cov if sampler == "riemannian_sgld" else None
  s = langevin_stationary_covariance(hess, step_size, 1.0, noise, pre)
  return float(np.linalg.norm(s - problem.posterior_cov) / np.linalg.norm(problem.posterior_cov))


class ConditionalCovariance(NamedTuple):
  """Result of :func:`conditional_covariance` (NumPy float64; errors relative to ``||Sigma||_F``).

  Attributes:
    covariance: estimated stationary covariance of the chain.
    full_batch: exact stationary covariance of the full-batch chain at the same step (the floor).
    excess_error: ``||covariance - full_batch|| / ||Sigma||``: the minibatch schedule's own error.
    excess_stderr: Monte-Carlo standard error of ``excess_error`` (spread over chains).
    total_error: ``||covariance - Sigma|| / ||Sigma||``.
    floor_error: ``||full_batch - Sigma|| / ||Sigma||`` (discretisation alone).
    num_steps: steps per chain (burn-in included); num_chains: chains.
  """

  covariance: np.ndarray
  full_batch: np.ndarray
  excess_error: float
  excess_stderr: float
  total_error: float
  floor_error: float
  num_steps: int
  num_chains: int


def steps_for_target(problem: BayesianLinearRegression, sampler: str, step_size: float,
                     target_error: float, num_chains: int) -> int:
  """Steps per chain so that the relative Monte-Carlo error of the excess is about ``target_error``.

  The estimate of a stationary covariance from ``n`` relaxation times has a relative standard
  error of about ``c sqrt(1 / n)``; ``c^2 = 8`` covers the measured spread of SGLD's excess (the
  noisier of the two schedules), with at least 20 relaxation times per chain. The chain relaxes at
  rate :func:`relaxation_rate` per step; a tenth of burn-in is added.

  Example:
    >>> steps_for_target(make_blr(), "sgld", 1e-5, 0.1, 4) > 1000
    True
  """
  if not 0 < target_error < 1:
    raise ValueError(f"target_error={target_error!r}: pass a relative error in (0, 1), e.g. 0.1.")
  relaxations = max(20.0, 8.0 / (target_error ** 2 * num_chains))
  return int(1.1 * relaxations / relaxation_rate(problem, sampler, step_size)) + 1


def conditional_covariance(problem: BayesianLinearRegression, sampler: str, step_size: float, *,
                           num_steps: int, num_chains: int = 4, seed: int = 0,
                           chunk: int = 200_000, progress: bool = False) -> ConditionalCovariance:
  """Stationary covariance of a sampler on the regression, Rao-Blackwellised over its Gaussian noise.

  On this linear model the batch gradient is ``grad U_B(w) = A_B w - b_B`` with
  ``A_B = (N / B) X_B^T X_B / s^2 + P I``, so, given the sequence of batches, one step
  ``w' = w - h C (A_B w - b_B) + sqrt(2 h) C^{1/2} xi`` (``C = I`` for SGLD and SGWORLD, the
  posterior covariance for Riemannian SGLD with the exact metric) maps a Gaussian to a Gaussian:
  the conditional mean ``m' = m - h C (A_B m - b_B)`` and covariance
  ``P' = (I - h C A_B) P (I - h C A_B)^T + 2 h C``. By the law of total covariance the chain's
  stationary covariance is ``E[P_t] + Cov(m_t)``, averaged over the batches the sampler's own
  :class:`~riemod.sampling.Minibatcher` draws (independent for SGLD, epochs of a permutation for
  SGWORLD). The Gaussian draws no longer add Monte-Carlo noise, so the remaining error of the
  estimate is proportional to the minibatch excess itself.

  Args:
    problem: the regression; sampler: one of :data:`SAMPLERS`; step_size: ``h``.
    num_steps: steps per chain (the first tenth is burn-in); num_chains: independent batch streams.
    seed: key of the batches; chunk: steps per compiled scan; progress: tqdm bar over steps.

  Returns:
    :class:`ConditionalCovariance`.

  Example:
    >>> problem = make_blr()
    >>> out = conditional_covariance(problem, "sgld", 1e-5, num_steps=4000, num_chains=2)
    >>> out.excess_error > 5 * out.floor_error   # SGLD's minibatch excess dominates at h = 1e-5
    True
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r}: use one of {SAMPLERS}.")
  if num_steps < 10 or num_chains < 1:
    raise ValueError(f"num_steps={num_steps} (>= 10) and num_chains={num_chains} (>= 1) are too small.")
  n, b, d = problem.num_data, problem.batch_size, problem.dim
  pre = problem.posterior_cov if sampler == "riemannian_sgld" else np.eye(d)
  full_batch = langevin_stationary_covariance(problem.posterior_precision, step_size, 1.0, None,
                                              None if sampler != "riemannian_sgld" else pre)
  batcher = Minibatcher(n, b, sampler != "sgworld")
  burn_in = num_steps // 10
  with jax.enable_x64(True):
    x = jnp.asarray(problem.x, jnp.float64)
    y = jnp.asarray(problem.y, jnp.float64)
    scale = n / (b * problem.noise_sd ** 2)
    precon = jnp.asarray(pre)
    noise = 2.0 * step_size * precon
    eye = jnp.eye(d)

    def step(state, t):
      mean, cov, batch_key, permutation = state
      indices, permutation = batcher.draw(batch_key, t, permutation)
      xb, yb = x[indices], y[indices]
      a = scale * xb.T @ xb + problem.prior_precision * eye
      grad = a @ mean - scale * xb.T @ yb
      f = eye - step_size * precon @ a
      return (mean - step_size * precon @ grad, f @ cov @ f.T + noise, batch_key, permutation)

    def advance(carry, length, record):
      def body(c, _):
        state, t = c
        state = jax.vmap(step, in_axes=(0, None))(state, t)
        out = (state[0], state[1]) if record else None
        return (state, t + 1), out

      def summarise(c, steps):
        (c, outs) = jax.lax.scan(body, c, None, length=steps)
        if not record:
          return c, None
        means, covs = outs  # (steps, chains, d), (steps, chains, d, d)
        centred = means - jnp.asarray(problem.posterior_mean)
        return c, (jnp.sum(covs, 0), jnp.einsum("tci,tcj->cij", centred, centred), jnp.sum(means, 0))
      return summarise(carry, length)

    advance = jax.jit(advance, static_argnums=(1, 2))
    keys = jax.random.split(jax.random.key(seed), num_chains)
    init = jax.vmap(batcher.init)(keys)
    mean0 = jnp.tile(jnp.asarray(problem.posterior_mean), (num_chains, 1))
    cov0 = jnp.tile(jnp.asarray(full_batch), (num_chains, 1, 1))
    carry = ((mean0, cov0, init.key, init.permutation), jnp.zeros((), jnp.int32))
    bar = None
    if progress:
      try:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
        bar = tqdm(total=num_steps, desc=f"{sampler} h={step_size:.0e}", unit="step", leave=False)
      except ImportError:
        pass
    sums = [np.zeros((num_chains, d, d)), np.zeros((num_chains, d, d)), np.zeros((num_chains, d))]
    done = 0
    try:
      while done < num_steps:
        length = min(chunk, (burn_in if done < burn_in else num_steps) - done)
        record = done >= burn_in
        carry, out = advance(carry, length, record)
        if record:
          for total, part in zip(sums, out):
            total += np.asarray(part)
        done += length
        if bar is not None:
          bar.update(length)
    finally:
      if bar is not None:
        bar.close()
  kept = num_steps - burn_in
  mean_p, second, mean_m = sums[0] / kept, sums[1] / kept, sums[2] / kept
  del mean_m
  # Per chain: E[P] + Cov(m), the mean of m taken as the exact posterior mean (SG drifts are unbiased
  # for a linear model) so that the short-chain bias of a sample mean does not enter.
  per_chain = mean_p + second
  covariance = per_chain.mean(axis=0)
  norm = np.linalg.norm(problem.posterior_cov)
  excess = per_chain - full_batch
  spread = excess.std(axis=0, ddof=1) / np.sqrt(num_chains) if num_chains > 1 else np.full((d, d), np.nan)
  return ConditionalCovariance(
      covariance=covariance, full_batch=full_batch,
      excess_error=float(np.linalg.norm(covariance - full_batch) / norm),
      excess_stderr=float(np.linalg.norm(spread) / norm),
      total_error=float(np.linalg.norm(covariance - problem.posterior_cov) / norm),
      floor_error=float(np.linalg.norm(full_batch - problem.posterior_cov) / norm),
      num_steps=int(num_steps), num_chains=int(num_chains))

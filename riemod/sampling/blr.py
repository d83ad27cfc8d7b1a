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
the tests and the benchmark.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from riemod import metrics
from riemod.curvature import value_grad_and_curvature
from riemod.sampling.batching import Minibatcher
from riemod.sampling.diagnostics import moment_errors
from riemod.sampling.driver import sample
from riemod.sampling.langevin import potential_grad, riemannian_sgld, sgld, sgworld

SAMPLERS = ("sgld", "sgworld", "riemannian_sgld")
DEFAULT_STEP_SIZES = (1e-5, 3e-5)


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
      _mean_loss, metrics.residual(), params=params0)[2]


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
      _, grads, curvature = value_grad_and_curvature(model, batch, _mean_loss, metrics.residual(),
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


def run_blr(problem: BayesianLinearRegression, sampler: str, step_size: float, *, seed: int = 0,
            num_steps: int | None = None, relaxation_times: float = 4000.0, num_chains: int = 4,
            metric: str = "exact", thin: int | None = None, progress: bool = False,
            max_steps: int = 2_000_000) -> dict[str, Any]:
  """One chain setting: samples, then the errors against the exact posterior.

  The run length is ``relaxation_times / rate`` steps per chain (``rate`` from
  :func:`relaxation_rate`), capped at ``max_steps``, unless ``num_steps`` is given; the first
  tenth is burn-in. Chains start at the posterior mean.

  Returns:
    ``{"sampler", "step_size", "cov_error", "mean_error", "num_steps", "num_chains", "seconds"}``
    (``cov_error``: relative Frobenius error of the sample covariance; ``mean_error``: Mahalanobis
    distance of the sample mean in posterior standard deviations).
  """
  rate = relaxation_rate(problem, sampler, step_size)
  if num_steps is None:
    num_steps = int(min(max_steps, max(2000, relaxation_times / rate)))
  burn_in = num_steps // 10
  thin = thin or max(1, int(0.25 / rate))
  num_samples = max(1, (num_steps - burn_in) // thin)
  tx, batcher = make_sampler(problem, sampler, step_size, seed=seed)
  params = {"w": jnp.asarray(problem.posterior_mean, problem.x.dtype)}
  start = time.perf_counter()
  result = sample(tx, params, grad_fn_for(problem, sampler, metric), batcher,
                  key=jax.random.key(seed), num_samples=num_samples, burn_in=burn_in, thin=thin,
                  num_chains=num_chains, collect=lambda p: p["w"],
                  chunk_size=max(1, min(num_samples, 20000)), progress=progress)
  samples = np.asarray(result.samples, np.float64).reshape(-1, problem.dim)
  seconds = time.perf_counter() - start
  errors = moment_errors(samples, problem.posterior_mean, problem.posterior_cov)
  return {"sampler": sampler, "step_size": float(step_size),
          "cov_error": float(errors["cov_error"]), "mean_error": float(errors["mean_error"]),
          "num_steps": int(burn_in + num_samples * thin), "num_chains": int(num_chains),
          "metric": metric if sampler == "riemannian_sgld" else None,
          "seconds": round(seconds, 3)}


def sweep(samplers: Sequence[str] = SAMPLERS, step_sizes: Sequence[float] = DEFAULT_STEP_SIZES,
          seeds: Sequence[int] = (0,), *, problem: BayesianLinearRegression | None = None,
          **run_kwargs) -> list[dict[str, Any]]:
  """:func:`run_blr` for every sampler, step size and seed (same data; seeds drive the chains)."""
  problem = problem or make_blr()
  return [dict(run_blr(problem, name, h, seed=seed, **run_kwargs), seed=int(seed))
          for name in samplers for h in step_sizes for seed in seeds]


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Medians over seeds of ``cov_error`` and ``mean_error`` per (sampler, step size)."""
  groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault((row["sampler"], row["step_size"]), []).append(row)
  out = []
  for (name, h), members in groups.items():
    out.append({"sampler": name, "step_size": h,
                "cov_error": float(np.median([m["cov_error"] for m in members])),
                "mean_error": float(np.median([m["mean_error"] for m in members])),
                "seeds": len(members), "num_steps": members[0]["num_steps"],
                "num_chains": members[0]["num_chains"]})
  return out


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

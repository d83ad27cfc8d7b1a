"""Bayesian linear regression: exact posterior, exact metric, and SGWORLD against SGLD."""

import numpy as np
import pytest

from riemod.composer import compose_metric
from riemod.sampling import blr


@pytest.fixture(scope="module")
def problem():
  return blr.make_blr(seed=0)


def test_posterior_is_the_exact_gaussian(problem):
  x, y = problem.x.astype(np.float64), problem.y.astype(np.float64)
  s2 = problem.noise_sd ** 2
  # Augmented least squares: the prior as d extra observations.
  aug_x = np.vstack([x / problem.noise_sd, np.sqrt(problem.prior_precision) * np.eye(5)])
  aug_y = np.concatenate([y / problem.noise_sd, np.zeros(5)])
  np.testing.assert_allclose(np.linalg.lstsq(aug_x, aug_y, rcond=None)[0],
                             problem.posterior_mean, rtol=1e-9)
  np.testing.assert_allclose(np.linalg.inv(problem.posterior_cov),
                             np.eye(5) + x.T @ x / s2, rtol=1e-9)


def test_exact_metric_of_the_potential_is_the_posterior_precision(problem):
  curvature = blr.exact_metric_curvature(problem)
  n, p = problem.num_data, problem.prior_precision
  metric = compose_metric(curvature, mass=p / n, structure="full")
  eye = np.eye(5, dtype=np.float32)
  g_u = n * np.stack([np.asarray(metric.matvec({"w": e})["w"]) for e in eye])
  np.testing.assert_allclose(g_u, problem.posterior_precision, rtol=1e-4)


def test_sgworld_covariance_error_is_below_sgld_at_the_same_step_and_seed(problem):
  for h, steps in ((1e-5, 60000), (3e-5, 30000)):
    errors = {name: blr.run_blr(problem, name, h, seed=1, num_steps=steps, num_chains=1)
              for name in ("sgld", "sgworld")}
    assert errors["sgworld"]["cov_error"] < errors["sgld"]["cov_error"], (h, errors)

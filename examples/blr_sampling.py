"""Bayesian linear regression: SGLD, SGWORLD and Riemannian SGLD against the exact posterior.

d = 5 features, N = 1000, prior N(0, I), noise sd 0.5, batches of 50. Prints the covariance and mean
errors per sampler and step size, saves the plot, then looks at one SGLD chain out of equilibrium:
probability current in a 2-D projection and entropy production with the integral fluctuation
theorem on a coarse-grained trajectory.

Run: ``python examples/blr_sampling.py [--out DIR]`` (about two minutes on two CPU cores).
"""

import argparse
import os

import jax
import numpy as np

from riemod.cli.sample import _table, plot
from riemod.sampling import blr, diagnostics as dg


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="docs/img")
  parser.add_argument("--relaxation-times", type=float, default=1500.0)
  args = parser.parse_args()

  problem = blr.make_blr()
  rows = blr.sweep(("sgld", "sgworld"), (1e-5, 3e-5), problem=problem,
                   relaxation_times=args.relaxation_times, num_chains=1)
  rows += blr.sweep(("riemannian_sgld",), (2e-3,), problem=problem,
                    relaxation_times=args.relaxation_times, num_chains=1)
  summary = blr.summarize(rows)
  print(_table(summary))
  os.makedirs(args.out, exist_ok=True)
  plot(summary, os.path.join(args.out, "blr_sampling.png"))

  # One SGLD trajectory, kept at every step, projected on the two leading posterior directions.
  from riemod.sampling import sample
  h = 3e-5
  tx, batcher = blr.make_sampler(problem, "sgld", h, seed=0)
  result = sample(tx, {"w": jax.numpy.asarray(problem.posterior_mean, np.float32)},
                  blr.grad_fn_for(problem, "sgld"), batcher, key=0, num_samples=100000,
                  burn_in=2000, collect=lambda p: p["w"], progress=False)
  traj = np.asarray(result.samples, np.float64)
  _, vecs = np.linalg.eigh(problem.posterior_cov)
  proj = (traj - problem.posterior_mean) @ vecs[:, -2:]
  rate, se = dg.area_rate(proj, h)
  print(f"\nSGLD h={h:g}: area rate of the probability current in the top-2 posterior plane "
        f"{rate:.3g} +- {se:.2g} (zero at equilibrium)")
  states = dg.coarse_grain(proj, bins=3)
  p, pi = dg.transition_matrix(states[::20], 9)  # coarse in time too: every 20th step
  delta_s = dg.segment_entropy_production(states[::20], p, pi, length=5)
  mean, err = dg.integral_fluctuation_check(delta_s)
  print(f"entropy production per coarse step {dg.entropy_production_rate(p, pi):.3g}; "
        f"<exp(-dS)> = {mean:.3f} +- {err:.3f} (integral fluctuation theorem: 1)")


if __name__ == "__main__":
  main()

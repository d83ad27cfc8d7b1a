"""blr-sampling: Bayesian linear regression with an exact Gaussian posterior (``riemod.sampling``).

Wraps ``riemod/sampling/blr.py`` (the sampling issue's problem: d = 5, N = 1000, batches of 50):
for each sampler (SGLD, SGWORLD, Riemannian SGLD with the exact metric) and step size, on seeds
{0, 1, 2}, the same number of steps per chain; measured: relative Frobenius error of the sample
covariance, Mahalanobis error of the sample mean (in posterior standard deviations), wall seconds
and seconds per step (``riemod.cli.sample.run_blr``'s own timing, after a warm-up run that compiles). If
``riemod.sampling`` is missing, the result records that the task was not run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks import harness

NAME = "blr-sampling"
STEP_SIZES = (3e-5,)
NUM_STEPS, QUICK_STEPS = 8_000, 1_000
SEEDS = (0, 1, 2)


def run(out: Path, quick: bool = False) -> dict:
  machine = harness.machine_info()
  payload = {"task": NAME, "machine": machine}
  try:
    from riemod.cli import sample as study
    from riemod.sampling import blr
  except Exception as error:  # noqa: BLE001 - not run, with the reason
    payload["not_run"] = f"riemod.sampling is not available: {type(error).__name__}: {error}"
    harness.write_json(out / f"{NAME}.json", payload)
    (out / f"{NAME}.md").write_text(f"# {NAME}\n\nNot run: {payload['not_run']}\n")
    return payload
  steps = QUICK_STEPS if quick else NUM_STEPS
  seeds = SEEDS[:1] if quick else SEEDS
  problem = blr.make_blr()
  runs = []
  for sampler in blr.SAMPLERS:
    for h in STEP_SIZES:
      study.run_blr(problem, sampler, h, seed=99, num_steps=200, num_chains=4)  # compile
      for seed in seeds:
        r = study.run_blr(problem, sampler, h, seed=seed, num_steps=steps, num_chains=4)
        r["seed"] = seed
        r["seconds_per_step"] = r["seconds"] / r["num_steps"]
        runs.append(r)
        print(f"[{time.strftime('%H:%M:%S')}] blr {sampler} h={h} seed {seed}: cov err "
              f"{r['cov_error']:.3g} mean err {r['mean_error']:.3g} ({r['seconds']:.1f} s)",
              flush=True)
  payload.update(runs=runs, num_steps=steps, step_sizes=list(STEP_SIZES), seeds=list(seeds),
                 loadavg_end=harness.machine_info()["loadavg"])
  harness.write_json(out / f"{NAME}.json", payload)
  rows = []
  for sampler in blr.SAMPLERS:
    for h in STEP_SIZES:
      rs = [r for r in runs if r["sampler"] == sampler and r["step_size"] == h]
      rows.append([sampler, h, statistics.median(r["cov_error"] for r in rs),
                   statistics.median(r["mean_error"] for r in rs),
                   1e6 * statistics.median(r["seconds_per_step"] for r in rs)])
  table = harness.markdown_table(["sampler", "step size", "cov error", "mean error (sd)",
                                  "us per step (4 chains)"], rows)
  (out / f"{NAME}.md").write_text(
      f"# {NAME}\n\nMedians over seeds {list(seeds)}, {steps} steps per chain, 4 chains, first "
      f"tenth burn-in.\n\n{table}\n\nMachine: {machine['cpu_model']}, load {machine['loadavg']}."
      "\n")
  return payload


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS)
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  run(args.out, args.quick)


if __name__ == "__main__":
  main()

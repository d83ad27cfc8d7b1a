"""``riemod sample blr``: SGLD, SGWORLD and Riemannian SGLD on the Bayesian linear regression.

By default each setting's stationary covariance is measured with ``blr.conditional_covariance``
(Rao-Blackwellised over the Gaussian draws, chain lengths set from ``--target-error``), and the
table and the log-log plot show the excess error over the full-batch chain against the step size:
SGLD's grows like ``h``, SGWORLD's like ``h^2`` (fitted slopes printed). ``--estimator samples``
runs the plain chains and measures sample moments instead. ``--json`` prints
``{"results": [...], "slopes": {...}}``; a table (``blr_sampling.md``), ``blr_sampling.json`` and a
plot (``blr_sampling.png``) go under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

DEFAULT_OUT = os.path.join("riemod-output", "sample")


def _floats(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError as error:
    raise argparse.ArgumentTypeError(f"{text!r}: pass comma-separated numbers, e.g. 1e-5,3e-5") \
        from error
  if not values or any(not v > 0 for v in values):
    raise argparse.ArgumentTypeError(f"{text!r}: step sizes must be > 0.")
  return values


# --- runners of the sampling study (not library API: the CLI, benchmarks and tests use them) -----

def _imports():
  from riemod import sampling  # pylint: disable=g-import-not-at-top
  from riemod.sampling import blr  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return sampling, blr, jax, jnp


def run_blr(problem, sampler: str, step_size: float, *, seed: int = 0,
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
  sampling, blr, jax, jnp = _imports()
  rate = blr.relaxation_rate(problem, sampler, step_size)
  if num_steps is None:
    num_steps = int(min(max_steps, max(2000, relaxation_times / rate)))
  burn_in = num_steps // 10
  thin = thin or max(1, int(0.25 / rate))
  num_samples = max(1, (num_steps - burn_in) // thin)
  tx, batcher = blr.make_sampler(problem, sampler, step_size, seed=seed)
  params = {"w": jnp.asarray(problem.posterior_mean, problem.x.dtype)}
  start = time.perf_counter()
  result = sampling.sample(tx, params, blr.grad_fn_for(problem, sampler, metric), batcher,
                  key=jax.random.key(seed), num_samples=num_samples, burn_in=burn_in, thin=thin,
                  num_chains=num_chains, collect=lambda p: p["w"],
                  chunk_size=max(1, min(num_samples, 20000)), progress=progress)
  samples = np.asarray(result.samples, np.float64).reshape(-1, problem.dim)
  seconds = time.perf_counter() - start
  errors = sampling.diagnostics.moment_errors(samples, problem.posterior_mean, problem.posterior_cov)
  return {"sampler": sampler, "step_size": float(step_size),
          "cov_error": float(errors["cov_error"]), "mean_error": float(errors["mean_error"]),
          "num_steps": int(burn_in + num_samples * thin), "num_chains": int(num_chains),
          "metric": metric if sampler == "riemannian_sgld" else None,
          "seconds": round(seconds, 3)}


def sweep(samplers: Sequence[str] = ("sgld", "sgworld", "riemannian_sgld"), step_sizes: Sequence[float] = (1e-5, 3e-5),
          seeds: Sequence[int] = (0,), *, problem=None,
          **run_kwargs) -> list[dict[str, Any]]:
  """:func:`run_blr` for every sampler, step size and seed (same data; seeds drive the chains)."""
  _, blr, _, _ = _imports()
  problem = problem or blr.make_blr()
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




def conditional_study(samplers: Sequence[str], step_sizes: Sequence[float], *, problem=None,
                      target_error: float = 0.25, num_chains: int = 4, seed: int = 0,
                      progress: bool = False) -> list[dict[str, Any]]:
  """``blr.conditional_covariance`` for every sampler and step size, lengths from ``target_error``."""
  _, blr, _, _ = _imports()
  problem = problem or blr.make_blr()
  rows = []
  for name in samplers:
    for h in step_sizes:
      steps = blr.steps_for_target(problem, name, h, target_error, num_chains)
      started = time.perf_counter()
      out = blr.conditional_covariance(problem, name, h, num_steps=steps, num_chains=num_chains, seed=seed,
                                       progress=progress)
      rows.append({"sampler": name, "step_size": float(h), "excess_error": out.excess_error,
                   "excess_stderr": out.excess_stderr, "cov_error": out.total_error,
                   "floor_error": out.floor_error, "num_steps": out.num_steps, "num_chains": out.num_chains,
                   "seconds": round(time.perf_counter() - started, 2)})
  return rows


def fitted_slopes(rows, key: str = "excess_error") -> dict[str, float]:
  """Least-squares slope of ``log key`` against ``log h`` per sampler (two or more step sizes)."""
  slopes = {}
  for name in sorted({r["sampler"] for r in rows}):
    pts = [(r["step_size"], r[key]) for r in rows if r["sampler"] == name and r.get(key, 0) > 0]
    if len({h for h, _ in pts}) >= 2:
      h, e = np.log(np.asarray(pts)).T
      slopes[name] = float(np.polyfit(h, e, 1)[0])
  return slopes


def add_parser(subparsers) -> argparse.ArgumentParser:
  parser = subparsers.add_parser(
      "sample", help="Langevin samplers against an exact posterior",
      description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("problem", choices=["blr"], help="the problem (blr: Bayesian linear "
                      "regression, d=5, N=1000, batch 50, exact Gaussian posterior)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--steps", type=_floats, default=[1e-7, 1e-6, 1e-5],
                      help="step sizes h of SGLD and SGWORLD (comma-separated)")
  parser.add_argument("--riemannian-steps", type=_floats, default=[2e-3],
                      help="dimensionless step sizes of Riemannian SGLD (metric G_U = posterior precision)")
  parser.add_argument("--estimator", choices=("conditional", "samples"), default="conditional",
                      help="conditional: stationary covariance Rao-Blackwellised over the Gaussian draws "
                           "(shows the h vs h^2 law); samples: sample moments of plain chains")
  parser.add_argument("--target-error", type=float, default=0.25,
                      help="conditional: relative Monte-Carlo error of each excess error (sets chain lengths)")
  parser.add_argument("--chains", type=int, default=4, help="independent chains per setting")
  parser.add_argument("--seeds", type=int, default=1, help="samples: number of seeds (medians reported)")
  parser.add_argument("--relaxation-times", type=float, default=1500.0,
                      help="samples: chain length in slowest relaxation times (covariance Monte-Carlo "
                           "error ~ sqrt(6 / this))")
  parser.add_argument("--out", default=DEFAULT_OUT, help="folder for blr_sampling.{md,json,png}")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  parser.set_defaults(func=run)
  return parser


def _table(rows, conditional: bool) -> str:
  if conditional:
    lines = ["| sampler | step size h | excess error (+- MC s.e.) | total error | full-batch floor | "
             "steps x chains |", "|---|---|---|---|---|---|"]
    for r in rows:
      lines.append(f"| {r['sampler']} | {r['step_size']:.0e} | {r['excess_error']:.2e} +- "
                   f"{r['excess_stderr']:.1e} | {r['cov_error']:.2e} | {r['floor_error']:.2e} | "
                   f"{r['num_steps']} x {r['num_chains']} |")
    return "\n".join(lines)
  lines = ["| sampler | step size | cov error | mean error (sd) | steps x chains |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['sampler']} | {r['step_size']:.0e} | {r['cov_error']:.3f} | "
                 f"{r['mean_error']:.3f} | {r['num_steps']} x {r['num_chains']} |")
  return "\n".join(lines)


def plot(rows, path: str, slopes=None) -> None:
  """Error against step size (log-log), one line per sampler; excess errors with h and h^2 guides."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  key = "excess_error" if rows and "excess_error" in rows[0] else "cov_error"
  fig, ax = plt.subplots(figsize=(5.6, 4.2))
  styles = {"sgld": ("o-", "SGLD (with replacement)"), "sgworld": ("s-", "SGWORLD (without replacement)"),
            "riemannian_sgld": ("^", "Riemannian SGLD (exact metric)")}
  for name, (style, label) in styles.items():
    pts = sorted((r["step_size"], r[key], r.get("excess_stderr", 0.0)) for r in rows if r["sampler"] == name)
    if not pts:
      continue
    h, err, se = map(np.asarray, zip(*pts))
    if slopes and name in slopes:
      label += f", slope {slopes[name]:.2f}"
    ax.errorbar(h, err, yerr=se, fmt=style, label=label, capsize=2)
  hs = np.asarray(sorted({r["step_size"] for r in rows if r["sampler"] != "riemannian_sgld"}))
  if hs.size >= 2:
    ref = max(r[key] for r in rows if r["step_size"] == hs[-1])
    ax.loglog(hs, ref * hs / hs[-1], "k:", lw=1, label="~ h")
    ax.loglog(hs, ref * (hs / hs[-1]) ** 2, "k--", lw=1, label="~ h^2")
  ax.set(xscale="log", yscale="log", xlabel="step size h",
         ylabel="excess covariance error over full batch" if key == "excess_error" else "covariance error",
         title="Bayesian linear regression, d=5, N=1000, B=50")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(args) -> int:
  if args.seeds < 1 or args.chains < 1:
    print("--seeds and --chains must be >= 1", file=sys.stderr)
    return 2
  if not 0 < args.target_error < 1:
    print(f"--target-error {args.target_error}: pass a relative error in (0, 1), e.g. 0.25", file=sys.stderr)
    return 2
  _, blr, _, _ = _imports()
  problem = blr.make_blr()
  progress = not args.no_progress
  conditional = args.estimator == "conditional"
  if conditional:
    kwargs = dict(problem=problem, target_error=args.target_error, num_chains=args.chains, progress=progress)
    rows = conditional_study(("sgld", "sgworld"), args.steps, **kwargs)
    rows += conditional_study(("riemannian_sgld",), args.riemannian_steps, **kwargs)
    slopes = fitted_slopes([r for r in rows if r["sampler"] != "riemannian_sgld"])
  else:
    seeds = range(args.seeds)
    kwargs = dict(relaxation_times=args.relaxation_times, num_chains=args.chains, progress=progress)
    rows = sweep(("sgld", "sgworld"), args.steps, seeds, problem=problem, **kwargs)
    rows += sweep(("riemannian_sgld",), args.riemannian_steps, seeds, problem=problem, **kwargs)
    rows = summarize(rows)
    slopes = fitted_slopes([r for r in rows if r["sampler"] != "riemannian_sgld"], "cov_error")
  payload = {"estimator": args.estimator, "results": rows, "slopes": slopes}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "blr_sampling.json"), "w") as handle:
    json.dump(payload, handle, indent=1)
  table = _table(rows, conditional)
  slope_text = ", ".join(f"{name} {value:.2f}" for name, value in slopes.items())
  with open(os.path.join(args.out, "blr_sampling.md"), "w") as handle:
    handle.write(table + f"\n\nlog-log slopes of the {'excess' if conditional else 'covariance'} error "
                 f"against h: {slope_text}\n")
  plotted = True
  try:
    plot(rows, os.path.join(args.out, "blr_sampling.png"), slopes)
  except ImportError:
    plotted = False
  if args.json:
    print(json.dumps(payload))
    return 0
  print(table)
  print(f"log-log slopes against h: {slope_text}  (SGLD ~ h: 1, SGWORLD ~ h^2: 2)")
  print(f"wrote {os.path.join(args.out, 'blr_sampling.md')}" + (", blr_sampling.png" if plotted else
        " (matplotlib is not installed: no plot; pip install 'riemod[demo]')"))
  return 0

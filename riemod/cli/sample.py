"""``riemod sample blr``: SGLD, SGWORLD and Riemannian SGLD on the Bayesian linear regression.

Prints ``{"results": [{"sampler", "step_size", "cov_error", "mean_error", ...}, ...]}`` with
``--json`` (medians over seeds); otherwise a table, and a plot and a Markdown table under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _floats(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError as error:
    raise argparse.ArgumentTypeError(f"{text!r}: pass comma-separated numbers, e.g. 1e-5,3e-5") \
        from error
  if not values or any(not v > 0 for v in values):
    raise argparse.ArgumentTypeError(f"{text!r}: step sizes must be > 0.")
  return values


def add_parser(subparsers) -> argparse.ArgumentParser:
  parser = subparsers.add_parser(
      "sample", help="Langevin samplers against an exact posterior",
      description=__doc__.splitlines()[0])
  parser.add_argument("problem", choices=["blr"], help="the problem (blr: Bayesian linear "
                      "regression, d=5, N=1000, batch 50, exact Gaussian posterior)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--steps", type=_floats, default=[1e-5, 3e-5],
                      help="step sizes h of SGLD and SGWORLD (comma-separated; default 1e-5,3e-5)")
  parser.add_argument("--riemannian-steps", type=_floats, default=[2e-3],
                      help="dimensionless step sizes of Riemannian SGLD (metric G_U = posterior "
                      "precision; default 2e-3, where SGLD diverges)")
  parser.add_argument("--seeds", type=int, default=1, help="number of seeds (medians reported)")
  parser.add_argument("--relaxation-times", type=float, default=1500.0,
                      help="chain length in slowest relaxation times (Monte-Carlo error of the "
                      "covariance ~ sqrt(6 / this)); default 1500")
  parser.add_argument("--out", default=".", help="directory for blr_sampling.png and .md")
  parser.add_argument("--progress", action="store_true", help="show progress bars")
  parser.set_defaults(func=run)
  return parser


def _table(rows) -> str:
  lines = ["| sampler | step size | cov error | mean error (sd) | steps x chains |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['sampler']} | {r['step_size']:.0e} | {r['cov_error']:.3f} | "
                 f"{r['mean_error']:.3f} | {r['num_steps']} x {r['num_chains']} |")
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  """Covariance error against step size, one line per sampler (log-log)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  styles = {"sgld": ("o-", "SGLD (with replacement)"),
            "sgworld": ("s-", "SGWORLD (without replacement)"),
            "riemannian_sgld": ("^", "Riemannian SGLD (exact metric)")}
  for name, (style, label) in styles.items():
    pts = sorted((r["step_size"], r["cov_error"], r["mean_error"]) for r in rows
                 if r["sampler"] == name)
    if not pts:
      continue
    h, cov, mean = zip(*pts)
    axes[0].loglog(h, cov, style, label=label)
    axes[1].semilogx(h, mean, style, label=label)
  axes[0].set(xlabel="step size h", ylabel="relative Frobenius error of covariance",
              title="posterior covariance")
  axes[1].set(xlabel="step size h", ylabel="mean error (posterior sd)", title="posterior mean")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(args) -> int:
  from riemod.sampling import blr

  if args.seeds < 1:
    print("--seeds must be >= 1", file=sys.stderr)
    return 2
  problem = blr.make_blr()
  seeds = range(args.seeds)
  kwargs = dict(relaxation_times=args.relaxation_times, num_chains=1, progress=args.progress)
  rows = blr.sweep(("sgld", "sgworld"), args.steps, seeds, problem=problem, **kwargs)
  rows += blr.sweep(("riemannian_sgld",), args.riemannian_steps, seeds, problem=problem,
                    **kwargs)
  summary = blr.summarize(rows)
  if args.json:
    print(json.dumps({"results": summary}))
    return 0
  print(_table(summary))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "blr_sampling.md"), "w") as handle:
    handle.write(_table(summary) + "\n")
  try:
    plot(summary, os.path.join(args.out, "blr_sampling.png"))
    print(f"wrote {os.path.join(args.out, 'blr_sampling.png')}")
  except ImportError:
    print("matplotlib is not installed: no plot (pip install 'riemod[demo]').")
  return 0

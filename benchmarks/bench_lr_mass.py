"""Benchmark: where riemod's steps diverge and where they are best, over learning rate x mass.

A sweep for ``docs/choosing.md``: every pair of a learning-rate grid and a mass grid trains from
the same initialisation on the same batches, and the run's curve says whether it diverged, was
refused (zero updates: the transform's non-finite / precision check skipped the step), stalled or
converged, and how far it got.

Problems (each in its own process, one compilation per problem: learning rate and mass are traced
arguments of one jitted ``lax.scan`` over the steps):

* ``digits-exact``: the digits MLP 64-128-128-10 tanh (float32, batch 128, 100 steps),
  ``riemod.layerwise_natural_gradient`` with the exact softmax Fisher ``softmax_fisher()``;
  measured: the full training-set cross-entropy.
* ``digits-sampled``: the same with the one-label sampled Fisher ``sampled_softmax_fisher(1)``.
* ``pinn``: a small Poisson PINN (``-Laplace u = 2 pi^2 sin(pi x) sin(pi y)`` on the unit square,
  MLP 2-16-16-1 tanh, 12 x 12 interior and 48 boundary points, full batch, float64, 300 steps),
  ``riemod.natural_gradient`` (one block) with the identity output metric on the residuals, i.e.
  damped Gauss-Newton; measured: the relative L2 error of ``u`` on a 50 x 50 grid.

No momentum, no clipping, no line search: the bare step, so the grid shows what learning rate and
mass do by themselves. Results: ``lr_mass.json``, ``lr_mass.md`` and ``lr_mass.png`` (one heat
map per problem).

Usage:
  python -m benchmarks.bench_lr_mass [--problems digits-exact digits-sampled pinn] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEARNING_RATES = (0.03, 0.1, 0.3, 1.0, 2.0)
# The digits grid starts at 1e-6: with mass 1e-8 every float32 step was refused by the transform's
# precision check in a trial run; the float64 PINN goes down to 1e-8.
DIGITS_MASSES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
PROBLEMS = {
    # name: (steps, masses, the measured quantity, the level counted as "reached")
    "digits-exact": (100, DIGITS_MASSES, "train loss", 0.05),
    "digits-sampled": (100, DIGITS_MASSES, "train loss", 0.05),
    "pinn": (300, (1e-8,) + DIGITS_MASSES, "rel. L2 error", 1e-3),
}
SEED = 0


# --------------------------------------------------------------------------- the problems
def _digits(metric_name: str, steps: int):
  """``run(lr, mass) -> (measured per step, update moved per step)`` for the digits MLP."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import riemod
  from benchmarks import mlp, problems

  sizes, activations, batch = [64, 128, 128, 10], ["tanh", "tanh", None], 128
  task = mlp.MLPTask(sizes, activations, mlp.cross_entropy, "labels", batch, steps, lambda *a: {})
  graphdef, params0 = nnx.split(mlp.build_model(sizes, activations, SEED))
  table = jnp.asarray(problems.batch_table(SEED, task.x_train.shape[0], batch, steps))
  metric = (riemod.metrics.softmax_fisher() if metric_name == "exact"
            else riemod.metrics.sampled_softmax_fisher(1))

  def full_loss(p):
    return task.loss(task.apply(p, task.x_train), task.y_train)

  @jax.jit
  def run(lr, mass):
    tx = riemod.layerwise_natural_gradient(lr, mass, on_nonfinite="skip")

    def body(carry, inputs):
      p, s = carry
      idx, i = inputs
      x, t = task.batch(idx)
      loss, grads, curvature = riemod.value_grad_and_curvature(
          nnx.merge(graphdef, p), x, lambda out: task.loss(out, t), metric,
          key=jax.random.fold_in(jax.random.key(SEED), i))
      updates, s = tx.update(grads, s, p, curvature=curvature, value=loss)
      moved = optax.tree_utils.tree_norm(updates) > 0
      p = optax.apply_updates(p, updates)
      return (p, s), (full_loss(p), moved)

    _, (measured, moved) = jax.lax.scan(body, (params0, tx.init(params0)),
                                        (table, jnp.arange(steps)))
    return measured, moved

  return run, float(full_loss(params0))


def _pinn(steps: int):
  """``run(lr, mass) -> (rel. L2 per step, update moved per step)`` for the small PINN."""
  import jax

  jax.config.update("jax_enable_x64", True)  # this process runs the PINN only
  import jax.numpy as jnp
  import numpy as np
  import optax

  import riemod
  from benchmarks import problems
  from benchmarks.task_poisson_pinn import (collocation, half_mean_square, mlp, residual_fn,
                                            u_exact)

  points, flag, weights, test = collocation(12)
  batch = tuple(jnp.asarray(a) for a in (points, flag, weights))
  test = jnp.asarray(test)
  u_test = u_exact(test)
  params0 = [{"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
             for w, b in problems.mlp_init([2, 16, 16, 1], SEED, np.float64)]

  def rel_l2(params):
    u = jax.vmap(lambda p: mlp(params, p))(test)
    return jnp.linalg.norm(u - u_test) / jnp.linalg.norm(u_test)

  @jax.jit
  def run(lr, mass):
    tx = riemod.natural_gradient(lr, mass, on_nonfinite="skip")

    def body(carry, _):
      p, s = carry
      loss, grads, curvature = riemod.value_grad_and_curvature(
          residual_fn, batch, half_mean_square, riemod.metrics.identity(), params=p)
      updates, s = tx.update(grads, s, p, curvature=curvature, value=loss)
      moved = optax.tree_utils.tree_norm(updates) > 0
      p = optax.apply_updates(p, updates)
      return (p, s), (rel_l2(p), moved)

    _, (measured, moved) = jax.lax.scan(body, (params0, tx.init(params0)), None, length=steps)
    return measured, moved

  return run, float(rel_l2(params0))


def classify(measured: list[float], moved: list[bool], initial: float, level: float) -> dict:
  """What a run did: its outcome, final and best values, and the step that first reached ``level``."""
  finite = [v for v in measured if math.isfinite(v)]
  refused = sum(1 for m in moved if not m)
  final = measured[-1]
  if len(finite) < len(measured) or not math.isfinite(final) or final > 2 * initial:
    outcome = "diverged"
  elif refused > len(moved) // 2:
    outcome = "refused"
  elif final > 0.5 * initial:
    outcome = "stalled"
  else:
    outcome = "converged"
  reached = next((i + 1 for i, v in enumerate(measured) if math.isfinite(v) and v < level), None)
  return {"outcome": outcome, "final": final, "best": min(finite) if finite else None,
          "refused_steps": refused, "steps_to_level": reached}


def child(problem: str, progress: bool) -> dict:
  import jax
  import numpy as np
  from tqdm import tqdm

  steps, masses, quantity, level = PROBLEMS[problem]
  t0 = time.perf_counter()
  if problem == "pinn":
    run, initial = _pinn(steps)
  else:
    run, initial = _digits(problem.split("-")[1], steps)
  dtype = np.float64 if problem == "pinn" else np.float32
  jax.block_until_ready(run(dtype(LEARNING_RATES[0]), dtype(masses[0])))  # compile once
  compile_s = time.perf_counter() - t0
  cells = []
  pairs = [(lr, m) for m in masses for lr in LEARNING_RATES]
  for lr, mass in tqdm(pairs, desc=f"{problem} lr x mass", disable=not progress):
    t = time.perf_counter()
    measured, moved = run(dtype(lr), dtype(mass))
    measured = [float(v) for v in np.asarray(measured)]
    cells.append({"learning_rate": lr, "mass": mass,
                  **classify(measured, [bool(v) for v in np.asarray(moved)], initial, level),
                  "seconds": time.perf_counter() - t,
                  "curve_every_10": measured[9::10]})
  return {"problem": problem, "steps": steps, "masses": masses, "quantity": quantity, "level": level,
          "initial": initial, "compile_and_first_run_s": compile_s, "cells": cells}


# --------------------------------------------------------------------------- output
def _best_before(cell: dict, initial: float) -> str:
  """`` (0.047 at 30)``: how far a diverged run got first, when it got below its start (the curve
  is kept every 10 steps)."""
  curve = [v for v in cell["curve_every_10"] if isinstance(v, (int, float)) and math.isfinite(v)]
  if not curve or min(curve) >= initial:
    return ""
  k = min(range(len(curve)), key=curve.__getitem__)
  return f" ({curve[k]:.2g} at {10 * (k + 1)})"


def markdown(result: dict) -> str:
  from benchmarks import harness

  lines = ["# Learning rate x mass (bare riemod steps: no momentum, clipping or line search)", "",
           "Each cell: the measured quantity after the last step, and the outcome when not "
           "converged (**div**: non-finite or above twice the start; in parentheses the best value on "
           "the way when it got below the start, read every 10 steps; **ref**: most steps refused; **stall**: above half "
           "the start). `*` marks the best cell. Steps to the level in brackets.", ""]
  for entry in result["problems"]:
    cells = {(c["learning_rate"], c["mass"]): c for c in entry["cells"]}
    ok = [c for c in entry["cells"] if c["outcome"] == "converged"]
    best = min(ok, key=lambda c: c["final"]) if ok else None
    lines += [f"## {entry['problem']}: {entry['quantity']} after {entry['steps']} steps "
              f"(start {harness.fmt(entry['initial'])}; level {entry['level']:g})", ""]
    rows = []
    for mass in entry["masses"]:
      row = [f"{mass:g}"]
      for lr in LEARNING_RATES:
        c = cells[(lr, mass)]
        text = harness.fmt(c["final"])
        if c["outcome"] == "diverged":
          text = "div" + _best_before(c, entry["initial"])
        elif c["outcome"] != "converged":
          text = {"refused": "ref", "stalled": "stall"}[c["outcome"]] + f" {text}"
        elif c["steps_to_level"] is not None:
          text += f" [{c['steps_to_level']}]"
        if c is best:
          text += " *"
        row.append(text)
      rows.append(row)
    lines += [harness.markdown_table(["mass \\ lr"] + [f"{lr:g}" for lr in LEARNING_RATES], rows),
              "", f"Compilation and first run {entry['compile_and_first_run_s']:.0f} s; one cell "
              f"{min(c['seconds'] for c in entry['cells']):.1f}-"
              f"{max(c['seconds'] for c in entry['cells']):.1f} s.", ""]
  m = result["machine"]
  lines.append(f"Machine: {m.get('cpu_model')}, {m.get('affinity_cores')} cores, backend "
               f"{m.get('backend')}, load {result['loadavg']}, versions {m.get('versions')}, "
               f"git {m.get('git') or result.get('source_note')}, {m.get('time')}.")
  return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, axes = plt.subplots(1, len(result["problems"]), figsize=(4.6 * len(result["problems"]), 4.2))
  axes = np.atleast_1d(axes)
  for ax, entry in zip(axes, result["problems"]):
    cells = {(c["learning_rate"], c["mass"]): c for c in entry["cells"]}
    masses = entry["masses"]
    grid = np.full((len(masses), len(LEARNING_RATES)), np.nan)
    for i, mass in enumerate(masses):
      for j, lr in enumerate(LEARNING_RATES):
        c = cells[(lr, mass)]
        if c["outcome"] != "diverged" and math.isfinite(c["final"]):
          grid[i, j] = math.log10(max(c["final"], 1e-12))
    image = ax.imshow(grid, cmap="viridis_r", origin="lower", aspect="auto")
    for i, mass in enumerate(masses):
      for j, lr in enumerate(LEARNING_RATES):
        c = cells[(lr, mass)]
        label = {"diverged": "div", "refused": "ref", "stalled": "stall"}.get(c["outcome"],
                                                                            f"{c['final']:.1e}")
        ax.text(j, i, label, ha="center", va="center", fontsize=7,
                color="red" if c["outcome"] == "diverged" else "white")
    ax.set_xticks(range(len(LEARNING_RATES)), [f"{lr:g}" for lr in LEARNING_RATES])
    ax.set_yticks(range(len(masses)), [f"{m:g}" for m in masses])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("mass")
    ax.set_title(f"{entry['problem']}: log10 {entry['quantity']}\nafter {entry['steps']} steps",
                 fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
  parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                      help="folder for lr_mass.json, lr_mass.md and lr_mass.png")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--child", choices=list(PROBLEMS), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.child, not args.no_progress)))
    return
  from benchmarks import harness

  load = list(os.getloadavg())
  entries = []
  for problem in args.problems:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_lr_mass", "--child", problem]
                          + (["--no-progress"] if args.no_progress else []),
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=True)
    entries.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  result = {"learning_rates": LEARNING_RATES, "seed": SEED, "problems": entries,
            # Where riemod came from when ROOT is a copy outside git (the machine info has no commit).
            "source_note": os.environ.get("BENCH_SOURCE_NOTE"),
            "loadavg": load + list(os.getloadavg()), "machine": harness.machine_info()}
  args.out.mkdir(parents=True, exist_ok=True)
  harness.write_json(args.out / "lr_mass.json", result)
  (args.out / "lr_mass.md").write_text(markdown(result))
  plot(result, args.out / "lr_mass.png")
  print(markdown(result))


if __name__ == "__main__":
  main()

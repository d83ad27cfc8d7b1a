"""How accurate a float32 step is, against float64, beside riemod's own error estimate.

A tanh MLP 3-40-2 on 16 samples (least squares, identity metric; 240 parameters, d = 32 rows), both
structures, masses 1e-1..1e-8, three seeds. ``push``: the range-aware solve (the gradient's
coordinates in the rows are known); ``woodbury``: the same system with the coordinates dropped, so
the whole gradient goes through the Woodbury subtraction. For each: the measured relative error of
the float32 direction against the float64 one, ``StepReport.error`` (the estimate
``riemod.apply_if_valid`` compares with ``max_error``) and ``lam_max(C)``. The ratios
``error / (eps lam_max(C))`` (Woodbury) and ``error / (eps sqrt(lam_max(C)))`` (push-through) are
the constants docs/method.md quotes. Deterministic; timing-free.

Run: ``python -m benchmarks.bench_precision`` -> results/precision.{json,md}.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import riemod
from benchmarks.harness import machine_info, markdown_table, write_json

RESULTS = Path(__file__).resolve().parent / "results"
MASSES = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8)
SEEDS = (0, 1, 2)


def _problem(seed, dtype, batch=16, width=40):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"l1": {"w": jax.random.normal(k[0], (3, width)), "b": jnp.zeros(width)},
            "l2": {"w": jax.random.normal(k[1], (width, 2)) / np.sqrt(width)}}
  x, t = jax.random.normal(k[2], (batch, 3)), jax.random.normal(k[3], (batch, 2))
  cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)
  f = lambda p, x: jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"]
  return f, cast(params), cast(x), cast(t)


def _direction(f, params, x, t, mass, structure, coordinates):
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
  _, grads, curvature = riemod.value_grad_and_curvature(
      f, x, loss_fn, riemod.metrics.identity(), params=params)
  if not coordinates:
    curvature = dataclasses.replace(curvature, coordinates=None)
  geometry = riemod.Geometry(mass=mass, structure=structure)
  state = geometry.advance(geometry.init(params), grads)
  return geometry.compose(curvature, state).step(grads)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _measure(seed, mass, structure, coordinates):
  f, p32, x32, t32 = _problem(seed, jnp.float32)
  d32, report = _direction(f, p32, x32, t32, mass, structure, coordinates)
  # The float64 reference solves the float32 problem exactly (same rounded inputs).
  up = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
  d64, _ = _direction(f, up(p32), up(x32), up(t32), mass, structure, coordinates)
  a, b = ravel_pytree(d32)[0].astype(jnp.float64), ravel_pytree(d64)[0]
  return jnp.linalg.norm(a - b) / jnp.linalg.norm(b), jnp.max(report.error), jnp.max(report.condition)


def main() -> None:
  jax.config.update("jax_enable_x64", True)
  eps = float(np.finfo(np.float32).eps)
  rows, records = [], []
  for structure in ("full", "layerwise"):
    for solve in ("push", "woodbury"):
      for mass in MASSES:
        runs = [tuple(map(float, _measure(s, mass, structure, solve == "push"))) for s in SEEDS]
        actual, estimate, lam = (np.array(v) for v in zip(*runs))
        scale = eps * (np.sqrt(lam) if solve == "push" else lam)
        records.append(dict(structure=structure, solve=solve, mass=mass, actual=actual.tolist(),
                            estimate=estimate.tolist(), lam_max_capacitance=lam.tolist(),
                            constant=(actual / scale).tolist(),
                            estimate_over_actual=(estimate / actual).tolist()))
        rows.append([structure, solve, f"{mass:.0e}", f"{lam.min():.1e}-{lam.max():.1e}",
                     f"{actual.min():.1e}-{actual.max():.1e}",
                     f"{estimate.min():.1e}-{estimate.max():.1e}",
                     f"{(actual / scale).min():.3f}-{(actual / scale).max():.3f}",
                     f"{(estimate / actual).min():.1f}-{(estimate / actual).max():.1f}",
                     "yes" if np.all(estimate >= actual) else "NO"])
        print(" | ".join(rows[-1]), flush=True)
  RESULTS.mkdir(exist_ok=True)
  write_json(RESULTS / "precision.json", dict(machine=machine_info(), seeds=list(SEEDS),
                                              records=records))
  header = ["structure", "solve", "mass", "lam_max(C)", "float32 error", "estimate",
            "error / (eps lam) or / (eps sqrt(lam))", "estimate / error", "bounds"]
  text = ("# Float32 step error against float64, and riemod's estimate\n\n"
          "`python -m benchmarks.bench_precision` (3 seeds, ranges over seeds; deterministic, "
          "machine-independent up to BLAS round-off). `push`: range-aware solve; `woodbury`: "
          "coordinates dropped. Constant column: error / (eps lam_max(C)) for Woodbury, "
          "error / (eps sqrt(lam_max(C))) for push-through.\n\n" + markdown_table(header, rows) + "\n")
  (RESULTS / "precision.md").write_text(text)


if __name__ == "__main__":
  main()

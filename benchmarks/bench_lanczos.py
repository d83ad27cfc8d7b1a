"""What five Lanczos steps cost outside their operators (the controller's estimate bookkeeping).

:func:`riemod.certify.top_ritz_pair` with operators that cost almost nothing (diagonal ``H``,
scalar ``G``), so what is timed is the Gram-Schmidt passes, the restart direction, the Ritz
problem and the copies: the part of an estimate that does not shrink with a cheaper model. The
restart direction after a breakdown (a cosine pattern, orthogonalised) is computed in a
``lax.cond`` branch taken only on a breakdown, as riemod does, and as a select computed on every
step (riemod before); ``no restart`` replaces it by the unorthogonalised zero vector (a floor,
not a valid Lanczos). Float32, median of 5 rounds of 100 calls each, one process.

Run: ``python -m benchmarks.bench_lanczos`` -> ``results/lanczos.{json,md}``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from riemod.certify import lanczos

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (1_000, 25_000, 100_000)
STEPS, ROUNDS, CALLS = 5, 5, 100


def _select(pred, on_true, on_false):
  """``lax.cond`` as a select: both branches computed (riemod's restart before the branch)."""
  return jnp.where(pred, on_true(), on_false())


def _time(n: int, variant: str) -> tuple[float, list[float]]:
  """Median ms per call (and range over rounds) of ``top_ritz_pair`` on ``n`` parameters."""
  patched = {"select (before)": ("cond", _select),
             "no restart (floor)": ("cond", lambda pred, on_true, on_false: on_false())}
  name, replacement = patched.get(variant, (None, None))
  original = jax.lax.cond
  if name:
    jax.lax.cond = replacement
  try:
    h = jnp.linspace(1.0, 2.0, n, dtype=jnp.float32)
    run = jax.jit(lambda v: lanczos.top_ritz_pair(lambda u: u * h, lambda u: u / 1.01,
                                                  lambda u: u * 1.01, v, STEPS))
    v = jnp.ones(n, jnp.float32)
    jax.block_until_ready(run(v))
  finally:
    jax.lax.cond = original
  rounds = []
  for _ in range(ROUNDS):
    start = time.perf_counter()
    for _ in range(CALLS):
      out = run(v)
    jax.block_until_ready(out)
    rounds.append((time.perf_counter() - start) / CALLS * 1e3)
  return float(np.median(rounds)), [float(min(rounds)), float(max(rounds))]


def main() -> None:
  load = [os.getloadavg()[0]]
  variants = ("branch (riemod)", "select (before)", "no restart (floor)")
  rows = [{"n": n, "variant": name, "ms": ms, "range": spread}
          for n in SIZES for name in variants for ms, spread in [_time(n, name)]]
  load.append(os.getloadavg()[0])
  payload = {"machine": harness.machine_info(), "load": load, "steps": STEPS, "rows": rows}
  harness.write_json(RESULTS / "lanczos.json", payload)
  text = ("# Lanczos bookkeeping: five steps outside their operators\n\n"
          + __doc__.split("\n\n")[1].replace("\n", " ")
          + f"\n\nLoad (1 min) before and after: {[round(x, 2) for x in load]}. 2-core CPU, "
          "`OPENBLAS_NUM_THREADS=1`.\nReproduce: `python -m benchmarks.bench_lanczos`.\n\n"
          "| parameters | restart after a breakdown | ms per estimate (median, range over rounds) |\n"
          "|---|---|---|\n")
  for row in rows:
    text += (f"| {row['n']:,} | {row['variant']} | {row['ms']:.3f} "
             f"({row['range'][0]:.3f}-{row['range'][1]:.3f}) |\n")
  (RESULTS / "lanczos.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()

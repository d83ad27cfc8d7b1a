"""What the loss-derived output metric and the scale check cost.

The MLP 64-128-128-C (tanh, ``riemod.nn.dense``) on a batch of 128, layerwise natural gradient,
for a classifier (cross-entropy, C = 10; declared ``softmax_fisher()``) and a regressor
(per-sample-mean squared error, C = 8; declared ``identity()``). For each: the declared metric
with the scale check off (the reference), with it on (one extra product with the loss Hessian
and a host callback per step), and ``metrics.from_loss()`` (the default: C Hessian products and
128 eigendecompositions of C x C per step). Timed twice: the whole jitted optimizer step, and
``value_grad_and_curvature`` alone (where the difference lives). Interleaved bursts
(``benchmarks.harness.time_interleaved``), ratios to the reference in the same round.

Run: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.bench_loss_metric`` ->
results/loss_metric.{json,md}.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import riemod
from benchmarks.harness import machine_info, time_interleaved, write_json

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 128


def _mlp(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return {f"l{i}": {"kernel": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "bias": jnp.zeros(b)}
          for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}


def _f(p, x):
  h = jnp.tanh(riemod.nn.dense(p["l0"], x))
  h = jnp.tanh(riemod.nn.dense(p["l1"], h))
  return riemod.nn.dense(p["l2"], h)


def _tasks():
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (BATCH, 64))
  labels = jax.random.randint(k[1], (BATCH,), 0, 10)
  targets = jax.random.normal(k[2], (BATCH, 8))
  return {
      "classifier (cross-entropy, C = 10)": (
          x, _mlp(k[3], (64, 128, 128, 10)), riemod.metrics.softmax_fisher(),
          lambda y: optax.softmax_cross_entropy_with_integer_labels(y, labels).mean()),
      "regressor (squared error, C = 8)": (
          x, _mlp(k[3], (64, 128, 128, 8)), riemod.metrics.identity(),
          lambda y: 0.5 * jnp.mean(jnp.sum((y - targets) ** 2, -1))),
  }


def main() -> None:
  tx = riemod.layerwise_natural_gradient(0.1, mass=1e-2)
  load_before = os.getloadavg()
  rows = []
  for task, (x, params, declared, loss_fn) in _tasks().items():
    variants = {f"{declared.name}, check off": (declared, False),
                f"{declared.name}, check on": (declared, True),
                "from_loss()": (riemod.metrics.from_loss(), True)}
    for scope in ("optimizer step", "value_grad_and_curvature"):
      fns = {}
      for name, (metric, check) in variants.items():
        def measure(p, metric=metric, check=check):
          return riemod.value_grad_and_curvature(_f, x, loss_fn, metric, params=p,
                                                 check_metric=check)

        def step(p, opt_state, measure=measure):
          _, g, curv = measure(p)
          return tx.update(g, opt_state, p, curvature=curv)

        args = (params, tx.init(params)) if scope == "optimizer step" else (params,)
        fn = step if scope == "optimizer step" else measure
        fns[name] = (jax.jit(fn).lower(*args).compile(), args)
      reference = next(iter(variants))
      timing = time_interleaved(fns, rounds=7, burst=5, reference=reference)
      for name in variants:
        rows.append({"task": task, "scope": scope, "case": name,
                     "ms": 1e3 * timing[name]["median_seconds"],
                     "ratio": timing[name]["ratio"], "ratio_spread": timing[name]["ratio_spread"]})
  load = {"before": load_before, "after": os.getloadavg()}
  write_json(RESULTS / "loss_metric.json", {"machine": machine_info(), "load": load, "rows": rows})
  lines = ["# Output metric from the loss, and the scale check: cost per step",
           "",
           f"MLP 64-128-128-C (tanh, riemod.nn.dense), batch {BATCH}, layerwise natural gradient, "
           "float32. Ratios: median over 7 interleaved rounds of (burst median / the declared "
           "metric with the check off in the same round), spread = min-max over rounds.",
           "",
           f"Machine: {os.cpu_count()}-core CPU, load average {load_before[0]:.1f} before, "
           f"{load['after'][0]:.1f} after (other jobs were running).",
           "",
           "Reproduce: `OPENBLAS_NUM_THREADS=1 python -m benchmarks.bench_loss_metric`.",
           "",
           "| task | timed | case | ms | ratio (spread) |", "| --- | --- | --- | --- | --- |"]
  for r in rows:
    lo, hi = r["ratio_spread"]
    lines.append(f"| {r['task']} | {r['scope']} | {r['case']} | {r['ms']:.2f} | "
                 f"{r['ratio']:.3g} ({lo:.3g}-{hi:.3g}) |")
  (RESULTS / "loss_metric.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

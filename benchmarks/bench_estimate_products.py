"""The controller's estimate with and without a metric product per Lanczos step.

Generalised Lanczos keeps its basis ``G``-orthonormal with ``G q`` for every new direction.
Where the solve is ``G^{-1}``, ``G w = H q - (G Q) c`` follows from the solve already made
(:func:`riemod.certify.top_ritz_pair` with ``metric_products=False``, which the controller uses
when ``Geometry.exact_solve``). This measures both on the digits autoencoder at the certified
defaults (riemod's own operators: the Gauss-Newton product over the batch, the Kronecker-mass
``G`` of the sketched curvature): milliseconds per jitted estimate (curvature, ``G``'s
factorisation, five Lanczos steps; interleaved, median over rounds) and, at every 10th step of a
200-step run from seed 0, the ratio of the two estimates from the same warm start (the identity
is exact up to the solve's error).

Run: ``python -m benchmarks.bench_estimate_products`` -> ``results/estimate_products.{json,md}``.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import jax
from flax import nnx
from jax.flatten_util import ravel_pytree

import riemod
from benchmarks import harness, problems, riemod_config
from benchmarks import task_tuning_free as tuning_free
from riemod.certify.contraction import gauss_newton_product
from riemod.certify.lanczos import top_ritz_pair

RESULTS = Path(__file__).resolve().parent / "results"
TASK, SEED, RUN_STEPS, EVERY, ROUNDS = "digits-autoencoder", 0, 200, 10, 50


def _estimators(mlp_task, keys):
  """``{metric_products: jitted (params, opt_state, batch index, start) -> (lam, vector)}``."""
  metric = riemod_config.output_metric(keys["output_metric"])
  geometry = riemod.certify.certified_geometry("layerwise")

  def estimate(params, opt_state, idx, start, metric_products):
    x, target = mlp_task.batch(idx)
    loss_fn = lambda out: mlp_task.loss(out, target)
    model = nnx.merge(mlp_task.graphdef, params)
    _, _, curvature = riemod.value_grad_and_curvature(
        model, x, loss_fn, metric, key=jax.random.key(0), curvature_batch=keys["curvature_batch"])
    state = riemod.find_state(opt_state, riemod.MetricState).geometry
    g = geometry.compose(curvature, state)
    flat, unravel = ravel_pytree(params)
    ravel = lambda tree: ravel_pytree(tree)[0]
    hvp = gauss_newton_product(lambda f: nnx.merge(mlp_task.graphdef, unravel(f))(x), flat,
                               loss_fn)
    return top_ritz_pair(hvp, lambda v: ravel(g.solve(unravel(v))),
                         lambda v: ravel(g.matvec(unravel(v))), start, 5,
                         metric_products=metric_products)

  return {m: jax.jit(lambda p, o, i, s, m=m: estimate(p, o, i, s, m)) for m in (True, False)}


def main() -> None:
  load = [os.getloadavg()[0]]
  module, _, mlp_task = tuning_free._digits_task(TASK, False)
  tuned = tuning_free.tuned_config(TASK, module)
  keys = {k: tuned.get(k) for k in ("output_metric", "curvature_batch")}
  trainer = tuning_free.certified_trainer(mlp_task, "riemod-certified", dict(keys), SEED)
  estimators = _estimators(mlp_task, keys)
  table = problems.batch_table(SEED, mlp_task.x_train.shape[0], mlp_task.batch_size, RUN_STEPS)
  state, ratios, start = trainer.init(), [], None
  for i in range(RUN_STEPS):
    if i % EVERY == 0:
      controller = riemod.find_state(state[1], riemod.certify.ControllerState)
      start = ravel_pytree(controller.vector)[0]
      lam = {m: float(f(state[0], state[1], table[i], start)[0]) for m, f in estimators.items()}
      ratios.append({"step": i, "products": lam[True], "solves": lam[False],
                     "ratio": lam[False] / lam[True]})
    state, _ = trainer.step(state, i)
  times = {m: [] for m in estimators}
  for r in range(ROUNDS):
    for m in (True, False) if r % 2 else (False, True):
      begin = time.perf_counter()
      jax.block_until_ready(estimators[m](state[0], state[1], table[r % len(table)], start))
      times[m].append((time.perf_counter() - begin) * 1e3)
  load.append(os.getloadavg()[0])
  ms = {m: statistics.median(v) for m, v in times.items()}
  per_round = [b / a for a, b in zip(times[True], times[False])]
  spread = [min(r["ratio"] for r in ratios), max(r["ratio"] for r in ratios)]
  payload = {"machine": harness.machine_info(), "load": load, "task": TASK, "seed": SEED,
             "ms": {"a metric product per step": ms[True], "products from the solves": ms[False]},
             "ms_range": {"a metric product per step": [min(times[True]), max(times[True])],
                          "products from the solves": [min(times[False]), max(times[False])]},
             "time_ratio_median": statistics.median(per_round), "estimates": ratios,
             "estimate_ratio_range": spread}
  harness.write_json(RESULTS / "estimate_products.json", payload)
  text = ("# The controller's estimate: a metric product per Lanczos step, or from the solves\n\n"
          + __doc__.split("\n\n")[1].replace("\n", " ")
          + f"\n\nLoad (1 min) before and after: {[round(x, 2) for x in load]}. 2-core CPU, "
          "`OPENBLAS_NUM_THREADS=1`.\nReproduce: `python -m benchmarks.bench_estimate_products`."
          "\n\n| G products | ms per estimate (median, range over rounds) |\n|---|---|\n")
  for name, value in payload["ms"].items():
    low, high = payload["ms_range"][name]
    text += f"| {name} | {value:.3f} ({low:.3f}-{high:.3f}) |\n"
  text += (f"\nTime ratio (from the solves / a product per step), median over {ROUNDS} "
           f"interleaved rounds: {payload['time_ratio_median']:.3f}.\n\n"
           f"Estimate from the solves / with products, at {len(ratios)} states along the run: "
           f"{spread[0]:.7f} to {spread[1]:.7f}.\n")
  (RESULTS / "estimate_products.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()

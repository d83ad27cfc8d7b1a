"""Benchmark: the full certificate of the digits MLP against one training step; action tracking.

Targets (issue 3): the full certificate (all modules, 20 Lanczos steps, one batch of 128) takes at
most 20x one training step; tracking the action during training costs under 2 percent of a step.

Method: everything is compiled first; then the timed variants are interleaved (a, b, a, b, ...)
so that load on the machine hits them alike, and the median over repeats is reported.

* ``step``: one jitted ``nnx`` training step (curvature, layerwise Woodbury solve, update).
* ``certify``: one call of :func:`riemod.certify.certify` (host checks, the compiled measurement,
  the report), learning rate 0.1, mass 1e-2, 20 Lanczos steps, 20 power iterations.
* ``step + action``: the step with ``value=loss`` passed and the action gap read on device, against
  the step without ``value`` (the transform accumulates ``g^T G^{-1} g`` either way: it comes with
  the solve, so this measures what a user adds by tracking the action).

Usage:
  python -m benchmarks.bench_certify [--repeats 15] [--label local-cpu] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _versions() -> dict:
  import flax
  import jax
  import numpy
  import optax

  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": numpy.__version__}


def _machine() -> dict:
  import jax

  device = jax.devices()[0]
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
          "device": getattr(device, "device_kind", str(device)),
          "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--label", default=None, help="name of this run (default: backend)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import riemod
  from riemod.certify import certify
  from riemod.data import load_digits

  data = load_digits()
  x, y = jnp.asarray(data.x_train[:128]), jnp.asarray(data.y_train[:128])
  rngs = nnx.Rngs(0)
  model = riemod.nn.Sequential(riemod.nn.Dense(64, 128, rngs=rngs), jnp.tanh,
                               riemod.nn.Dense(128, 128, rngs=rngs), jnp.tanh,
                               riemod.nn.Dense(128, 10, rngs=rngs))
  metric = riemod.metrics.softmax_fisher()
  loss_fn = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  lr, mass = 0.1, 1e-2
  geometry = riemod.Geometry(mass=mass)
  tx = riemod.layerwise_natural_gradient(lr, geometry=geometry)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = tx.init(params)

  def make_step(track: bool):
    @jax.jit
    def step(params, state):
      loss, grads, curv = riemod.value_grad_and_curvature(nnx.merge(graphdef, params, rest), x,
                                                          loss_fn, metric)
      kwargs = {"value": loss} if track else {}
      updates, state = tx.update(grads, state, params, curvature=curv, **kwargs)
      params = optax.apply_updates(params, updates)
      if track:
        inner = riemod.find_state(state, riemod.ActionState)
        gap = inner.action - (inner.initial_loss - inner.last_loss)
        return params, state, gap
      return params, state, loss
    return step

  plain, tracked = make_step(False), make_step(True)
  block = jax.block_until_ready
  t0 = time.perf_counter()
  block(plain(params, state))
  block(tracked(params, state))
  compile_step = time.perf_counter() - t0
  t0 = time.perf_counter()
  certify(model, x, loss_fn, metric, learning_rate=lr, geometry=geometry, opt_state=state,
          num_lanczos=20, dataset_size=1500)
  compile_certify = time.perf_counter() - t0

  # The compiled measurement alone (no host checks, no report), to split host overhead off.
  from riemod.certify import certificate as rc
  signature = (str(jax.tree.structure(params)),
               tuple((l.shape, str(l.dtype)) for l in jax.tree.leaves((params, rest, x))))
  geometry_state = riemod.find_state(state, riemod.MetricState).geometry
  core_args = (signature, "nnx", graphdef, loss_fn, metric, geometry, 20, 20, params, rest, x,
               jnp.asarray(lr, jnp.result_type(float)), geometry_state, jax.random.key(0))
  core = lambda: block(rc._measure_jit(*core_args))
  core()
  times = {"step": [], "step_tracked": [], "certify": [], "certify_core": []}
  for _ in range(args.repeats):
    times["step"].append(_timed(lambda: block(plain(params, state))))
    times["step_tracked"].append(_timed(lambda: block(tracked(params, state))))
    times["certify"].append(_timed(lambda: certify(
        model, x, loss_fn, metric, learning_rate=lr, geometry=geometry, opt_state=state,
        num_lanczos=20, dataset_size=1500)))
    times["certify_core"].append(_timed(core))
    times["step"].append(_timed(lambda: block(plain(params, state))))
  median = {k: statistics.median(v) for k, v in times.items()}
  ratio = median["certify"] / median["step"]
  overhead = (median["step_tracked"] - median["step"]) / median["step"]
  result = {
      "machine": _machine(), "versions": _versions(), "repeats": args.repeats,
      "setup": {"model": "digits MLP 64-128-128-10 tanh", "batch": 128, "lanczos_steps": 20,
                "power_iterations": 20, "learning_rate": lr, "mass": mass,
                "output_metric": "softmax_fisher", "structure": "layerwise"},
      "median_seconds": median,
      "compile_seconds": {"step (both variants)": compile_step, "certify": compile_certify},
      "certify_over_step": ratio, "certify_target": 20.0, "certify_ok": ratio <= 20.0,
      "action_tracking_overhead": overhead, "action_target": 0.02,
      "action_ok": overhead < 0.02,
  }
  label = args.label or f"{jax.default_backend()}"
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "certify.json")
  runs = {}
  if os.path.exists(path):
    with open(path) as handle:
      runs = json.load(handle).get("runs", {})
  runs[label] = result
  with open(path, "w") as handle:
    json.dump({"benchmark": "bench_certify", "runs": runs}, handle, indent=1)
  lines = ["# Certificate cost (benchmarks/bench_certify.py)", "",
           "Median wall time after compilation, variants interleaved. Targets: certificate <= 20x "
           "a training step; action tracking < 2% of a step.", "",
           "| run | device | jax | step (ms) | certificate (ms) | ratio | compiled part (ms) | "
           "tracked step (ms) | action overhead | load avg |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in sorted(runs.items()):
    m = r["median_seconds"]
    load = r["machine"].get("load_average")
    core_ms = f"{1e3 * m['certify_core']:.1f}" if "certify_core" in m else "-"
    lines.append(
        f"| {name} | {r['machine']['device']} ({r['machine']['cpu_count']} CPUs) | "
        f"{r['versions']['jax']} | {1e3 * m['step']:.2f} | {1e3 * m['certify']:.1f} | "
        f"{r['certify_over_step']:.2f}x | "
        f"{core_ms} | "
        f"{1e3 * m['step_tracked']:.2f} | "
        f"{100 * r['action_tracking_overhead']:+.2f}% | "
        f"{'-' if load is None else f'{load[0]:.1f}'} |")
  lines += ["", "Compile times (s), not in the ratios: " + "; ".join(
      f"{name}: step {r['compile_seconds']['step (both variants)']:.1f}, certify "
      f"{r['compile_seconds']['certify']:.1f}" for name, r in sorted(runs.items())), ""]
  with open(os.path.join(args.out, "certify.md"), "w") as handle:
    handle.write("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

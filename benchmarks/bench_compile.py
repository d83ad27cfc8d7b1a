"""Compile time of one training step: riemod against Adam, and where riemod's time goes.

The MLP of bench_plain_function (64-128-128-10, tanh, B = 128), one jitted step each:

* Adam on the plain function (the reference);
* riemod, layerwise, exact softmax Fisher: NNX model, plain function with ``riemod.nn.dense``;
* riemod, layerwise, sampled softmax Fisher (one sample), plain function;
* the exact plain-function step cut into stages: the curvature measurement alone, measurement +
  factorisation (``Geometry.compose``), and the whole optax chain (``layerwise_natural_gradient``:
  solve, error estimate, validity check).

For each: trace + lowering seconds, XLA compile seconds (wall and this process's CPU seconds,
which a busy machine disturbs less), the StableHLO op count and its while loops, conditionals and
custom calls (LAPACK). Cases are interleaved over rounds (order rotated) and the median is
reported with the spread; the load average is recorded before and after.

Run: ``python -m benchmarks.bench_compile [--label NAME] [--rounds 3]`` ->
results/compile.{json,md}; rows of earlier labels in compile.json are kept, so a "before" and an
"after" label sit side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import jax
import optax
from flax import nnx

import riemod
from benchmarks.bench_plain_function import _generic, _problem, _structured
from benchmarks.harness import machine_info, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def _cases() -> dict:
  x, loss_fn, model, params = _problem()
  exact, sampled = riemod.metrics.softmax_fisher(), riemod.metrics.sampled_softmax_fisher()
  tx = riemod.layerwise_natural_gradient(0.1, mass=1e-2)
  geometry = riemod.Geometry(mass=1e-2)
  graphdef, state = nnx.split(model, nnx.Param)
  key = jax.random.key(0)

  def measure(f, p, metric):
    return riemod.value_grad_and_curvature(f, x, loss_fn, metric, params=p, key=key,
                                           check_metric=False)

  def plain_step(metric):
    def step(p, opt_state):
      _, g, curv = measure(_structured, p, metric)
      return tx.update(g, opt_state, p, curvature=curv)
    return step

  def nnx_step(s, opt_state):
    _, g, curv = riemod.value_grad_and_curvature(nnx.merge(graphdef, s), x, loss_fn, exact,
                                                 check_metric=False)
    return tx.update(nnx.as_pure(g), opt_state, curvature=curv)

  def curvature_only(p, opt_state):
    del opt_state
    return measure(_structured, p, exact)[1:]

  def factored(p, opt_state):
    del opt_state
    _, g, curv = measure(_structured, p, exact)
    metric = geometry.compose(curv, geometry.init(p))
    return [b.chol for b in metric.blocks], g

  adam = optax.adam(1e-2)

  def adam_step(p, opt_state):
    g = jax.grad(lambda q: loss_fn(_generic(q, x)))(p)
    return adam.update(g, opt_state, p)

  opt_plain, opt_nnx = tx.init(params), tx.init(nnx.as_pure(state))
  return {
      "adam (plain function)": (adam_step, (params, adam.init(params))),
      "riemod exact, NNX": (nnx_step, (state, opt_nnx)),
      "riemod exact, plain (nn.dense)": (plain_step(exact), (params, opt_plain)),
      "riemod sampled, plain (nn.dense)": (plain_step(sampled), (params, opt_plain)),
      "stage: curvature only": (curvature_only, (params, opt_plain)),
      "stage: curvature + factorisation": (factored, (params, opt_plain)),
  }


def _count(text: str, op: str) -> int:
  return len(re.findall(rf"\b{re.escape(op)}\b", text))


def _measure(fn, args) -> dict:
  jax.clear_caches()  # every round traces, lowers and compiles afresh
  wall, cpu = time.perf_counter(), time.process_time()
  lowered = jax.jit(fn).trace(*args).lower()
  lower_wall, lower_cpu = time.perf_counter() - wall, time.process_time() - cpu
  wall, cpu = time.perf_counter(), time.process_time()
  lowered.compile()
  compile_wall, compile_cpu = time.perf_counter() - wall, time.process_time() - cpu
  text = lowered.as_text()
  return {"lower_s": lower_wall, "lower_cpu_s": lower_cpu, "compile_s": compile_wall,
          "compile_cpu_s": compile_cpu,
          "hlo_ops": len(re.findall(r"= (?:stablehlo|chlo|func)\.", text)),
          "while_loops": _count(text, "stablehlo.while"),
          "conditionals": _count(text, "stablehlo.case") + _count(text, "stablehlo.if"),
          "custom_calls": _count(text, "stablehlo.custom_call")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--label", default="current", help="name of this run's column (default: "
                      "current)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
  parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: "
                      "benchmarks/results)")
  args = parser.parse_args()
  cases = _cases()
  load_before = list(os.getloadavg())
  runs: dict[str, list[dict]] = {name: [] for name in cases}
  names = list(cases)
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn, fn_args = cases[name]
      runs[name].append(_measure(fn, fn_args))
      print(f"round {r} {name}: lower {runs[name][-1]['lower_s']:.2f} s, compile "
            f"{runs[name][-1]['compile_s']:.2f} s", flush=True)
  rows = []
  for name, results in runs.items():
    row = {"case": name, "label": args.label}
    for key in ("lower_s", "lower_cpu_s", "compile_s", "compile_cpu_s"):
      values = [r[key] for r in results]
      row[key] = statistics.median(values)
      row[key + "_spread"] = [min(values), max(values)]
    for key in ("hlo_ops", "while_loops", "conditionals", "custom_calls"):
      row[key] = results[0][key]
    rows.append(row)
  adam = next(r for r in rows if r["case"].startswith("adam"))
  for row in rows:
    row["total_to_adam"] = ((row["lower_s"] + row["compile_s"])
                            / (adam["lower_s"] + adam["compile_s"]))
  machine = machine_info()
  machine["loadavg_before"] = load_before
  path = args.out / "compile.json"
  previous = json.loads(path.read_text())["runs"] if path.exists() else []
  previous = [run for run in previous if run["label"] != args.label]
  write_json(path, {"runs": previous + [{"label": args.label, "machine": machine,
                                         "rounds": args.rounds, "rows": rows}]})
  _write_markdown(args.out, previous + [{"label": args.label, "machine": machine,
                                         "rounds": args.rounds, "rows": rows}])


def _write_markdown(out: Path, runs: list[dict]) -> None:
  lines = ["# Compile time of one step (MLP 64-128-128-10, B = 128, layerwise)", "",
           "Medians over interleaved rounds (spread in brackets); compile CPU s is this "
           "process's CPU time (less sensitive to other processes than wall time). "
           "total / Adam = (lower + compile) wall over Adam's.", ""]
  for run in runs:
    m = run["machine"]
    lines += [f"## {run['label']} ({run['rounds']} rounds, {m.get('git')}, {m.get('time')})", "",
              f"2-core CPU ({m.get('cpu_model')}); load average before "
              f"{[round(v, 1) for v in m.get('loadavg_before', [])]}, after "
              f"{[round(v, 1) for v in m.get('loadavg', [])]}", "",
              "| case | lower s | compile s (spread) | compile CPU s | total / Adam | HLO ops | "
              "while | cond | LAPACK calls |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in run["rows"]:
      lo, hi = r["compile_s_spread"]
      lines.append(f"| {r['case']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} ({lo:.2f}-{hi:.2f}) "
                   f"| {r['compile_cpu_s']:.2f} | {r['total_to_adam']:.1f} | {r['hlo_ops']} | "
                   f"{r['while_loops']} | {r['conditionals']} | {r['custom_calls']} |")
    by_case = {r["case"]: r for r in run["rows"]}
    adam, step = by_case["adam (plain function)"], by_case["riemod exact, plain (nn.dense)"]
    factored = by_case["stage: curvature + factorisation"]
    lines += ["", f"Compile CPU: riemod exact (plain) / Adam = "
              f"{step['compile_cpu_s'] / adam['compile_cpu_s']:.1f}x; measurement + "
              f"factorisation {factored['compile_cpu_s']:.2f} s of the step's "
              f"{step['compile_cpu_s']:.2f} s, the rest is the solve with its condition and error "
              "estimates, the jittered-refactorisation branches and the validity check.", ""]
  (out / "compile.md").write_text("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()

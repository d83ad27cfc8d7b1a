"""Compile time of one training step: riemod against Adam, and where riemod's time goes.

The MLP of bench_plain_function (64-128-128-10, tanh, B = 128), one jitted step each:

* Adam on the plain function (the reference);
* riemod, layerwise, exact softmax Fisher: NNX model, plain function with ``riemod.nn.dense``;
* riemod, layerwise, sampled softmax Fisher (one sample), plain function;
* the exact plain-function step cut into stages, each including the ones before: the curvature
  measurement alone, + factorisation (``Geometry.compose``), + the Woodbury solve
  (``ComposedMetric.solve``), + the optimizer's direction with its estimates
  (``ComposedMetric.step``), + the optax chain without the validity check
  (``on_nonfinite="ignore"``); the whole step is the plain row above;
* two variants of the whole step, for measurement only (patched while tracing): the
  jitter-escalation failure branches cut out (``BlockFactorization._with_factor`` on the plain
  factor), which shows what those branches cost; and ``apply_if_valid``'s finiteness check as
  one reduction per dtype over the concatenated leaves instead of one per leaf.

For each: trace + lowering seconds, XLA compile seconds (wall and this process's CPU seconds,
which a busy machine disturbs less), the StableHLO op count and its while loops, conditionals and
custom calls (LAPACK). Cases are interleaved over rounds (order rotated) and the median is
reported with the spread; the load average is recorded before and after.

``--revisions before=REV after=REV`` compares git revisions of riemod (exported with ``git
archive``) in alternating worker processes, round by round, with this file's cases.

Run: ``python -m benchmarks.bench_compile [--label NAME] [--rounds 3]
[--revisions LABEL=REV ...]`` -> results/compile.{json,md}; rows of earlier labels in compile.json
are kept, so a "before" and an "after" label sit side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx

import riemod
from benchmarks.bench_plain_function import _generic, _problem, _structured
from benchmarks.harness import machine_info, write_json

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


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

  def composed(p):
    _, g, curv = measure(_structured, p, exact)
    return geometry.compose(curv, geometry.init(p)), g

  def factored(p, opt_state):
    del opt_state
    metric, g = composed(p)
    return [b.chol for b in metric.blocks], g

  def solved(p, opt_state):
    del opt_state
    metric, g = composed(p)
    return metric.solve(g)

  def directed(p, opt_state):
    del opt_state
    metric, g = composed(p)
    return metric.step(g)

  unchecked = riemod.layerwise_natural_gradient(0.1, mass=1e-2, on_nonfinite="ignore")

  def unchecked_step(p, opt_state):
    _, g, curv = measure(_structured, p, exact)
    return unchecked.update(g, opt_state, p, curvature=curv)

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
      "stage: + Woodbury solve": (solved, (params, opt_plain)),
      "stage: + direction and estimates": (directed, (params, opt_plain)),
      "stage: + optax chain, no validity check": (unchecked_step,
                                                  (params, unchecked.init(params))),
      VARIANT: (plain_step(exact), (params, opt_plain)),
      VARIANT_CHECK: (plain_step(exact), (params, opt_plain)),
  }


VARIANT = "variant: exact plain, no failure branches"
VARIANT_CHECK = "variant: exact plain, finiteness as one reduction per dtype"


@contextlib.contextmanager
def _one_reduction_check():
  """Measurement only: apply_if_valid's finiteness check as one sum of ``0 * x`` over the
  concatenated leaves per dtype (0 * x is NaN exactly for NaN and inf; max |x| would not do:
  XLA:CPU's fast min/max drops NaN) instead of one ``all(isfinite)`` reduction per leaf."""
  import jax.numpy as jnp
  from riemod import transforms

  def all_finite(tree):
    groups: dict = {}
    for x in jax.tree.leaves(tree):
      x = jnp.asarray(x)
      if jnp.issubdtype(x.dtype, jnp.inexact) and x.size:
        groups.setdefault(x.dtype, []).append(jnp.ravel(x))
    flags = [jnp.isfinite(jnp.sum(0 * jnp.concatenate(v))) for v in groups.values()]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)

  original = transforms.all_finite
  transforms.all_finite = all_finite
  try:
    yield
  finally:
    transforms.all_finite = original


@contextlib.contextmanager
def _without_failure_branches():
  """Measurement only: every factor consumer uses the plain factor, no jittered branch."""
  from riemod.composer import woodbury
  cls = woodbury.BlockFactorization
  originals = {name: cls.__dict__[name] for name in ("_with_factor", "jitter")}
  zero = lambda self: jax.numpy.zeros((), self.chol.dtype)
  # Since the shared failure branch (_solve_and_estimate) _with_factor returns (result, jitter);
  # before, it returned the result and the jitter property had its own branch.
  if hasattr(cls, "_solve_and_estimate"):
    cls._with_factor = lambda self, fn: (fn(self.chol), zero(self))
  else:
    cls._with_factor = lambda self, fn: fn(self.chol)
  cls.jitter = property(zero)
  try:
    yield
  finally:
    for name, value in originals.items():
      setattr(cls, name, value)


def _count(text: str, op: str) -> int:
  return len(re.findall(rf"\b{re.escape(op)}\b", text))


def _measure(fn, args, variant: Any = contextlib.nullcontext) -> dict:
  jax.clear_caches()  # every round traces, lowers and compiles afresh
  wall, cpu = time.perf_counter(), time.process_time()
  with variant():
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


def _run_cases(cases: dict, names: list[str], offset: int) -> dict[str, dict]:
  """One measurement of every case, the order rotated by ``offset``."""
  out = {}
  for name in names[offset % len(names):] + names[:offset % len(names)]:
    fn, fn_args = cases[name]
    variant = {VARIANT: _without_failure_branches, VARIANT_CHECK: _one_reduction_check}
    out[name] = _measure(fn, fn_args, variant.get(name, contextlib.nullcontext))
    print(f"  {name}: lower {out[name]['lower_s']:.2f} s, compile {out[name]['compile_s']:.2f} s "
          f"({out[name]['compile_cpu_s']:.2f} CPU s)", file=sys.stderr, flush=True)
  return out


def _worker(offset: int) -> None:
  """Measures every case with the riemod first on sys.path and prints the results as JSON."""
  cases = _cases()
  print(json.dumps({"results": _run_cases(cases, list(cases), offset),
                    "riemod": riemod.__file__}))


def _export(revision: str, folder: Path) -> Path:
  """riemod/ of a git revision, unpacked into ``folder``."""
  folder.mkdir(parents=True)
  archive = subprocess.run(["git", "archive", revision, "riemod"], cwd=ROOT, check=True,
                           capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
  return folder


def _by_revisions(revisions: dict[str, str], rounds: int) -> dict[str, list[dict[str, dict]]]:
  """``{label: [per round: {case: measurement}]}``, revisions alternating round by round."""
  labels = list(revisions)
  runs: dict[str, list] = {label: [] for label in labels}
  with tempfile.TemporaryDirectory() as tmp:
    trees = {label: _export(rev, Path(tmp) / f"tree{i}")
             for i, (label, rev) in enumerate(revisions.items())}
    for r in range(rounds):
      for label in labels[r % len(labels):] + labels[:r % len(labels)]:
        print(f"round {r}: {label} ({revisions[label]})", file=sys.stderr, flush=True)
        code = (f"import sys; sys.path[:0] = [{str(trees[label])!r}, {str(ROOT)!r}]; "
                f"from benchmarks.bench_compile import _worker; _worker({r})")
        out = subprocess.run([sys.executable, "-c", code], cwd=trees[label], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        assert result["riemod"].startswith(str(trees[label])), result["riemod"]
        runs[label].append(result["results"])
  return runs


def _rows(label: str, results: list[dict[str, dict]]) -> list[dict]:
  rows = []
  for name in results[0]:
    row = {"case": name, "label": label}
    for key in ("lower_s", "lower_cpu_s", "compile_s", "compile_cpu_s"):
      values = [r[name][key] for r in results]
      row[key] = statistics.median(values)
      row[key + "_spread"] = [min(values), max(values)]
    for key in ("hlo_ops", "while_loops", "conditionals", "custom_calls"):
      row[key] = results[0][name][key]
    rows.append(row)
  adam = next(r for r in rows if r["case"].startswith("adam"))
  for row in rows:
    row["total_to_adam"] = ((row["lower_s"] + row["compile_s"])
                            / (adam["lower_s"] + adam["compile_s"]))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--label", default="current", help="name of this run's column (default: "
                      "current)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
  parser.add_argument("--revisions", nargs="*", default=None, metavar="LABEL=REV",
                      help="compare git revisions of riemod in alternating worker processes "
                      "(default: none, the working tree in this process)")
  parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: "
                      "benchmarks/results)")
  args = parser.parse_args()
  load_before = list(os.getloadavg())
  if args.revisions:
    revisions = dict(item.split("=", 1) for item in args.revisions)
    measured = _by_revisions(revisions, args.rounds)
    labels = {label: f"{label}: {revisions[label]}" for label in revisions}
  else:
    cases = _cases()
    measured = {args.label: [_run_cases(cases, list(cases), r) for r in range(args.rounds)]}
    labels = {args.label: args.label}
  machine = machine_info()
  machine["loadavg_before"] = load_before
  new_runs = [{"label": labels[label], "machine": machine, "rounds": args.rounds,
               "interleaved_with": [labels[other] for other in measured if other != label],
               "rows": _rows(labels[label], results)} for label, results in measured.items()]
  path = args.out / "compile.json"
  previous = json.loads(path.read_text())["runs"] if path.exists() else []
  previous = [run for run in previous if run["label"] not in labels.values()]
  write_json(path, {"runs": previous + new_runs})
  _write_markdown(args.out, previous + new_runs)


_STAGES = (("curvature measurement", "stage: curvature only"),
           ("factorisation", "stage: curvature + factorisation"),
           ("metric.solve (K products, triangular solves, failure branch)",
            "stage: + Woodbury solve"),
           ("metric.step instead (range-aware split, the same products and solves, condition "
            "and error estimates)", "stage: + direction and estimates"),
           ("optax chain (geometry state, report, learning rate, action)",
            "stage: + optax chain, no validity check"),
           ("validity check (finiteness of gradient, curvature and update; refusal branch)",
            "riemod exact, plain (nn.dense)"))


def _breakdown(by_case: dict) -> list[str]:
  """Compile CPU seconds each stage adds, and what the 2x target leaves for the step's logic."""
  if not all(case in by_case for _, case in _STAGES):
    return []
  adam = by_case["adam (plain function)"]["compile_cpu_s"]
  lines = ["", "| stage (each adds to the one above) | compile CPU s added | HLO ops added |",
           "| --- | --- | --- |"]
  previous_s = previous_ops = 0
  for label, case in _STAGES:
    row = by_case[case]
    lines.append(f"| {label} | {row['compile_cpu_s'] - previous_s:+.2f} | "
                 f"{row['hlo_ops'] - previous_ops:+d} |")
    previous_s, previous_ops = row["compile_cpu_s"], row["hlo_ops"]
  measurement = by_case["stage: curvature only"]["compile_cpu_s"]
  step = by_case["riemod exact, plain (nn.dense)"]["compile_cpu_s"]
  budget = 2 * adam - measurement
  lines += ["", f"Stages compile separately, so the increments are differences of medians (noisy, "
            f"can be negative). Target 2x Adam = {2 * adam:.2f} CPU s. The curvature measurement "
            f"alone takes {measurement:.2f} s ({measurement / adam:.1f}x Adam), which leaves "
            f"{budget:.2f} s for factorisation, solve, estimates, optax chain and validity check; "
            f"they take {step - measurement:.2f} s now, so they would have to compile "
            f"{(step - measurement) / budget:.1f}x faster." if budget > 0 else
            f"The curvature measurement alone takes {measurement:.2f} s, at or past 2x Adam."]
  return lines


_NOTES = [
    "## Notes", "",
    "- Shared failure branch (a77d31e): every consumer of a block's factor (the solves, the "
    "condition estimate, the jitter) used to compile its own jitter-escalation branch (rebuild the "
    "matrix, search the jitter, refactor), three per block; now one `_with_factor` call reads them "
    "all. Bit-identical: every leaf of two jitted steps (layerwise, full with SPRING, parameter "
    "space, refinement, Nystrom, and the forced failure path) equals the earlier revision's. "
    "Compare the `before` and `shared-branch` tables: the HLO op, while-loop and LAPACK-call "
    "counts drop by the two extra branches per block; the compile seconds by less, since the "
    "branches were the smaller part.",
    "- The finiteness check (variant row): `apply_if_valid` tests the gradient, the curvature and "
    "the update leaf by leaf, one `all(isfinite)` reduction each, and XLA:CPU compiles every "
    "reduction as its own kernels. One sum of `0 * x` over the concatenated leaves per dtype "
    "decides the same, but it is not landed: in these loaded rounds its effect is within the "
    "spread, XLA then fuses the gradient's computation differently so the updates change by "
    "float32 round-off (about 1e-7 relative), and the copy it adds was not timed. `max |x|` would "
    "be wrong: XLA:CPU's fast min/max drops NaN.",
    "- What is left is per-block code: each layer's block compiles its own products, triangular "
    "solves, power iteration and failure branch. In sample space every block works on `d x d` "
    "matrices of the same `d` (here 1280 for all three layers), so one batched (vmapped) pass over "
    "same-shaped blocks would compile that code once; that needs the blocks stacked (a copy of each "
    "factor) and a single failure branch for the batch, and is not done. Cutting the estimates or "
    "the failure branch instead would remove the step's error control.",
    ""]


def _write_markdown(out: Path, runs: list[dict]) -> None:
  lines = ["# Compile time of one step (MLP 64-128-128-10, B = 128, layerwise)", "",
           "Medians over interleaved rounds (spread in brackets); compile CPU s is this "
           "process's CPU time (less sensitive to other processes than wall time). "
           "total / Adam = (lower + compile) wall over Adam's.", ""]
  for run in runs:
    m = run["machine"]
    together = (f"; rounds alternated with {', '.join(run['interleaved_with'])}"
                if run.get("interleaved_with") else "")
    lines += [f"## {run['label']} ({run['rounds']} rounds, {m.get('git')}, {m.get('time')})", "",
              f"2-core CPU ({m.get('cpu_model')}); load average before "
              f"{[round(v, 1) for v in m.get('loadavg_before', [])]}, after "
              f"{[round(v, 1) for v in m.get('loadavg', [])]}{together}", "",
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
              "estimates, the jittered-refactorisation branches and the validity check."]
    if VARIANT in by_case:
      cut = by_case[VARIANT]
      lines[-1] += (f" Without the failure branches the step compiles in "
                    f"{cut['compile_cpu_s']:.2f} CPU s ({cut['compile_cpu_s'] / adam['compile_cpu_s']:.1f}x "
                    "Adam).")
    if VARIANT_CHECK in by_case:
      check = by_case[VARIANT_CHECK]
      lines[-1] += (f" With the finiteness check as one reduction per dtype: "
                    f"{check['compile_cpu_s']:.2f} CPU s.")
    lines += _breakdown(by_case)
    lines.append("")
  lines += _NOTES
  (out / "compile.md").write_text("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()

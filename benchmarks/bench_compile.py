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
custom calls (LAPACK), and the kernels of the optimised program with how many are distinct (XLA:CPU
compiles each distinct kernel once, and compile time follows that count). Cases are interleaved
over rounds (order rotated) and the median is reported with the spread; the load average is
recorded before and after.

``--revisions before=REV after=REV`` compares git revisions of riemod (exported with ``git
archive``) in alternating worker processes, round by round, with this file's cases.

``--kernels CASE ...`` instead compiles each case once with XLA's LLVM-module log on and groups
the compiled kernels by the riemod source that produced them (the curvature, the Woodbury step,
the optax chain, the validity check), with ``--revisions`` for each revision.

Run: ``python -m benchmarks.bench_compile [--label NAME] [--rounds 3]
[--revisions LABEL=REV ...]`` -> results/compile.{json,md}; rows of earlier labels in compile.json
are kept, so a "before" and an "after" label sit side by side. ``python -m
benchmarks.bench_compile --kernels [CASE ...] [--revisions LABEL=REV ...]`` ->
results/compile_kernels.{json,md}; ``--cache [CASE ...]`` -> results/compile_cache.{json,md}: the
compile seconds of a first and a second process sharing JAX's persistent compilation cache.
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


# Optimised-HLO instructions that XLA:CPU emits as a kernel of their own.
_KERNEL_OPS = ("fusion", "dot", "custom-call", "copy", "transpose", "reduce", "reduce-window",
               "scatter", "sort", "concatenate", "dynamic-update-slice")


def _kernels(optimized: str) -> tuple[int, int]:
  """``(kernels, distinct kernels)`` of an optimised HLO module's text.

  XLA:CPU compiles one LLVM module per kernel but reuses a compiled kernel for an identical
  fusion (the same fused computation on the same shapes), so the distinct count, not the op
  count, is what compile time follows. Distinct is approximated here by the instruction's shape,
  opcode and called computation with every name, number suffix and metadata stripped.
  """
  bodies, name, lines = {}, None, []
  for line in optimized.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
    if header and not line.startswith(" "):
      name = header.group(1)
      bodies[name] = lines = []
    elif name is not None and line.startswith("  "):
      lines.append(line)
  canon = lambda text: re.sub(r"%[\w.\-]+|, metadata=\{[^}]*\}|stack_frame_id=\d+", "", text)
  called = {n for body in bodies.values() for line in body
            for n in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line)}
  kinds = "|".join(re.escape(op) for op in _KERNEL_OPS)
  keys = []
  for comp, body in bodies.items():
    if comp in called and not any(re.search(r"(?:body|condition|branch_computations)=", l)
                                  for l in body):
      # A fused or applied computation: its instructions are inside another kernel.
      if re.match(r"(fused|wrapped|region|horizontally)", comp) or "computation" in comp:
        continue
    for line in body:
      m = re.search(rf"= (\S+) ({kinds})\(", line)
      if not m:
        continue
      target = re.search(r"calls=%([\w.\-]+)", line)
      inner = "\n".join(canon(l) for l in bodies.get(target.group(1), [])) if target else ""
      keys.append((m.group(1), m.group(2), canon(line.split("=", 1)[1]) if not target else "",
                   inner))
  return len(keys), len(set(keys))


def _measure(fn, args, variant: Any = contextlib.nullcontext) -> dict:
  jax.clear_caches()  # every round traces, lowers and compiles afresh
  wall, cpu = time.perf_counter(), time.process_time()
  with variant():
    lowered = jax.jit(fn).trace(*args).lower()
  lower_wall, lower_cpu = time.perf_counter() - wall, time.process_time() - cpu
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  compile_wall, compile_cpu = time.perf_counter() - wall, time.process_time() - cpu
  text = lowered.as_text()
  kernels, distinct = _kernels(compiled.as_text())
  return {"lower_s": lower_wall, "lower_cpu_s": lower_cpu, "compile_s": compile_wall,
          "compile_cpu_s": compile_cpu, "kernels": kernels, "distinct_kernels": distinct,
          "hlo_ops": len(re.findall(r"= (?:stablehlo|chlo|func)\.", text)),
          "while_loops": _count(text, "stablehlo.while"),
          "conditionals": _count(text, "stablehlo.case") + _count(text, "stablehlo.if"),
          "custom_calls": _count(text, "stablehlo.custom_call")}


_GROUPS = (  # (group, files): a kernel belongs to the first group with a file in its stack
    ("validity check (apply_if_valid, all_finite)", ("_util.py", "transforms.py:apply_if_valid")),
    ("Woodbury step: solves, estimates, failure branch", ("woodbury.py", "spectral.py")),
    ("optax chain, composed metric, mass policy",
     ("metric.py", "masses.py", "geometry.py", "transforms.py", "numerics.py", "_combining.py")),
    ("model, loss, curvature (factors, Gram)", ("factors.py", "measure.py", "metrics.py",
                                               "functional.py", "_tape.py", "adapter.py",
                                               "structure.py", "bench_plain_function.py",
                                               "_classification.py")))


def _stacks(optimized: str) -> dict[str, list[tuple[str, str]]]:
  """Instruction name -> its source stack ``[(file, function), ...]`` (innermost first), from the
  stack-frame tables of an optimised HLO module's text; a fusion without metadata takes the
  first frame found inside its fused computation."""
  def table(name):
    part = optimized.split("\n" + name + "\n", 1)
    return part[1].split("\n\n", 1)[0].splitlines() if len(part) == 2 else []
  files = {int(l.split()[0]): l.split(None, 1)[1].strip('"') for l in table("FileNames")}
  funcs = {int(l.split()[0]): l.split(None, 1)[1].strip('"') for l in table("FunctionNames")}
  locations, frames = {}, {}
  for l in table("FileLocations"):
    m = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", l)
    locations[int(m.group(1))] = (files[int(m.group(2))].split("/")[-1], funcs[int(m.group(3))])
  for l in table("StackFrames"):
    m = re.match(r"(\d+) \{file_location_id=(\d+)(?: parent_frame_id=(\d+))?", l)
    frames[int(m.group(1))] = (int(m.group(2)), int(m.group(3)) if m.group(3) else None)

  def stack(frame):
    out = []
    while frame in frames and len(out) < 100:
      location, parent = frames[frame]
      out.append(locations[location])
      if parent == frame:
        break
      frame = parent
    return out

  frame_of, first_in, current = {}, {}, None
  for line in optimized.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
    if header and not line.startswith(" "):
      current = header.group(1)
      continue
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if not m:
      continue
    sf = re.search(r"stack_frame_id=(\d+)", line)
    calls = re.search(r"calls=%([\w.\-]+)", line)
    frame_of[m.group(1)] = (int(sf.group(1)) if sf else None, calls.group(1) if calls else None)
    if sf and current not in first_in:
      first_in[current] = int(sf.group(1))
  return {name: stack(frame if frame else first_in.get(calls)) for name, (frame, calls)
          in frame_of.items()}


def _group(stack: list[tuple[str, str]]) -> str:
  for group, keys in _GROUPS:
    for f, fn in stack:
      if any(f == k or f"{f}:{fn}".startswith(k) for k in keys):
        return group
  return "no source (copies, reduction halves XLA adds, matrix-vector dots)"


def _kernels_by_source(case: str) -> None:
  """Compiles ``case`` with XLA's LLVM-module log on and prints, as JSON, each compiled kernel's
  group (by its source stack) and LLVM seconds. Run in a child process (the log level is read
  at start-up)."""
  import sys as _sys
  fn, args = _cases()[case]
  lowered = jax.jit(fn).trace(*args).lower()
  print("=== compile", file=_sys.stderr, flush=True)
  compiled = lowered.compile()
  print("=== done", file=_sys.stderr, flush=True)
  stacks = _stacks(compiled.as_text())
  print(json.dumps({name: stack for name, stack in stacks.items()}))


def kernel_breakdown(case: str, tree: Path | None = None) -> dict:
  """``{group: [compiled kernels, LLVM seconds]}`` for one case, plus the kernels XLA reused;
  with ``tree``, for the riemod exported there (see ``_export``)."""
  first = [str(tree)] if tree else []
  code = (f"import sys; sys.path[:0] = {first + [str(ROOT)]!r}; from benchmarks.bench_compile "
          f"import _kernels_by_source; _kernels_by_source({case!r})")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="ir_compiler=1,thunk_emitter=2")
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True)
  stacks = json.loads(run.stdout.strip().splitlines()[-1])
  log = run.stderr.split("=== compile", 1)[1].split("=== done", 1)[0]
  out: dict = {}
  for m in re.finditer(r"Compiled LLVM module: (\S+) time: ([\d.]+) (s|ms|us)", log):
    name = re.sub(r"_(elemental_)?kernel_module$", "", m.group(1).replace("__compute_module_", ""))
    seconds = float(m.group(2)) * {"s": 1, "ms": 1e-3, "us": 1e-6}[m.group(3)]
    entry = out.setdefault(_group([tuple(f) for f in stacks.get(name, [])]), [0, 0.0])
    entry[0] += 1
    entry[1] += seconds
  out["(reused: identical kernels compiled once)"] = [log.count("Reusing kernel"), 0.0]
  return out


def _cache_worker(cache_dir: str, case: str) -> None:
  """Compiles ``case`` with JAX's persistent compilation cache in ``cache_dir`` (every entry
  kept) and prints the compile seconds as JSON."""
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  fn, args = _cases()[case]
  lowered = jax.jit(fn).trace(*args).lower()
  wall, cpu = time.perf_counter(), time.process_time()
  lowered.compile()
  print(json.dumps({"compile_s": time.perf_counter() - wall,
                    "compile_cpu_s": time.process_time() - cpu}))


def cache_rows(cases: list[str]) -> list[dict]:
  """Per case: compile seconds in a first process that fills an empty persistent cache, and in a
  second one that can read it (``stored``: whether the step's entry was written)."""
  rows = []
  for case in cases:
    with tempfile.TemporaryDirectory() as cache:
      code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.bench_compile "
              f"import _cache_worker; _cache_worker({cache!r}, {case!r})")
      runs = [json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                                        capture_output=True, text=True).stdout.splitlines()[-1])
              for _ in range(2)]
      stored = any("step" in name for name in os.listdir(cache))
    rows.append({"case": case, "first": runs[0], "second": runs[1], "stored": stored})
    print(f"  {case}: {runs[0]['compile_cpu_s']:.2f} -> {runs[1]['compile_cpu_s']:.2f} CPU s "
          f"(stored: {stored})", file=sys.stderr, flush=True)
  return rows


def _write_cache(out: Path, cases: list[str]) -> None:
  load_before = list(os.getloadavg())
  rows = cache_rows(cases)
  machine = machine_info()
  machine["loadavg_before"] = load_before
  write_json(out / "compile_cache.json", {"machine": machine, "rows": rows})
  lines = ["# Compile time with JAX's persistent compilation cache (MLP 64-128-128-10, B = 128)",
           "", "Each case compiled in a fresh process with an empty cache directory "
           "(`jax_compilation_cache_dir`, every entry kept), then in a second process with that "
           "directory. JAX does not store programs that contain host callbacks; riemod's "
           "validity check (`on_nonfinite=\"error\"`, the default) raises its refusal from one. "
           "One run per case (`python -m benchmarks.bench_compile --cache`); 2-core CPU "
           f"({machine.get('cpu_model')}), git {machine.get('git')}, load average "
           f"{[round(v, 1) for v in load_before]} before, "
           f"{[round(v, 1) for v in machine.get('loadavg', [])]} after.", "",
           "| case | first process: compile s (CPU s) | second process: compile s (CPU s) | "
           "step stored in the cache |", "| --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['case']} | {r['first']['compile_s']:.2f} "
                 f"({r['first']['compile_cpu_s']:.2f}) | {r['second']['compile_s']:.2f} "
                 f"({r['second']['compile_cpu_s']:.2f}) | {'yes' if r['stored'] else 'no'} |")
  (out / "compile_cache.md").write_text("\n".join(lines + [""]))
  print("\n".join(lines))


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
    for key in ("hlo_ops", "while_loops", "conditionals", "custom_calls", "kernels",
                "distinct_kernels"):
      row[key] = results[0][name].get(key)
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
  parser.add_argument("--kernels", nargs="*", default=None, metavar="CASE",
                      help="instead of timing: the compiled kernels of these cases by source "
                      "(XLA's LLVM-module log), written to compile_kernels.{json,md} (default: "
                      "none)")
  parser.add_argument("--cache", nargs="*", default=None, metavar="CASE",
                      help="instead of timing: compile seconds of these cases in a first and a "
                      "second process sharing JAX's persistent compilation cache, written to "
                      "compile_cache.{json,md} (default: none)")
  args = parser.parse_args()
  if args.cache is not None:
    _write_cache(args.out, args.cache or ["adam (plain function)", "riemod exact, NNX",
                                          "riemod exact, plain (nn.dense)",
                                          "stage: + optax chain, no validity check"])
    return
  if args.kernels is not None:
    _write_kernels(args.out, args.kernels or ["adam (plain function)",
                                              "riemod exact, plain (nn.dense)"],
                   dict(item.split("=", 1) for item in args.revisions or []))
    return
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
    "- Batched blocks (`before: 7fbd887` against `batched: k-batched-blocks`, the ref's commit "
    "65ecade, not on main): in sample space every layerwise block's capacitance is `d x d` with "
    "the same `d` (1280 here), so the ref factors all same-shaped blocks by one batched Cholesky "
    "and runs their triangular solves, residuals and power iterations vmapped, with one "
    "jitter-escalation branch for the batch (a vmapped escalation: a failing block escalates "
    "alone, the others keep their plain factors; tests/test_woodbury_batch.py in the ref, which "
    "fails when the lanes share one jitter). Steps and optimizer states are bit-identical to "
    "main's (float32 and float64; NNX, Linen and plain functions; constant, adaptive and Kronecker "
    "masses; exact and sampled Fisher; SPRING). StableHLO ops drop 2088 -> 1588, while loops 9 -> "
    "3, LAPACK calls 15 -> 7, but compile CPU does not: 3.74 (3.50-3.91) -> 3.91 (3.82-3.93) s "
    "exact plain, 3.80 -> 4.05 s NNX, 3.48 -> 3.49 s sampled. The reason is in XLA:CPU: it "
    "compiles one LLVM module per distinct kernel and reuses it for identical fusions, so the "
    "per-block solve, estimate and failure-branch kernels of blocks with one `d` were already "
    "compiled once (compile_kernels.md, `--kernels` with both revisions: 197 compiled + 225 "
    "reused on main, 202 + 112 batched). The batched path is therefore not landed. The `no "
    "failure branches` variant does "
    "not apply to the batched revision (its step does not go through `_with_factor`).",
    "- Where the time goes (compile_kernels.md): tracing and lowering are about a tenth of the "
    "step's compile CPU (lower s column); the LLVM seconds of the compiled kernels (summed over "
    "XLA's threads) add up to about the whole compile CPU, ~200 distinct kernels at roughly the "
    "same cost per kernel as Adam's 29. "
    "Kernels differ per layer shape, not per block: every per-leaf operation (the range split's "
    "dot products and norms, the Woodbury back-products, `D^{-1}` scalings, the error estimate's "
    "norms, the finiteness check) compiles once per distinct leaf shape, and XLA:CPU splits each "
    "reduction into two kernels (reduce-window + reduce).",
    "- The 2x target in kernels: 2x Adam's compile CPU is about 2 x 29 = 58 distinct kernels at "
    "the present cost per kernel; the exact step compiles 197, of which the curvature measurement "
    "(model, loss, factors, Gram) is 38 plus its share of the unattributed ones. The Woodbury step "
    "(65 attributed, most of the 44 unattributed: matrix-vector dots of the power iteration and "
    "residuals, reduction halves) and the validity check (35) would have to shrink by ~140 kernels "
    "together. Levers not taken here: the validity check as one reduction per dtype (variant row: "
    "3.29 (3.18-3.31) against 3.74 (3.50-3.91) CPU s, the one change whose spread separates; it "
    "lives in riemod/transforms.py and changes float32 updates by round-off); the step's per-leaf "
    "arithmetic on one flat vector per block (one kernel per block instead of one per leaf; "
    "changes the order of sums, so round-off). Even both together leave the step several times "
    "Adam's, because each distinct layer shape needs its own products.",
    "- Across runs (compile_cache.md): with JAX's persistent compilation cache a second process "
    "loads Adam's step in 0.01 s and riemod's step without the validity check in 0.11 s "
    "(compile wall), but the default step is compiled afresh every run, because JAX does not "
    "write programs with host callbacks to the cache (jax/_src/compiler.py, `_cache_write`) and "
    "the validity check raises its "
    "refusal from a `pure_callback` in its failure branch. Raising it without a host callback "
    "(riemod/transforms.py, not this benchmark's code) would make a cached riemod step as cheap to "
    "start as Adam's from the second run on.",
    ""]


def _write_kernels(out: Path, cases: list[str], revisions: dict[str, str]) -> None:
  load_before = list(os.getloadavg())
  if revisions:
    with tempfile.TemporaryDirectory() as tmp:
      trees = {label: _export(rev, Path(tmp) / f"tree{i}")
               for i, (label, rev) in enumerate(revisions.items())}
      found = {f"{case} [{label}: {revisions[label]}]": kernel_breakdown(case, tree)
               for case in cases for label, tree in trees.items()}
  else:
    found = {case: kernel_breakdown(case) for case in cases}
  machine = machine_info()
  machine["loadavg_before"] = load_before
  write_json(out / "compile_kernels.json", {"machine": machine, "cases": found})
  lines = ["# Compiled kernels of one step by source (MLP 64-128-128-10, B = 128, layerwise)", "",
           "XLA:CPU compiles one LLVM module per kernel of the optimised program and reuses a "
           "compiled kernel for an identical one (same fused computation, same shapes); compile "
           "time follows the compiled kernels. Each kernel is grouped by the first riemod source "
           "in its stack (XLA's `ir_compiler` log; `python -m benchmarks.bench_compile --kernels "
           "CASE ... [--revisions LABEL=REV ...]`). LLVM seconds are summed over XLA's compile "
           "threads and include the "
           f"logging. Machine: 2-core CPU ({machine.get('cpu_model')}), git {machine.get('git')}, "
           f"load average {[round(v, 1) for v in load_before]}.", ""]
  for case, groups in found.items():
    total = sum(n for g, (n, _) in groups.items() if not g.startswith("(reused"))
    lines += [f"## {case}: {total} compiled kernels", "", "| group | kernels | LLVM s |",
              "| --- | --- | --- |"]
    for group, (n, seconds) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
      lines.append(f"| {group} | {n} | {seconds:.2f} |")
    lines.append("")
  (out / "compile_kernels.md").write_text("\n".join(lines))
  print("\n".join(lines))


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
              "| case | lower s | compile s (spread) | compile CPU s (spread) | total / Adam | "
              "HLO ops | while | cond | LAPACK calls | kernels (distinct) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in run["rows"]:
      lo, hi = r["compile_s_spread"]
      clo, chi = r["compile_cpu_s_spread"]
      kernels = (f"{r['kernels']} ({r['distinct_kernels']})" if r.get("kernels") is not None
                 else "")
      lines.append(f"| {r['case']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} ({lo:.2f}-{hi:.2f}) "
                   f"| {r['compile_cpu_s']:.2f} ({clo:.2f}-{chi:.2f}) | {r['total_to_adam']:.1f} | "
                   f"{r['hlo_ops']} | {r['while_loops']} | {r['conditionals']} | "
                   f"{r['custom_calls']} | {kernels} |")
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

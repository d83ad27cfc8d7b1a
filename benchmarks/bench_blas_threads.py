"""Benchmark: the exact-Fisher layerwise step with and without riemod's BLAS thread limit.

jaxlib's CPU Cholesky runs in scipy's OpenBLAS, whose default pool (one thread per core) competes
with XLA's thread pool; ``import riemod`` limits BLAS to one thread (``riemod/_threads.py``). This
benchmark times the step of :mod:`benchmarks.bench_step_cost` (digits MLP 64-128-128-10, batch
128, ``softmax_fisher()``, three ``1280 x 1280`` capacitance factorisations) in fresh processes,
one per measurement, since thread pools are fixed when a library loads:

* ``riemod default``: no BLAS variable set, ``import riemod`` applies the limit;
* ``keep (OpenBLAS default)``: ``RIEMOD_BLAS_THREADS=keep``, i.e. riemod before this change;
* ``limit after load``: scipy and numpy imported (their OpenBLAS loaded with its default pool)
  before riemod, so the limit comes from ``threadpoolctl`` at run time, not the variables.

Processes of the three kinds alternate (order rotated every round), under two loads: the machine
as found, and with one extra process spinning on a core (what a second job does to a step). Every
child records its BLAS thread counts, the load average before and after, and the median of its
timed steps (after compilation and warm-up). Results: ``blas_threads.json`` and ``blas_threads.md``.

Usage:
  python -m benchmarks.bench_blas_threads [--rounds 5] [--steps 15] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "OMP_NUM_THREADS",
                  "RIEMOD_BLAS_THREADS")
MODES = {
    "riemod default": {},
    "keep (OpenBLAS default)": {"RIEMOD_BLAS_THREADS": "keep"},
    "limit after load": {"BENCH_IMPORT_SCIPY_FIRST": "1"},
}
REFERENCE = "riemod default"
STEP_BUDGET_S = 30.0  # a child stops timing after this many seconds of steps


def child(steps: int) -> dict:
  """One measurement in this (fresh) process; printed as one JSON line."""
  load_before = list(os.getloadavg())
  if os.environ.get("BENCH_IMPORT_SCIPY_FIRST"):
    import numpy  # noqa: F401 - loads numpy's OpenBLAS with its default pool
    import scipy.linalg  # noqa: F401 - loads scipy's OpenBLAS (jaxlib's LAPACK) likewise
  import jax

  import riemod
  from benchmarks import bench_step_cost

  step, (params, state) = bench_step_cost.riemod_step(riemod.metrics.softmax_fisher(), "skip")
  t0 = time.perf_counter()
  for _ in range(3):  # compile, then two warm-up steps
    params, state = step(params, state)
    jax.block_until_ready(params)
  warm_s = time.perf_counter() - t0
  times = []
  while len(times) < steps and sum(times) < STEP_BUDGET_S:
    t = time.perf_counter()
    params, state = step(params, state)
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t)
  return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
          "max_ms": 1e3 * max(times), "steps_timed": len(times), "compile_and_warmup_s": warm_s,
          "blas_threads": {Path(k).name: v for k, v in riemod._threads.blas_threads().items()},
          "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())}


def _spawn_child(mode: str, steps: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in BLAS_VARIABLES}
  env.pop("BENCH_IMPORT_SCIPY_FIRST", None)
  env.update(MODES[mode])
  env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_blas_threads", "--child",
                         "--steps", str(steps)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(f"child {mode!r} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _spinner() -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run(rounds: int, steps: int, progress: bool = True) -> dict:
  from tqdm import tqdm

  from benchmarks import harness

  loads = {"as found": 0, "one core busy": 1}
  out = {"modes": {m: {k: v for k, v in env.items()} for m, env in MODES.items()},
         "rounds": rounds, "steps_per_child": steps, "loads": {}}
  names = list(MODES)
  bar = tqdm(total=rounds * len(names) * len(loads), desc="blas threads", disable=not progress)
  for load_name, spinners in loads.items():
    per_mode: dict[str, list[dict]] = {m: [] for m in names}
    for r in range(rounds):
      for mode in names[r % len(names):] + names[:r % len(names)]:
        procs = [_spinner() for _ in range(spinners)]
        try:
          per_mode[mode].append(_spawn_child(mode, steps))
        finally:
          for p in procs:
            p.kill()
            p.wait()
        bar.set_postfix_str(f"{load_name}: {mode} {per_mode[mode][-1]['median_ms']:.0f} ms")
        bar.update()
    summary = {}
    for mode, results in per_mode.items():
      medians = [c["median_ms"] for c in results]
      ratios = [c["median_ms"] / ref["median_ms"] for c, ref in zip(results, per_mode[REFERENCE])]
      summary[mode] = {"median_ms": statistics.median(medians),
                       "spread_ms": [min(medians), max(medians)],
                       "worst_step_ms": max(c["max_ms"] for c in results),
                       "ratio_to_default": statistics.median(ratios),
                       "ratio_spread": [min(ratios), max(ratios)],
                       "blas_threads": results[0]["blas_threads"], "children": results}
    out["loads"][load_name] = {"extra_spinning_processes": spinners, "summary": summary}
  bar.close()
  out["machine"] = harness.machine_info()
  # Where riemod came from when ROOT is a copy outside git (the machine info has no commit then).
  out["source_note"] = os.environ.get("BENCH_SOURCE_NOTE")
  return out


def markdown(result: dict) -> str:
  from benchmarks import harness

  lines = ["# BLAS threads: the exact-Fisher layerwise step with and without riemod's limit", "",
           "Digits MLP 64-128-128-10, batch 128, `softmax_fisher()` (three 1280 x 1280 Choleskys "
           f"per step). One fresh process per measurement, {result['rounds']} rounds, modes "
           "alternating; per process the median of up to "
           f"{result['steps_per_child']} timed steps after compilation. Ratio: median over rounds "
           "of (mode / riemod default in the same round).", ""]
  for load_name, entry in result["loads"].items():
    lines += [f"## Load: {load_name} ({entry['extra_spinning_processes']} extra spinning "
              "process)", ""]
    rows = []
    for mode, s in entry["summary"].items():
      loads = [c["loadavg_before"][0] for c in s["children"]]
      rows.append([mode, ", ".join(f"{k.split('-')[0]}: {v}" for k, v in
                                   sorted(s["blas_threads"].items())),
                   s["median_ms"], f"{s['spread_ms'][0]:.0f}-{s['spread_ms'][1]:.0f}",
                   s["worst_step_ms"], s["ratio_to_default"],
                   f"{s['ratio_spread'][0]:.2f}-{s['ratio_spread'][1]:.2f}",
                   f"{min(loads):.2f}-{max(loads):.2f}"])
    lines += [harness.markdown_table(
        ["mode", "BLAS threads", "median step ms", "spread of process medians", "worst step ms",
         "ratio to default", "ratio spread", "1-min load before"], rows), ""]
  m = result["machine"]
  lines.append(f"Machine: {m.get('cpu_model')}, {m.get('affinity_cores')} cores, backend "
               f"{m.get('backend')}, versions {m.get('versions')}, git "
               f"{m.get('git') or result.get('source_note')}, {m.get('time')}.")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5, help="processes per mode and load")
  parser.add_argument("--steps", type=int, default=15, help="timed steps per process")
  parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                      help="folder for blas_threads.json and blas_threads.md")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(child(args.steps)))
    return
  from benchmarks import harness

  result = run(args.rounds, args.steps, progress=not args.no_progress)
  args.out.mkdir(parents=True, exist_ok=True)
  harness.write_json(args.out / "blas_threads.json", result)
  (args.out / "blas_threads.md").write_text(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()

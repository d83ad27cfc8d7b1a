"""Runs the benchmark suite: ``python -m benchmarks.run_all [--quick] [--tasks ...] [--out DIR]``.

Each task runs in its own Python process (a fresh jax: the PINN enables float64, and no task's
compilation cache or memory affects another's timing). kfac-jax runs first, in its own environment
(``benchmarks/kfac/setup.sh``; skipped with the reason when that environment is missing or
``--no-kfac``), and its JSON is merged into the digits tasks as external runs. Finally
``SUMMARY.md`` collects every task's table and the targets of issue 6 with whether each is met.

Nothing assumes a CPU: on a GPU machine the same command runs on the default jax backend; pass
``--out benchmarks/results/gpu`` to keep those results beside the CPU ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks import summary

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "digits-mlp": "benchmarks.task_digits_mlp",
    "digits-autoencoder": "benchmarks.task_digits_autoencoder",
    "digits-cnn": "benchmarks.task_digits_cnn",
    "poisson-pinn": "benchmarks.task_poisson_pinn",
    "engd-poisson": "benchmarks.task_engd_poisson",
    "poisson5d": "benchmarks.task_poisson5d",
    "scaling": "benchmarks.task_scaling",
    "blr-sampling": "benchmarks.task_blr_sampling",
}
KFAC_TASKS = ("digits-mlp", "digits-autoencoder")
KFAC_VENV = Path(os.environ.get("KFAC_VENV", "/tmp/kfac-venv"))


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault("OPENBLAS_NUM_THREADS", "1")  # steadier dense solves on a small shared CPU
  env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  return env


def _run(cmd: list[str], log: Path) -> int:
  print(f"[{time.strftime('%H:%M:%S')}] $ {' '.join(cmd)}", flush=True)
  with log.open("a") as handle:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
      handle.write(line)
      if line.startswith("[") or "Error" in line:
        print("   " + line.rstrip(), flush=True)
    return proc.wait()


def run_kfac(out: Path, quick: bool, tasks: list[str], log: Path) -> list[Path]:
  tasks = [t for t in tasks if t in KFAC_TASKS]
  if not tasks:
    return []
  python = KFAC_VENV / "bin" / "python"
  if not python.exists():
    reason = (f"kfac-jax environment {KFAC_VENV} not found: create it with "
              "benchmarks/kfac/setup.sh (kfac-jax 0.0.8 does not run on jax 0.10).")
    for t in tasks:
      harness.write_json(out / f"kfac_{t}.json", {"task": t, "runs": [], "error": reason})
    print(reason, flush=True)
    return [out / f"kfac_{t}.json" for t in tasks]
  cmd = [str(python), "-m", "benchmarks.kfac.run_kfac", "--out", str(out), "--tasks", *tasks]
  rc = _run(cmd + (["--quick"] if quick else []), log)
  if rc != 0:
    for t in tasks:
      path = out / f"kfac_{t}.json"
      if not path.exists():
        harness.write_json(path, {"task": t, "runs": [],
                                  "error": f"run_kfac exited with {rc}; see {log.name}"})
  return [out / f"kfac_{t}.json" for t in tasks]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="a ~3 minute smoke run")
  parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS)
  parser.add_argument("--no-kfac", action="store_true")
  args = parser.parse_args(argv)
  out = args.out.resolve()
  out.mkdir(parents=True, exist_ok=True)
  log = out / "run_all.log"
  log.write_text(f"run_all {time.strftime('%Y-%m-%dT%H:%M:%S')} args {vars(args)}\n")
  started = time.perf_counter()
  status = {}
  kfac_files = [] if args.no_kfac else run_kfac(out, args.quick, args.tasks, log)
  for task in args.tasks:
    cmd = [sys.executable, "-m", TASKS[task], "--out", str(out)] + (
        ["--quick"] if args.quick else [])
    if task in KFAC_TASKS and kfac_files:
      cmd += ["--external", *[str(p) for p in kfac_files]]
    t0 = time.perf_counter()
    rc = _run(cmd, log)
    status[task] = {"returncode": rc, "seconds": time.perf_counter() - t0}
  status["total_seconds"] = time.perf_counter() - started
  (out / "run_status.json").write_text(json.dumps(status, indent=1))
  summary.write_summary(out, quick=args.quick)
  print(f"done in {status['total_seconds']:.0f} s; summary: {out / 'SUMMARY.md'}", flush=True)
  return 0 if all(v["returncode"] == 0 for k, v in status.items() if k != "total_seconds") else 1


if __name__ == "__main__":
  sys.exit(main())

"""Law counts at the authors' scale and beyond: time and peak memory per architecture and flow.

Every 2-4 layer linear or ReLU network below has at most 200 parameters; each is counted with
``riemod.conservation.count_laws`` (3 random points, exact polynomial brackets) under gradient,
momentum and mirror (NMF) flows, in a fresh process so that the peak resident memory (``ru_maxrss``,
JAX and NumPy included) is that count's own. The count is printed beside the closed form of
``riemod.cli.laws.closed_form``. Also times ``riemod laws sweep`` for 50 random linear and 50 random
ReLU networks (gradient flow), the authors' study (34 min and 1 h 53 min in SageMath).

Run: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.bench_law_counts`` (``--quick`` for a subset).
Writes ``benchmarks/results/law_counts.json`` and ``law_counts.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ARCHITECTURES = [
    ("linear", (1, 7, 2), False), ("linear", (1, 2, 2, 1), False), ("linear", (2, 3, 3, 2), False),
    ("linear", (8, 10, 8), False), ("linear", (10, 10, 10), False), ("linear", (6, 8, 8, 6), False),
    ("linear", (5, 6, 6, 6, 5), False), ("linear", (7, 7, 7, 7, 7), False),
    ("relu", (3, 4, 2), True), ("relu", (8, 10, 8), False), ("relu", (6, 10, 8, 3), True),
    ("relu", (3, 8, 8, 8, 2), True), ("relu", (7, 7, 7, 7, 7), False),
]
QUICK = [0, 1, 3, 8, 10]
FLOWS = ("gradient", "momentum", "mirror")
CHILD = """
import json, resource, sys
from riemod.cli.laws import count_one
arch, dims, bias, flow = json.loads(sys.argv[1])
row = count_one(arch, tuple(dims), bias, flow)
row.pop("points", None)
row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(row, default=float))
"""


def count_in_child(arch, dims, bias, flow, timeout):
  started = time.perf_counter()
  try:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([arch, list(dims), bias, flow])],
                         capture_output=True, text=True, timeout=timeout, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
  except subprocess.TimeoutExpired:
    row = {"arch": arch, "dims": list(dims), "bias": bias, "flow": flow, "count": None,
           "timed_out": True, "count_seconds": None}
  row["process_seconds"] = time.perf_counter() - started
  return row


def sweep_seconds(arch: str, out: str) -> dict:
  started = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "riemod.cli.laws", "sweep", "--arch", arch, "--nets", "50",
                         "--no-progress", "--json", "--out", out], capture_output=True, text=True)
  summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
  summary["process_seconds"] = time.perf_counter() - started
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--timeout", type=float, default=600.0)
  parser.add_argument("--no-sweep", action="store_true")
  args = parser.parse_args()
  from benchmarks.harness import machine_info, markdown_table  # pylint: disable=g-import-not-at-top
  cases = [ARCHITECTURES[i] for i in QUICK] if args.quick else ARCHITECTURES
  rows = []
  for arch, dims, bias in cases:
    for flow in FLOWS:
      row = count_in_child(arch, dims, bias, flow, args.timeout)
      row["load_after"] = os.getloadavg()[0]
      rows.append(row)
      print(json.dumps({k: row.get(k) for k in ("arch", "dims", "bias", "flow", "parameters", "count",
                                                  "closed_form", "count_seconds", "peak_rss_mb")}), flush=True)
  sweeps = {}
  if not args.no_sweep:
    for arch in ("linear", "relu"):
      sweeps[arch] = sweep_seconds(arch, f"/tmp/riemod_law_sweep_{arch}")
      print(arch, sweeps[arch], flush=True)
  results = pathlib.Path(__file__).resolve().parent / "results"
  payload = {"machine": machine_info(), "rows": rows, "sweeps": sweeps}
  (results / "law_counts.json").write_text(json.dumps(payload, indent=1, default=float))
  table = markdown_table(
      ["network", "bias", "flow", "D", "laws", "closed form", "rank per round (point 1)", "seconds",
       "peak RSS (MB)", "gap kept / dropped", "load"],
      [[f"{r['arch']} {'-'.join(map(str, r['dims']))}", "yes" if r["bias"] else "no", r["flow"],
        r.get("parameters", "-"), r["count"] if r["count"] is not None else "timeout",
        "-" if r.get("closed_form") is None else r["closed_form"],
        str(r["rank_history"][0]) if r.get("rank_history") else "-",
        f"{r['count_seconds']:.1f}" if r.get("count_seconds") else "-",
        f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-",
        (f"{min(r['smallest_kept']):.0e} / {max(r['largest_dropped']):.0e}" if r.get("smallest_kept") else "-"),
        f"{r['load_after']:.1f}"] for r in rows])
  lines = ["# Law counts: time and peak memory", "",
           f"Machine: {payload['machine']['cpu_model']}, {payload['machine']['cpu_count']} CPUs, shared with other "
           "jobs (1-minute load average after each count in the last column); OPENBLAS_NUM_THREADS="
           f"{os.environ.get('OPENBLAS_NUM_THREADS')}. One cold count per row in a fresh process (3 random "
           "points, exact polynomial brackets); peak RSS includes the ~250 MB of a Python process with JAX.",
           "", table, ""]
  for arch, summary in sweeps.items():
    lines.append(f"- `riemod laws sweep --arch {arch} --nets 50` (gradient flow, <= 200 parameters, 2-4 layers): "
                 f"{summary['agree']} of {summary['with_closed_form']} counts agree with the closed form, "
                 f"{summary['seconds']:.0f} s of counting ({summary['process_seconds']:.0f} s with start-up).")
  (results / "law_counts.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()

"""Law counts at the authors' scale and beyond: time and peak memory per architecture and flow.

Every 2-4 layer linear or ReLU network below has at most 200 parameters; each is counted with
``riemod.conservation.count_laws`` (3 random points; the method it picks: the orbit method for momentum
with few generators, exact polynomial brackets otherwise) under gradient, momentum and mirror (NMF)
flows, in a fresh process so that the peak resident memory (``ru_maxrss``, JAX and NumPy included) is
that count's own. The count is printed beside the closed form of ``riemod.cli.laws.closed_form``. Also
times ``riemod laws sweep`` for 50 random linear and 50 random ReLU networks (gradient flow), the
authors' study (34 min and 1 h 53 min in SageMath).

Run: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.bench_law_counts`` (``--quick`` for a subset;
``--only momentum:1,3,3,3,1 ...`` re-counts those rows into the existing results).
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
    # Few inputs and outputs, 3-4 layers: many bracket rounds of large polynomials. Momentum is counted
    # by the orbit method; gradient and mirror flows of 2-6-6-6-2 stay outside the target
    # (docs/conservation.md).
    ("linear", (1, 10, 10, 1), False), ("linear", (1, 3, 3, 3, 1), False), ("linear", (2, 6, 6, 6, 2), False),
    ("relu", (3, 4, 2), True), ("relu", (8, 10, 8), False), ("relu", (10, 10, 10), False),
    ("relu", (6, 10, 8, 3), True), ("relu", (6, 8, 8, 6), True), ("relu", (3, 8, 8, 8, 2), True),
    ("relu", (7, 7, 7, 7, 7), False),
]
QUICK = [0, 1, 3, 11, 14]
FLOWS = ("gradient", "momentum", "mirror")
CHILD = """
import json, os, resource, sys, time
from riemod.cli.laws import count_one
arch, dims, bias, flow = json.loads(sys.argv[1])
load_before = os.getloadavg()[0]
cpu = time.process_time()
row = count_one(arch, tuple(dims), bias, flow)
row["cpu_seconds"] = time.process_time() - cpu
row["load_before"] = load_before
row.pop("points", None)
row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(row, default=float))
"""


def count_in_child(arch, dims, bias, flow, timeout):
  started = time.perf_counter()
  first_error = None
  for _ in range(2):
    try:
      out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([arch, list(dims), bias, flow])],
                           capture_output=True, text=True, timeout=timeout, check=True)
      row = json.loads(out.stdout.strip().splitlines()[-1])
      break
    except subprocess.TimeoutExpired:
      row = {"arch": arch, "dims": list(dims), "bias": bias, "flow": flow, "count": None,
             "timed_out": True, "count_seconds": None}
      break
    except subprocess.CalledProcessError as err:
      # A failed count is a result too: keep its error in the table instead of losing the whole run. The
      # working tree is shared with other engineers' edits, so a failure is retried once and both kept.
      error = err.stderr.strip().splitlines()[-1] if err.stderr.strip() else f"exit {err.returncode}"
      row = {"arch": arch, "dims": list(dims), "bias": bias, "flow": flow, "count": None, "error": error,
             "count_seconds": None}
      first_error = first_error or error
  if first_error is not None:
    row["first_error"] = first_error
  row["process_seconds"] = time.perf_counter() - started
  return row


def sweep_seconds(arch: str, out: str) -> dict:
  load_before = os.getloadavg()[0]
  started = time.perf_counter()
  children_cpu = os.times()
  proc = subprocess.run([sys.executable, "-m", "riemod.cli.laws", "sweep", "--arch", arch, "--nets", "50",
                         "--no-progress", "--json", "--out", out], capture_output=True, text=True, check=False)
  finished = os.times()
  lines = proc.stdout.strip().splitlines()
  if not lines:
    return {"exit_status": proc.returncode, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1],
            "process_seconds": time.perf_counter() - started}
  summary = json.loads(lines[-1])["summary"]
  summary["process_seconds"] = time.perf_counter() - started
  # CPU time of the whole sweep process (start-up included), less sensitive to other jobs than wall time.
  summary["process_cpu_seconds"] = ((finished.children_user + finished.children_system)
                                    - (children_cpu.children_user + children_cpu.children_system))
  summary["load_before"], summary["load_after"] = load_before, os.getloadavg()[0]
  summary["exit_status"] = proc.returncode
  summary.update(_stopped_networks(out))
  return summary


def _stopped_networks(out: str) -> dict:
  """The networks a sweep had to stop, and the counting time of the others, from its sweep.json."""
  rows = json.loads((pathlib.Path(out) / "sweep.json").read_text())["rows"]
  return {"stopped": ["-".join(map(str, r["dims"])) + (" (bias)" if r["bias"] else "") + f": {r['error']}"
                      for r in rows if r["count"] is None],
          "counted_seconds": sum(r["count_seconds"] for r in rows if r["count"] is not None)}


def _table(rows) -> str:
  from benchmarks.harness import markdown_table  # pylint: disable=g-import-not-at-top
  return markdown_table(
      ["network", "bias", "flow", "method", "D", "laws", "closed form", "rank per round (point 1)", "wall s",
       "CPU s",
       "peak RSS (MB)", "gap kept / dropped", "load before / after"],
      [[f"{r['arch']} {'-'.join(map(str, r['dims']))}", "yes" if r["bias"] else "no", r["flow"],
        r.get("method") or "polynomial",
        r.get("parameters") or "-", r["count"] if r.get("count") is not None else _failure(r),
        "-" if r.get("closed_form") is None else r["closed_form"],
        str(r["rank_history"][0]) if r.get("rank_history") else "-",
        f"{r['count_seconds']:.1f}" if r.get("count_seconds") else "-",
        f"{r['cpu_seconds']:.1f}" if r.get("cpu_seconds") else "-",
        f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-",
        (f"{min(r['smallest_kept']):.0e} / {max(r['largest_dropped']):.0e}" if r.get("smallest_kept") else "-"),
        (f"{r['load_before']:.1f}" if r.get("load_before") else "-") + f" / {r['load_after']:.1f}"] for r in rows])


def _failure(row) -> str:
  if row.get("timed_out"):
    return "stopped (time limit)"
  error = row.get("error", "")
  if "max_terms" in error:
    return "stopped: max_terms" + (f" after round {error.split('after round ')[1].split()[0]}"
                                   if "after round " in error else "")
  return "error"


def _markdown(payload) -> str:
  rows, sweeps, machine = payload["rows"], payload["sweeps"], payload["machine"]
  done = [r for r in rows if r.get("count") is not None]
  within = [r for r in done if r["count_seconds"] <= 30 and r["peak_rss_mb"] <= 1024]
  agree = [r for r in rows if r.get("count") is not None and r.get("closed_form") is not None]
  outside = [r for r in rows if r not in within]
  lines = ["# Law counts: time and peak memory", "",
           f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, shared with other engineers' jobs "
           "(1-minute load average before and after each count in the last column: above 2 the two cores "
           "are oversubscribed and the wall time is inflated; the CPU time is the less load-sensitive "
           f"figure). OPENBLAS_NUM_THREADS={machine['blas_env'].get('OPENBLAS_NUM_THREADS')}. One cold "
           "`count_laws` per row in a fresh process (3 random points; method: `orbit` = pushforwards along "
           "the generators' closed-form flows, `polynomial` = exact brackets; wall and CPU time of the count, "
           "JAX's compilation included); peak RSS is the whole process, ~250 MB of it Python with JAX before "
           "counting. Gap: smallest kept / largest dropped scaled singular value (orbit: of the last round, "
           "which keeps nothing).", "",
           f"Targets (issue 17: at most 200 parameters, 2-4 layers, <= 30 s and <= 1 GB): {len(within)} of "
           f"{len(rows)} counts within; among them the slowest "
           f"{max(r['count_seconds'] for r in within):.1f} s wall / {max(r['cpu_seconds'] for r in within):.1f} s "
           f"CPU, largest peak RSS {max(r['peak_rss_mb'] for r in within):.0f} MB. "
           f"{sum(r['count'] == r['closed_form'] for r in agree)} of {len(agree)} counts with a closed form "
           "agree with it" + (f" ({payload['closed_forms_note']})" if payload.get("closed_forms_note") else "")
           + ". Outside the target: "
           + ("; ".join(f"{r['arch']} {'-'.join(map(str, r['dims']))} {r['flow']} "
                        + (f"{r['count_seconds']:.0f} s, {r['peak_rss_mb']:.0f} MB" if r.get("count") is not None
                           else _failure(r)) for r in outside) or "none")
           + "." + (f" {payload['rerun_note']}" if payload.get("rerun_note") else ""), "", _table(rows), ""]
  for arch, summary in sweeps.items():
    if "agree" not in summary:
      lines.append(f"- `riemod laws sweep --arch {arch} --nets 50` failed: {summary.get('error')}.")
      continue
    lines.append(
        f"- `riemod laws sweep --arch {arch} --nets 50` (gradient flow, <= 200 parameters, 2-4 layers, widths "
        f"1-8): {summary['agree']} of {summary['with_closed_form']} counts agree with the closed form "
        f"({summary['networks']} networks, {summary['ambiguous']} ambiguous, {summary['failed']} stopped by the "
        f"--timeout limit of {summary.get('timeout', 30):g} s per network or the max_terms guard); "
        f"{summary['seconds']:.0f} s of "
        f"counting ({summary['process_seconds']:.0f} s wall and {summary['process_cpu_seconds']:.0f} s CPU for the "
        f"whole command; load {summary['load_before']:.1f} before, {summary['load_after']:.1f} after)"
        + (f"; stopped: {', '.join(summary['stopped'])}; the other {summary['networks'] - len(summary['stopped'])} "
           f"took {summary['counted_seconds']:.0f} s." if summary.get("stopped") else "."))
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--timeout", type=float, default=120.0, help="seconds per count before it is stopped")
  parser.add_argument("--no-sweep", action="store_true", help="skip the two 50-network sweeps")
  parser.add_argument("--markdown-only", action="store_true",
                      help="rewrite law_counts.md from the existing law_counts.json")
  parser.add_argument("--sweep-only", action="store_true",
                      help="time the sweeps only, keeping the rows of the existing law_counts.json")
  parser.add_argument("--only", nargs="+", default=None, metavar="FLOW:DIMS",
                      help="re-count these rows (e.g. momentum:1,3,3,3,1) into the existing law_counts.json "
                           "and keep the others; implies --no-sweep unless --sweep is given")
  parser.add_argument("--sweep", action="store_true", help="with --only: also time the sweeps")
  args = parser.parse_args()
  from benchmarks.harness import machine_info  # pylint: disable=g-import-not-at-top
  results = pathlib.Path(__file__).resolve().parent / "results"
  if args.markdown_only:
    (results / "law_counts.md").write_text(_markdown(json.loads((results / "law_counts.json").read_text())))
    return
  cases = [ARCHITECTURES[i] for i in QUICK] if args.quick else ARCHITECTURES
  rows = []
  if args.only:
    previous = json.loads((results / "law_counts.json").read_text())
    rows, sweeps = previous["rows"], previous.get("sweeps", {})
    for spec in args.only:
      flow, dims = spec.split(":")
      dims = [int(d) for d in dims.split(",")]
      index = next(i for i, r in enumerate(rows) if r["dims"] == dims and r["flow"] == flow)
      row = count_in_child(rows[index]["arch"], tuple(dims), rows[index]["bias"], flow, args.timeout)
      row["load_after"] = os.getloadavg()[0]
      rows[index] = row
      print(json.dumps({k: row.get(k) for k in ("dims", "flow", "method", "count", "closed_form",
                                                  "count_seconds", "peak_rss_mb", "load_before")}), flush=True)
    if args.sweep:
      for arch in ("linear", "relu"):
        sweeps[arch] = sweep_seconds(arch, f"/tmp/riemod_law_sweep_{arch}")
        print(arch, sweeps[arch], flush=True)
    payload = {"machine": machine_info(), "rows": rows, "sweeps": sweeps,
               "closed_forms_note": previous.get("closed_forms_note"),
               "rerun_note": f"Rows re-counted {time.strftime('%Y-%m-%d')}: " + ", ".join(args.only)
                             + (" and both sweeps" if args.sweep else "")
                             + "; the others are from the earlier full run (same code path)."}
    (results / "law_counts.json").write_text(json.dumps(payload, indent=1, default=float))
    (results / "law_counts.md").write_text(_markdown(payload))
    return
  if args.sweep_only:
    rows = json.loads((results / "law_counts.json").read_text())["rows"]
  else:
    for arch, dims, bias in cases:
      for flow in FLOWS:
        row = count_in_child(arch, dims, bias, flow, args.timeout)
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("arch", "dims", "bias", "flow", "parameters", "count",
                                                    "closed_form", "count_seconds", "cpu_seconds",
                                                    "peak_rss_mb", "load_before", "load_after")}), flush=True)
  sweeps = {}
  if not args.sweep_only:
    # Written before the sweeps too, so that a failed sweep does not lose the rows.
    payload = {"machine": machine_info(), "rows": rows, "sweeps": sweeps}
    (results / "law_counts.json").write_text(json.dumps(payload, indent=1, default=float))
    (results / "law_counts.md").write_text(_markdown(payload))
  if not args.no_sweep:
    for arch in ("linear", "relu"):
      sweeps[arch] = sweep_seconds(arch, f"/tmp/riemod_law_sweep_{arch}")
      print(arch, sweeps[arch], flush=True)
  payload = {"machine": machine_info(), "rows": rows, "sweeps": sweeps}
  (results / "law_counts.json").write_text(json.dumps(payload, indent=1, default=float))
  (results / "law_counts.md").write_text(_markdown(payload))


if __name__ == "__main__":
  main()

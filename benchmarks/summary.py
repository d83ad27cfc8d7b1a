"""``SUMMARY.md``: every task's table, and issue 6's targets checked against the measured numbers.

All numbers are read from the task JSON files in the results directory; nothing is typed in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks import harness


def _load(out: Path, name: str) -> dict | None:
  path = out / f"{name}.json"
  return json.loads(path.read_text()) if path.exists() else None


def _runs(payload, optimizer):
  return [r for r in payload.get("runs", []) if r["optimizer"] == optimizer]


def _median_threshold(runs, key, field="steps"):
  return harness.median_or_none([r["thresholds"].get(key, {}).get(field) for r in runs])


def _median_final(runs, key):
  vals = [r["final"].get(key) for r in runs]
  vals = [float(v) if isinstance(v, (int, float)) else math.inf for v in vals]
  return harness.median_or_none(vals) if vals else None


def _ratio(payload, optimizer):
  t = payload.get("interleaved_timing", {}).get("optimizers", {}).get(optimizer)
  if t is not None:
    return t.get("ratio_to_adam")
  return harness.median_or_none([r.get("ratio_to_adam") for r in _runs(payload, optimizer)])


def _stable(runs):
  return f"{sum(harness.stable(r) for r in runs)}/{len(runs)}"


def _verdict(value, limit, smaller=True):
  if value is None and limit is not None:
    return "NOT met (riemod never reached it)", None
  if value is None or limit is None:
    return "not measured", None
  ok = value <= limit if smaller else value >= limit
  return ("met" if ok else "NOT met"), value / limit if limit else None


def targets(out: Path) -> list[list[Any]]:
  """Rows ``[task, target, measured, limit, verdict]``."""
  rows = []
  mlp = _load(out, "digits-mlp")
  if mlp:
    adam, rie = _runs(mlp, "adam"), _runs(mlp, "riemod")
    key = "train_loss<0.05"
    a_steps, r_steps = _median_threshold(adam, key), _median_threshold(rie, key)
    ratio = r_steps / a_steps if a_steps and r_steps else None
    rows.append(["digits-mlp", "steps to loss<0.05 <= 0.5x Adam", ratio, 0.5,
                 _verdict(ratio, 0.5)[0] + f" (riemod {harness.fmt(r_steps)}, Adam "
                 f"{harness.fmt(a_steps)} steps)"])
    t = _ratio(mlp, "riemod")
    rows.append(["digits-mlp", "step time <= 1.5x Adam (interleaved)", t, 1.5,
                 _verdict(t, 1.5)[0]])
    ra, aa = _median_final(rie, "test_accuracy"), _median_final(adam, "test_accuracy")
    rows.append(["digits-mlp", "test accuracy >= Adam's", ra, aa, _verdict(ra, aa, False)[0]])
    rows.append(["digits-mlp", "all seeds stable", _stable(rie), "all",
                 "met" if rie and all(harness.stable(r) for r in rie) else "NOT met"])
  ae = _load(out, "digits-autoencoder")
  if ae:
    rie, kfac = _runs(ae, "riemod"), _runs(ae, "kfac-jax")
    f = _median_final(rie, "train_loss")
    rows.append(["digits-autoencoder", "final loss <= 0.15", f, 0.15, _verdict(f, 0.15)[0]])
    rs = _median_threshold(rie, "train_loss<0.5", "seconds")
    ks = _median_threshold(kfac, "train_loss<0.5", "seconds")
    rows.append(["digits-autoencoder", "seconds to loss<0.5 <= kfac-jax's", rs, ks,
                 _verdict(rs, ks)[0] if kfac else "kfac-jax not run"])
    rows.append(["digits-autoencoder", "all seeds stable", _stable(rie), "all",
                 "met" if rie and all(harness.stable(r) for r in rie) else "NOT met"])
  pinn = _load(out, "poisson-pinn")
  if pinn:
    rie, gn = _runs(pinn, "riemod"), _runs(pinn, "dense-gn")
    best = harness.median_or_none([min(v for v in r["curve"]["rel_l2"]
                                       if isinstance(v, (int, float))) for r in rie]) if rie else None
    steps = [r["steps_run"] for r in rie]
    hit = _median_threshold(rie, "rel_l2<1e-06")
    rows.append(["poisson-pinn", "rel. L2 <= 1e-6 within 2000 steps", best, 1e-6,
                 ("met" if hit is not None and hit <= 2000 else "NOT met")
                 + f" (steps run {steps}; best error shown)"])
    tr, tg = _ratio(pinn, "riemod"), _ratio(pinn, "dense-gn")
    step_ratio = tr / tg if tr and tg else None
    rows.append(["poisson-pinn", "riemod step <= 0.3x dense GN step (interleaved)", step_ratio,
                 0.3, _verdict(step_ratio, 0.3)[0]])
    for level in ("1e-04", "1e-05", "1e-06"):
      rs_ = _median_threshold(rie, f"rel_l2<{level}", "seconds")
      gs_ = _median_threshold(gn, f"rel_l2<{level}", "seconds")
      if rs_ is not None or gs_ is not None:
        rows.append(["poisson-pinn", f"seconds to rel. L2 < {level}: riemod / dense GN",
                     rs_ / gs_ if rs_ and gs_ else None, 0.3,
                     (_verdict(rs_ / gs_, 0.3)[0] if rs_ and gs_ else
                      "NOT met (riemod never reached it)" if gs_ else "not measured")
                     + f": riemod {harness.fmt(rs_)} s, dense GN {harness.fmt(gs_)} s"])
  engd = _load(out, "engd-poisson")
  if engd:
    v = engd["verdict"]
    finals = {str(r["seed"]): r["final"]["l2"] for r in engd["runs"] if r["optimizer"] == "riemod"}
    rows.append(["engd-poisson", f"abs. L2 <= {engd['target_l2']:g} on 3/3 inits in "
                 f"{engd['iterations']} it.", v["riemod_inits_at_target"], "3/3",
                 ("met" if v["riemod_inits_at_target"] == "3/3" else "NOT met")
                 + " (riemod final " + ", ".join(f"{k}: {harness.fmt(x)}" for k, x in
                                                 finals.items()) + ")"])
    ratio = engd["interleaved_timing"]["optimizers"]["riemod"].get("ratio_to_authors")
    rows.append(["engd-poisson", "step time < the authors' ENGD (interleaved)", ratio, 1.0,
                 _verdict(ratio, 1.0)[0] + f" (faster on {v['riemod_faster_inits']} inits by "
                 "total step time)"])
  five = _load(out, "poisson5d")
  if five:
    ratio = five.get("step_ratio_dense_to_riemod")
    rows.append(["poisson5d", "dense GN step / riemod step >= 10 (interleaved)", ratio, 10,
                 _verdict(ratio, 10, False)[0] + f" (d = {five['rows_d']}, n = "
                 f"{five['parameters']})"])
    ttt = five.get("time_to_target") or {}
    rs_, ds_ = ttt.get("riemod_curve_s"), ttt.get("dense_s")
    rows.append(["poisson5d", f"time to rel. L2 {ttt.get('level', 1e-4):g}: riemod / dense <= 0.2",
                 rs_ / ds_ if rs_ and ds_ else None, 0.2,
                 _verdict(rs_ / ds_, 0.2)[0] if rs_ and ds_ else
                 f"NOT met (riemod did not reach it in {five.get('budget_s')} s)"])
  scaling = _load(out, "scaling")
  if scaling:
    rie = [e for e in scaling["entries"] if e["method"] == "riemod" and "temp_bytes" in e]
    big = [e for e in rie if e["K_bytes"] >= 8 * 2**20]  # where a materialised K would matter
    below = sum(e["temp_bytes"] < e["K_bytes"] for e in big)
    rows.append(["scaling", "riemod layerwise temp memory below the size of one materialised K "
                 "(configs where K >= 8 MiB)", f"{below}/{len(big)} configs (all sizes: "
                 f"{sum(e['temp_bytes'] < e['K_bytes'] for e in rie)}/{len(rie)})", "all",
                 "met" if big and below == len(big) else "NOT met"])
    for method in ("riemod", "adam", "dense"):
      sel = sorted((e for e in scaling["entries"] if e["method"] == method and e["width"] ==
                    256 and "median_step_seconds" in e), key=lambda e: e["batch"])
      if len(sel) >= 2:
        import math as _m
        slope = (_m.log(sel[-1]["median_step_seconds"]) - _m.log(sel[0]["median_step_seconds"])) / (
            _m.log(sel[-1]["batch"]) - _m.log(sel[0]["batch"]))
        rows.append(["scaling", f"{method}: log-log slope of step time vs batch (width 256)",
                     slope, "-", f"batch {sel[0]['batch']}..{sel[-1]['batch']}"])
  return rows


def write_summary(out: Path, quick: bool = False) -> None:
  lines = ["# Benchmark summary", ""]
  if quick:
    lines += ["**Quick smoke run** (`--quick`): shortened runs, no tuning, two seeds; not the "
              "reported numbers.", ""]
  status = out / "run_status.json"
  if status.exists():
    st = json.loads(status.read_text())
    lines += [f"Total wall time {st.get('total_seconds', 0):.0f} s; per task: " + ", ".join(
        f"{k} {v['seconds']:.0f} s (rc {v['returncode']})" for k, v in st.items()
        if k != "total_seconds"), ""]
  lines += ["## Targets (issue 6)", "",
            harness.markdown_table(["task", "target", "measured", "limit", "verdict"],
                                   targets(out)), ""]
  for name in ("digits-mlp", "digits-autoencoder", "poisson-pinn", "engd-poisson", "poisson5d",
               "scaling", "blr-sampling"):
    md = out / f"{name}.md"
    if md.exists():
      body = md.read_text().split("\n", 1)[1]
      lines += [f"## {name}", body, ""]
  for name in ("profile_digits_mlp", "profile_poisson_pinn"):
    md = out / f"{name}.md"
    if md.exists():
      lines += ["## " + md.read_text().split("\n", 1)[0].lstrip("# "), md.read_text().split(
          "\n", 1)[1], ""]
  if (out / "gpu" / "SUMMARY.md").exists():
    lines += ["GPU results of the same suite: [gpu/SUMMARY.md](gpu/SUMMARY.md).", ""]
  for name in ("digits-mlp", "digits-autoencoder"):
    kfac = out / f"kfac_{name}.json"
    if kfac.exists():
      payload = json.loads(kfac.read_text())
      if payload.get("error"):
        lines += [f"kfac-jax on {name}: not run: `{payload['error'].strip().splitlines()[-1]}`", ""]
  (out / "SUMMARY.md").write_text("\n".join(lines))


def write_docs(out: Path, docs: Path) -> None:
  """Replaces the results section of ``docs/benchmarks.md`` with ``out/SUMMARY.md``."""
  text = docs.read_text()
  start, end = "<!-- results:start -->", "<!-- results:end -->"
  body = (out / "SUMMARY.md").read_text().split("\n", 1)[1].replace("\n## ", "\n### ")
  rel = out.resolve().relative_to(Path(__file__).resolve().parents[1]) if out.resolve().is_relative_to(
      Path(__file__).resolve().parents[1]) else out
  images = sorted(p.name for p in out.glob("*.png"))
  body = body.replace("](gpu/SUMMARY.md)", f"](../{rel}/gpu/SUMMARY.md)")
  body += "\n\nPlots: " + ", ".join(f"[{name}](../{rel}/{name})" for name in images) + "\n"
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  docs.write_text(head + start + "\n" + body + "\n" + end + tail)


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(description="Rewrite SUMMARY.md (and the docs' results).")
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS)
  parser.add_argument("--docs", action="store_true", help="also update docs/benchmarks.md")
  args = parser.parse_args()
  write_summary(args.out)
  if args.docs:
    write_docs(args.out, Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")

"""Tune, report, re-time, write: the protocol every task follows.

1. **Tuning.** Each optimizer's grid (fixed in the task file before any run) is run on the tuning
   seeds ``{100, 101}``; the grid point with the best median score (task-defined; a diverged seed
   scores +inf) is kept.
2. **Report.** The kept hyperparameters run on the reported seeds ``{0, 1, 2}``: the same data,
   initial parameters and batch order for every optimizer of a seed.
3. **Interleaved re-timing** of the seed-0 final states (:func:`harness.interleaved_step_times`):
   the step-time ratios to Adam.
4. **Output**: ``<out>/<task>.json``, ``<out>/<task>.md`` and ``<out>/<task>_*.png``.

A task supplies a :class:`TaskSpec`; optimizers that raise ``NotImplementedError`` when built (an
option riemod does not have yet) are recorded as not run, with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks import harness

TUNING_SEEDS = (100, 101)
REPORT_SEEDS = (0, 1, 2)
# --quick: one tuning-free pass on two seeds, shorter re-timing.
QUICK = dict(report_seeds=(0,), timing_rounds=3, timing_burst=5)


def digits_grids(riemod_grid: Sequence[dict[str, Any]]) -> tuple[dict, dict]:
  """(full, quick) grids of the digits tasks: the shared Adam/SGD anchor grids beside riemod's."""
  full = {"adam": [dict(learning_rate=lr) for lr in (3e-3, 1e-2, 3e-2)],
          "sgd": [dict(learning_rate=lr, momentum=0.9) for lr in (0.03, 0.1, 0.3)],
          "riemod": list(riemod_grid)}
  quick = {"adam": [dict(learning_rate=1e-2)], "sgd": [dict(learning_rate=0.1, momentum=0.9)],
           "riemod": list(riemod_grid[:1])}
  return full, quick


def load_external(paths: Sequence[Path], task: str) -> list[dict[str, Any]]:
  """Runs of ``task`` from JSON files written in other environments (kfac-jax), marked external."""
  import json

  runs = []
  for path in paths:
    path = Path(path)
    if not path.exists():
      continue
    payload = json.loads(path.read_text())
    for r in payload.get("runs", []):
      if r.get("task", task) == task and r["optimizer"].startswith("kfac"):
        runs.append(dict(r, external=True, environment=payload.get("environment", "")))
  return runs


@dataclasses.dataclass
class TaskSpec:
  """What a task file provides.

  Attributes:
    name: task name (file stem of the results).
    num_steps: training steps per run.
    grids: ``{optimizer: [hyperparameter dicts]}``, fixed before the run; a single entry means no
      tuning.
    make_trainer: ``(optimizer, hyper, seed) -> harness.Trainer``.
    thresholds: ``{metric: [levels]}`` to reach (below).
    score: ``run result -> float`` (smaller is better) for tuning.
    final_keys: metrics shown in the tables.
    plots: ``[(metric, x axis)]`` curves to plot.
    eval_every: evaluation interval.
    time_budget_s: per-run cap on cumulative step time (runs beyond it stop and say so).
    tune_steps: steps of the tuning runs (default ``num_steps``), or ``{optimizer: steps}``.
    notes: free text for the Markdown file.
  """

  name: str
  num_steps: int
  grids: dict[str, list[dict[str, Any]]]
  make_trainer: Callable[[str, dict[str, Any], int], harness.Trainer]
  thresholds: dict[str, Sequence[float]]
  score: Callable[[dict[str, Any]], float]
  final_keys: Sequence[str]
  plots: Sequence[tuple[str, str]] = ()
  eval_every: int = 1
  time_budget_s: float | None = None
  tune_steps: int | dict[str, int] | None = None
  notes: str = ""
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _attempt(spec: TaskSpec, opt: str, hyper: dict[str, Any], seed: int, not_run: dict,
             num_steps: int | None = None):
  """Builds and trains one run; a failure (missing option, crash) is recorded, not raised."""
  try:
    trainer = spec.make_trainer(opt, hyper, seed)
    r = harness.run_training(trainer, num_steps or spec.num_steps, thresholds=spec.thresholds,
                             eval_every=spec.eval_every, time_budget_s=spec.time_budget_s)
  except Exception as error:  # noqa: BLE001 - recorded in the results with its reason
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    not_run.setdefault(opt, []).append({"hyperparameters": hyper, "reason": reason})
    _log(f"{spec.name} {opt} {hyper}: not run ({reason})")
    return None, None
  r["seed"] = seed
  return trainer, r


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_task(spec: TaskSpec, out: Path, *, tuning_seeds: Sequence[int] = TUNING_SEEDS,
             report_seeds: Sequence[int] = REPORT_SEEDS, timing_rounds: int = 7,
             timing_burst: int = 10, external_runs: Sequence[dict[str, Any]] = (),
             reference_name: str = "adam") -> dict:
  """Runs the whole protocol for one task and writes its results; returns the JSON payload."""
  started = time.perf_counter()
  machine_start = harness.machine_info()
  tuning, chosen, not_run = [], {}, {}
  for opt, grid in spec.grids.items():
    if len(grid) == 1:
      chosen[opt] = {"hyperparameters": grid[0], "scores": "single setting (not tuned)"}
      continue
    results = []
    for hyper in grid:
      for seed in tuning_seeds:
        steps = spec.tune_steps.get(opt) if isinstance(spec.tune_steps, dict) else spec.tune_steps
        trainer, r = _attempt(spec, opt, hyper, seed, not_run, steps)
        if r is None:
          break
        r["score"] = math.inf if r["diverged"] else spec.score(r)
        _log(f"{spec.name} tune {opt} {hyper} seed {seed}: score {r['score']:.4g} "
             f"({r['median_step_seconds'] * 1e3:.2f} ms/step)")
        r.pop("_state")
        r.pop("curve")
        results.append(r)
    tuning += results
    if results:
      chosen[opt] = harness.pick_best(results, spec.score)
  runs, finals, trainers = [], {}, {}
  for opt, pick in chosen.items():
    for seed in report_seeds:
      trainer, r = _attempt(spec, opt, pick["hyperparameters"], seed, not_run)
      if r is None:
        break
      _log(f"{spec.name} report {opt} seed {seed}: final {r['final']} diverged {r['diverged']} "
           f"({r['median_step_seconds'] * 1e3:.2f} ms/step)")
      if seed == report_seeds[0]:
        finals[opt], trainers[opt] = r["_state"], trainer
      r.pop("_state")
      runs.append(r)
  names = [n for n in trainers]
  timing = harness.interleaved_step_times([trainers[n] for n in names], [finals[n] for n in names],
                                          rounds=timing_rounds, burst=timing_burst,
                                          reference=reference_name)
  _log(f"{spec.name} interleaved: " + ", ".join(
      f"{n} {v['median_step_seconds'] * 1e3:.2f} ms x{v.get('ratio_to_adam', float('nan')):.2f}"
      for n, v in timing["optimizers"].items()))
  runs += list(external_runs)
  for r in runs:
    t = timing["optimizers"].get(r["optimizer"])
    if t is not None:
      r["interleaved_median_step_seconds"] = t["median_step_seconds"]
      r["ratio_to_adam"] = t.get("ratio_to_adam")
  payload = {
      "task": spec.name, "num_steps": spec.num_steps, "thresholds": spec.thresholds,
      "tuning_seeds": list(tuning_seeds), "report_seeds": list(report_seeds),
      "grids": spec.grids, "chosen": chosen, "not_run": not_run, "tuning": tuning,
      "runs": runs, "interleaved_timing": timing, "machine": machine_start,
      "loadavg_end": harness.machine_info()["loadavg"],
      "wall_seconds": time.perf_counter() - started, "notes": spec.notes, "extra": spec.extra,
      "final_keys": list(spec.final_keys),
  }
  write_outputs(spec, out, payload)
  return payload


def threshold_keys(spec: TaskSpec) -> list[str]:
  return [f"{m}<{lv:g}" for m, levels in spec.thresholds.items() for lv in levels]


def rewrite_markdown(json_path: Path) -> None:
  """Rebuilds ``<task>.md`` from its JSON (after a change to the table code); no plots."""
  import json

  payload = json.loads(Path(json_path).read_text())
  finals = [k for k in payload["runs"][0]["final"]] if payload["runs"] else []
  spec = TaskSpec(name=payload["task"], num_steps=payload["num_steps"], grids=payload["grids"],
                  make_trainer=None, thresholds=payload["thresholds"], score=None,
                  final_keys=payload.get("final_keys", finals), notes=payload.get("notes", ""))
  write_outputs(spec, Path(json_path).parent, payload, json_too=False)


def write_outputs(spec: TaskSpec, out: Path, payload: dict[str, Any], json_too: bool = True) -> None:
  out.mkdir(parents=True, exist_ok=True)
  if json_too:
    harness.write_json(out / f"{spec.name}.json", payload)
  header, rows = harness.summary_rows(payload["runs"], payload["interleaved_timing"],
                                      threshold_keys(spec), spec.final_keys)
  m = payload["machine"]
  lines = [f"# {spec.name}", "",
           f"Medians over seeds {payload['report_seeds']} (hyperparameters tuned on seeds "
           f"{payload['tuning_seeds']}); {spec.num_steps} steps. Seconds count step time only "
           "(evaluation excluded). Step-time ratios from interleaved re-timing. Stable: not "
           "diverged and not climbed back (final value of the first metric > 10x its best).", "",
           harness.markdown_table(header, rows), "",
           "Chosen hyperparameters:", ""]
  for opt, pick in payload["chosen"].items():
    lines.append(f"- {opt}: `{pick['hyperparameters']}`")
  for opt, items in payload["not_run"].items():
    for item in items:
      lines.append(f"- not run: {opt} `{item['hyperparameters']}`: {item['reason']}")
  ext = [r for r in payload["runs"] if r.get("external")]
  for r in ext[:1]:
    lines.append(f"- {r['optimizer']} ran in its own environment: {r.get('environment', '')}")
  lines += ["", f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, backend {m['backend']}, "
            f"load {m['loadavg']} -> {payload['loadavg_end']}, BLAS env {m['blas_env']}, "
            f"versions {m['versions']}.", ""]
  if spec.notes:
    lines += [spec.notes, ""]
  (out / f"{spec.name}.md").write_text("\n".join(lines))
  for metric, x in spec.plots:
    harness.plot_curves(out / f"{spec.name}_{metric}_{x}.png".replace("<", "lt"),
                        payload["runs"], metric, x=x, title=f"{spec.name}: {metric}")


def task_main(spec: Callable[[bool], TaskSpec], name: str, description: str | None,
              argv: Sequence[str] | None = None) -> dict:
  """The command line of a protocol task: ``--quick``, ``--out DIR``, ``--external JSON...``."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS)
  parser.add_argument("--external", type=Path, nargs="*", default=[],
                      help="JSON runs from other environments (kfac-jax) to merge")
  args = parser.parse_args(argv)
  return run_task(spec(args.quick), args.out, external_runs=load_external(args.external, name),
                  **(QUICK if args.quick else {}))

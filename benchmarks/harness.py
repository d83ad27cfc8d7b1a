"""The shared timing protocol of the benchmark suite.

What is measured, for every optimizer of a task, in one process:

* **Training curves.** Every step is a jitted function, compiled (lowered and run once on a
  throw-away state) before timing. Each step is timed with ``time.perf_counter`` around the call
  and ``jax.block_until_ready`` on its result; evaluation (full-train loss, test metrics) runs
  between steps and is *not* counted. "Seconds to threshold" is the cumulative step time up to the
  first step whose evaluated metric crosses the threshold.
* **Step-time ratios.** Training runs one optimizer after another, so a load spike from another
  process can hit one optimizer and not the others. Ratios to Adam therefore come from a separate
  interleaved re-timing: rounds in which every optimizer runs a short burst of steps in turn on the
  same batches; the ratio is the median over rounds of (burst median / Adam's burst median in the
  same round).
* **Machine.** CPU model, core count, ``os.getloadavg()`` before and after, BLAS thread
  variables, the jax backend and devices, and the versions of jax, jaxlib, flax, optax, riemod.

This module imports jax and numpy only (riemod optionally), so that the kfac-jax runner, which
lives in its own environment with an older jax, shares it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- machine information
def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
  try:
    return __import__(module).__version__
  except Exception:  # noqa: BLE001 - a missing package is recorded as None
    return None


def _git_state() -> str | None:
  """Commit of the checkout and whether riemod/ has uncommitted changes (riemod is developed live)."""
  import subprocess

  root = Path(__file__).resolve().parents[1]
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                          text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "riemod"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return head + (" + uncommitted riemod changes" if dirty else "")
  except Exception:  # noqa: BLE001
    return None


def machine_info() -> dict[str, Any]:
  """Everything a reader needs to judge a timing: hardware, load, threads, versions."""
  try:
    import jaxlib
    jaxlib_version = jaxlib.__version__
  except Exception:  # noqa: BLE001
    jaxlib_version = None
  devices = jax.devices()
  return {
      "cpu_model": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "loadavg": list(os.getloadavg()),
      "blas_env": {k: os.environ.get(k) for k in BLAS_VARIABLES},
      "backend": jax.default_backend(),
      "devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind if devices else None,
      "x64": bool(jax.config.jax_enable_x64),
      "python": platform.python_version(),
      "versions": {name: _version(name) for name in ("jax", "flax", "optax", "riemod", "kfac_jax",
                                                      "numpy", "scipy", "sklearn")}
      | {"jaxlib": jaxlib_version},
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      "git": _git_state(),
  }


# --------------------------------------------------------------------------- one training run
@dataclasses.dataclass
class Trainer:
  """A compiled optimizer on one problem.

  Attributes:
    name: the optimizer's name in the results ("adam", "sgd", "riemod", ...).
    hyper: its hyperparameters (recorded verbatim).
    init: ``() -> state`` (a fresh state from the shared initial parameters).
    step: ``(state, step_index) -> (state, loss)``; jitted; the batch is looked up from the step
      index inside, so every optimizer sees the same batch order.
    evaluate: ``state -> {metric: float}`` (not timed).
  """

  name: str
  hyper: dict[str, Any]
  init: Callable[[], Any]
  step: Callable[[Any, Any], Any]
  evaluate: Callable[[Any], dict[str, float]]
  warmup_steps: int = 1  # steps run on a throw-away state before timing (compiles every variant)


def _finite(x) -> bool:
  try:
    return math.isfinite(float(x))
  except (TypeError, ValueError):
    return False


def run_training(trainer: Trainer, num_steps: int, *, thresholds: dict[str, Sequence[float]],
                 eval_every: int = 1, time_budget_s: float | None = None,
                 diverge_factor: float = 1e3) -> dict[str, Any]:
  """Trains for ``num_steps``, timing every step, evaluating every ``eval_every`` steps.

  Args:
    trainer: the optimizer.
    num_steps: steps to run.
    thresholds: ``{metric: [levels]}``; the metric must go *below* each level.
    eval_every: evaluation interval (evaluation is not timed).
    time_budget_s: stop early (recorded) when the cumulative step time passes this.
    diverge_factor: stop and mark diverged when the first metric exceeds this multiple of its
      initial value or is not finite.

  Returns:
    A dict with the curve (``steps``, ``seconds``, metrics), per-threshold ``steps``/``seconds``,
    final metrics, the median step time and a ``stable`` flag.
  """
  state = trainer.init()
  # Compile before timing: run the warm-up steps on a fresh state and discard it.
  t0 = time.perf_counter()
  scratch = trainer.init()
  for i in range(trainer.warmup_steps):
    scratch, loss = trainer.step(scratch, i)
    jax.block_until_ready((scratch, loss))
  del scratch
  compile_s = time.perf_counter() - t0
  first = trainer.evaluate(state)
  watch = next(iter(thresholds)) if thresholds else next(iter(first))
  curve = {"step": [0], "seconds": [0.0]} | {k: [v] for k, v in first.items()}
  step_times, total, diverged, stopped = [], 0.0, False, False
  for i in range(num_steps):
    t = time.perf_counter()
    state, loss = trainer.step(state, i)
    jax.block_until_ready((state, loss))
    dt = time.perf_counter() - t
    step_times.append(dt)
    total += dt
    if (i + 1) % eval_every == 0 or i + 1 == num_steps:
      metrics = trainer.evaluate(state)
      curve["step"].append(i + 1)
      curve["seconds"].append(total)
      for k, v in metrics.items():
        curve[k].append(v)
      value = metrics[watch]
      if not _finite(value) or value > diverge_factor * max(abs(first[watch]), 1e-12):
        diverged = True
        break
    if time_budget_s is not None and total > time_budget_s:
      stopped = True
      break
  final = {k: v[-1] for k, v in curve.items() if k not in ("step", "seconds")}
  crossings = {}
  for metric, levels in thresholds.items():
    for level in levels:
      hit = next((j for j, v in enumerate(curve[metric]) if _finite(v) and v < level), None)
      crossings[f"{metric}<{level:g}"] = {
          "steps": None if hit is None else curve["step"][hit],
          "seconds": None if hit is None else curve["seconds"][hit]}
  return {
      "optimizer": trainer.name, "hyperparameters": trainer.hyper,
      "steps_run": len(step_times), "compile_seconds": compile_s,
      "median_step_seconds": statistics.median(step_times) if step_times else None,
      "total_step_seconds": total, "thresholds": crossings, "final": final,
      "diverged": diverged, "stopped_by_budget": stopped, "curve": curve,
      "_state": state,
  }


def interleaved_step_times(trainers: Sequence[Trainer], states: Sequence[Any], *, rounds: int = 7,
                           burst: int = 10, reference: str = "adam") -> dict[str, Any]:
  """Step times from interleaved bursts, and ratios to ``reference`` within each round.

  Every round runs ``burst`` steps of each optimizer in turn (order rotated every round), each
  step timed after ``block_until_ready``, starting from the given (trained) states and the same
  step indices. Returns per optimizer the median step seconds over all bursts and the median over
  rounds of the per-round ratio to the reference optimizer.
  """
  states = list(states)
  per_round: dict[str, list[float]] = {t.name: [] for t in trainers}
  for r in range(rounds):
    order = list(range(len(trainers)))
    order = order[r % len(order):] + order[:r % len(order)]
    for j in order:
      trainer, state, times = trainers[j], states[j], []
      for i in range(burst):
        t = time.perf_counter()
        state, loss = trainer.step(state, i)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - t)
      states[j] = state
      per_round[trainer.name].append(statistics.median(times))
  out = {}
  for name, times in per_round.items():
    entry = {"median_step_seconds": statistics.median(times)}
    if reference in per_round:
      ratios = [a / b for a, b in zip(times, per_round[reference])]
      entry["ratio_to_adam"] = statistics.median(ratios)  # the reference is always an Adam
      entry["ratio_spread"] = [min(ratios), max(ratios)]
    out[name] = entry
  return {"rounds": rounds, "burst": burst, "reference": reference, "optimizers": out}


def time_interleaved(fns: dict[str, tuple[Callable, tuple]], *, rounds: int = 7, burst: int = 10,
                     reference: str | None = None) -> dict[str, dict[str, Any]]:
  """Median seconds of jitted functions timed in interleaved bursts (order rotated every round).

  ``fns`` maps a name to ``(compiled function, arguments)``; each is run once before timing. With
  ``reference``, each entry also gets the median over rounds of its burst median divided by the
  reference's in the same round (``ratio``) and the spread of those ratios.
  """
  for fn, args in fns.values():
    jax.block_until_ready(fn(*args))
  names = list(fns)
  per_round: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      fn, args = fns[name]
      times = []
      for _ in range(burst):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
      per_round[name].append(statistics.median(times))
  out = {}
  for name, times in per_round.items():
    entry: dict[str, Any] = {"median_seconds": statistics.median(times)}
    if reference is not None:
      ratios = [a / b for a, b in zip(times, per_round[reference])]
      entry["ratio"] = statistics.median(ratios)
      entry["ratio_spread"] = [min(ratios), max(ratios)]
    out[name] = entry
  return out


# --------------------------------------------------------------------------- tuning
def pick_best(results: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> dict:
  """The hyperparameters whose median ``key`` over seeds is smallest (diverged runs: +inf)."""
  by_hyper: dict[str, list[dict]] = {}
  for r in results:
    by_hyper.setdefault(json.dumps(r["hyperparameters"], sort_keys=True), []).append(r)
  scored = []
  for h, rs in by_hyper.items():
    scores = [math.inf if r["diverged"] else key(r) for r in rs]
    scored.append((max(scores) if math.inf in scores else statistics.median(scores), h))
  scored.sort(key=lambda s: s[0])
  return {"hyperparameters": json.loads(scored[0][1]),
          "scores": {h: s for s, h in scored}}


# --------------------------------------------------------------------------- output
def _clean(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    v = float(obj)
    return v if math.isfinite(v) else str(v)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, np.ndarray) or hasattr(obj, "shape"):
    return _clean(np.asarray(obj).tolist())
  return obj


def write_json(path: Path, payload: dict[str, Any]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_clean(payload), indent=1))


def fmt(x: Any, digits: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, str):
    return x
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    return str(int(x))
  x = float(x)
  if not math.isfinite(x):
    return str(x)
  if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
    return f"{x:.{digits - 1}e}"
  return f"{x:.{digits}g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def median_or_none(values: Sequence[Any]) -> Any:
  """Median over seeds; ``None`` (never reached) counts as +inf, so a majority decides."""
  vals = [math.inf if v is None else float(v) for v in values]
  if not vals:
    return None
  m = statistics.median(vals)
  return None if math.isinf(m) else m


def plot_curves(path: Path, runs: Sequence[dict[str, Any]], metric: str, *, x: str = "step",
                title: str = "", logy: bool = True) -> None:
  """One line per (optimizer, seed), colour per optimizer."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  colours: dict[str, Any] = {}
  for run in runs:
    name = run["optimizer"]
    colour = colours.setdefault(name, f"C{len(colours)}")
    curve = run["curve"]
    if metric not in curve:
      continue
    xs = curve[x]
    ys = [float(v) if _finite(v) else np.nan for v in curve[metric]]
    ax.plot(xs, ys, color=colour, alpha=0.8, lw=1,
            label=name if run.get("seed") == min(r.get("seed", 0) for r in runs
                                                   if r["optimizer"] == name) else None)
  if logy:
    ax.set_yscale("log")
  ax.set_xlabel("step" if x == "step" else "seconds (step time only)")
  ax.set_ylabel(metric)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def regressed(run: dict[str, Any]) -> bool:
  """A run that got good and then climbed back: its final value of the first curve metric is
  more than 10x its best value (and above 1e-3). Counted as unstable beside divergence."""
  curve = run.get("curve", {})
  key = next((k for k in curve if k not in ("step", "seconds") and "accuracy" not in k), None)
  if key is None:
    return False
  vals = [float(v) for v in curve[key] if _finite(v)]
  if not vals:
    return False
  return vals[-1] > 10 * min(vals) and vals[-1] > 1e-3


def stable(run: dict[str, Any]) -> bool:
  return not run["diverged"] and not regressed(run)


def summary_rows(runs: Sequence[dict[str, Any]], timing: dict[str, Any], threshold_keys: Sequence[str],
                 final_keys: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
  """Medians over seeds per optimizer: steps/seconds to thresholds, finals, step time, ratio."""
  header = ["optimizer", "stable seeds"]
  for k in threshold_keys:
    header += [f"steps to {k}", f"s to {k}"]
  header += [f"final {k}" for k in final_keys]
  header += ["median step ms", "ratio to adam (interleaved)"]
  rows = []
  names = list(dict.fromkeys(r["optimizer"] for r in runs))
  for name in names:
    rs = [r for r in runs if r["optimizer"] == name]
    row = [name, f"{sum(stable(r) for r in rs)}/{len(rs)}"]
    for k in threshold_keys:
      row.append(median_or_none([r["thresholds"][k]["steps"] for r in rs]))
      row.append(median_or_none([r["thresholds"][k]["seconds"] for r in rs]))
    for k in final_keys:
      vals = [r["final"].get(k) for r in rs]
      vals = [float(v) if _finite(v) else math.inf for v in vals]
      row.append(statistics.median(vals) if vals else None)
    t = timing.get("optimizers", {}).get(name)
    if t is None:  # an external run (own process): its own interleaved numbers, if any
      t = {"median_step_seconds": median_or_none(
          [r.get("interleaved_median_step_seconds", r["median_step_seconds"]) for r in rs]),
           "ratio_to_adam": median_or_none([r.get("ratio_to_adam") for r in rs])}
    med = t.get("median_step_seconds")
    row.append(1e3 * med if med is not None else None)
    row.append(t.get("ratio_to_adam"))
    rows.append(row)
  return header, rows

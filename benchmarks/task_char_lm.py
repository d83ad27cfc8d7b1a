"""char-lm: a character-level transformer LM (2 blocks, width 128, context 64) on Python's sources.

The model, data and riemod step are those of ``examples/transformer_lm.py`` (token and position
embeddings, LayerNorm, causal attention, GELU MLP; the standard library's ``.py`` files, 1M
characters, last 10% for validation). riemod: layerwise natural gradient with the adaptive mass and
the per-token sampled softmax Fisher (one probe per sequence); AdamW (decoupled weight decay 0.01)
with the same warm-up and global-norm clip. Both train on the same batches under the same
step-time budget.

Measured: validation loss (64 fixed windows, evaluated every ``EVAL_EVERY`` steps, not timed) at
equal wall time (the final value under the budget) and at equal steps (both curves at the
largest step both reached), seconds to validation loss below the thresholds, median step time and
the interleaved step-time ratio to AdamW. ``--scaling`` instead records riemod's and AdamW's step
time and XLA's memory (arguments + temporaries of the compiled step) against batch size and
sequence length.

Target (issue 13): riemod's validation loss at equal wall time <= AdamW's, and below it at equal
steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import harness, protocol

NAME = "char-lm"
CHARS = 1_000_000
BATCH, CONTEXT, WIDTH, DEPTH = 32, 64, 128, 2
EVAL_EVERY = 25
THRESHOLDS = [2.5, 2.2]
BUDGET_S = 60.0  # step time per run (equal wall time for every optimizer)

# riemod's grid. With the adaptive mass the step outside the factor rows' range is
# (lr / mass) g / sqrt(v), and SPRING momentum mu is heavy-ball momentum there (x 1 / (1 - mu)), so
# (lr / mass) / (1 - mu) plays the part of Adam's rate. The earlier grid (lr 0.3-1.0, mass 30,
# mu 0.9: 0.1-0.33) sat 30-100x above AdamW's best 3e-3 and plateaued at validation loss ~2.5.
# Short runs (300 steps, seed 100, val loss at 300; AdamW lr 3e-3: 1.80): lr 0.01 / mass 30 / mu
# 0.9 (3.3e-3) 1.75, lr 0.03 / mass 100 / mu 0.9 (3e-3) 1.75, lr 0.03 / mass 30 / mu 0.9 (1e-2)
# 1.80; momentum helps at equal rate (lr 0.3 / mass 100 / mu 0: 1.86); and the batch rows help:
# the same rate with a mass of 1e6 (rows negligible, heavy-ball Adam) gives 1.80. The grid spans
# rates 3e-3-6.7e-3 (the 60 s budget gives riemod few steps, which favours the larger rate).
GRIDS = {
    "adam": [dict(learning_rate=lr, weight_decay=0.01, warmup=50, clip=1.0) for lr in (3e-3, 1e-2)],
    "riemod": [dict(learning_rate=lr, mass=mass, momentum=0.9, warmup=50, clip=1.0)
               for lr, mass in ((0.01, 30.0), (0.02, 30.0), (0.03, 100.0))],
}
QUICK_GRIDS = {name: grid[:1] for name, grid in GRIDS.items()}


def _example():
  path = Path(__file__).resolve().parents[1] / "examples" / "transformer_lm.py"
  spec = importlib.util.spec_from_file_location("transformer_lm", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class CharLMTask:
  """Data and compiled steps shared by every run of the task."""

  def __init__(self, num_steps: int, batch: int = BATCH, context: int = CONTEXT):
    self.lm = _example()
    data, self.vocab = self.lm.encode(self.lm.load_text(CHARS))
    split = int(0.9 * len(data))
    self.train, self.val = data[:split], data[split:]
    self.num_steps, self.batch, self.context = num_steps, batch, context
    self.graphdef, _ = nnx.split(self._model(0))
    self.validation = self.lm.validation_loss_fn(self.graphdef, self.val, context)
    self._cache = {}

  def _model(self, seed):
    return self.lm.CharLM(len(self.vocab), width=WIDTH, depth=DEPTH, context=self.context,
                          seed=seed)

  def compiled(self, opt: str, hyper: dict):
    key = opt + json.dumps(hyper, sort_keys=True)
    if key not in self._cache:
      if opt == "adam":
        schedule = optax.linear_schedule(0.0, hyper["learning_rate"], hyper["warmup"])
        tx = optax.chain(optax.clip_by_global_norm(hyper["clip"]),
                         optax.adamw(schedule, weight_decay=hyper["weight_decay"]))
        step = self.lm.adamw_step(self.graphdef, tx)
      else:
        tx = self.lm.riemod_transform(hyper["learning_rate"], hyper["mass"], hyper["momentum"],
                                      hyper["clip"], hyper["warmup"])
        step = self.lm.riemod_step(self.graphdef, tx)
      self._cache[key] = (tx, step)
    return self._cache[key]

  def trainer(self, opt: str, hyper: dict, seed: int) -> harness.Trainer:
    tx, step = self.compiled(opt, hyper)
    starts = self.lm.batch_starts(len(self.train), self.num_steps, self.batch, self.context, seed)
    _, params0 = nnx.split(self._model(seed))

    def init():
      return params0, tx.init(params0)

    def one_step(state, i):
      x, y = map(jnp.asarray, self.lm.windows(self.train, starts[i % len(starts)], self.context))
      key = jax.random.fold_in(jax.random.key(seed), i)
      params, opt_state, loss = step(state[0], state[1], x, y, key)
      return (params, opt_state), loss

    def evaluate(state):
      return {"val_loss": float(self.validation(state[0]))}

    return harness.Trainer(opt, hyper, init, one_step, evaluate)


def spec(quick: bool = False, untuned: bool = False) -> protocol.TaskSpec:
  num_steps = 2000
  task = CharLMTask(num_steps)
  return protocol.TaskSpec(
      name=NAME, num_steps=num_steps, grids=QUICK_GRIDS if quick or untuned else GRIDS,
      make_trainer=task.trainer, thresholds={"val_loss": THRESHOLDS},
      score=lambda r: r["final"]["val_loss"], final_keys=["val_loss"],
      plots=[("val_loss", "step"), ("val_loss", "seconds")], eval_every=EVAL_EVERY,
      time_budget_s=(20.0 if quick else BUDGET_S),
      notes=f"Every run stops after {BUDGET_S:g} s of step time (equal wall time); the final "
            "validation loss is the value at that time. 'adam' is AdamW (weight decay 0.01). "
            "Equal-steps comparison: char-lm_equal.md.")


def equal_steps(payload: dict) -> list[str]:
  """Validation loss of each optimizer at the largest step every optimizer reached, per seed."""
  by_seed: dict[int, dict[str, dict]] = {}
  for r in payload["runs"]:
    by_seed.setdefault(r["seed"], {})[r["optimizer"]] = r["curve"]
  lines = ["| seed | step | " + " | ".join(sorted(next(iter(by_seed.values())))) + " |",
           "|---:|---:|" + "---:|" * len(next(iter(by_seed.values())))]
  for seed, curves in sorted(by_seed.items()):
    step = min(max(c["step"]) for c in curves.values())
    values = []
    for name in sorted(curves):
      c = curves[name]
      values.append(c["val_loss"][c["step"].index(max(s for s in c["step"] if s <= step))])
    lines.append(f"| {seed} | {step} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
  return lines


SCALING_BATCHES = (8, 16, 32, 64)  # at context CONTEXT
SCALING_CONTEXTS = (16, 32, 64, 128)  # at batch BATCH


def log_log_slope(xs, ys) -> float:
  """Least-squares slope of ``log y`` against ``log x`` (1: linear, 2: quadratic)."""
  return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


def scaling(out: Path, batches=SCALING_BATCHES, contexts=SCALING_CONTEXTS, rounds: int = 7,
            burst: int = 5) -> dict:
  """Step time and XLA's memory plan of riemod's and AdamW's step against batch size (at context
  ``CONTEXT``) and context (at batch ``BATCH``), with the log-log slopes and one plot.

  Per setting both compiled steps (the chosen riemod setting and AdamW, ``GRIDS``' first
  entries) are timed in interleaved bursts on the same batch (:func:`harness.time_interleaved`),
  so the ratio is robust to load; memory is XLA's buffer assignment of the compiled step
  (arguments and temporaries, ``memory_analysis()``), not the process's RSS.
  """
  rows = []
  settings = [(b, CONTEXT) for b in batches] + [(BATCH, t) for t in contexts if (BATCH, t) not in
                                                [(b, CONTEXT) for b in batches]]
  for batch, context in settings:
    task = CharLMTask(num_steps=1, batch=batch, context=context)
    _, params = nnx.split(task._model(0))
    x, y = map(jnp.asarray, task.lm.windows(task.train, np.arange(batch) * 1000, context))
    fns, memory = {}, {}
    for opt in ("adam", "riemod"):
      tx, step = task.compiled(opt, GRIDS[opt][0])
      args = (params, tx.init(params), x, y, jax.random.key(0))
      stats = step.lower(*args).compile().memory_analysis()
      memory[opt] = {"argument_bytes": stats.argument_size_in_bytes,
                     "output_bytes": stats.output_size_in_bytes,
                     "alias_bytes": stats.alias_size_in_bytes,
                     "temp_bytes": stats.temp_size_in_bytes}
      fns[opt] = (step, args)
    load = list(os.getloadavg())
    timed = harness.time_interleaved(fns, rounds=rounds, burst=burst, reference="adam")
    for opt in ("adam", "riemod"):
      rows.append({"optimizer": opt, "batch": batch, "context": context,
                   "median_step_seconds": timed[opt]["median_seconds"],
                   "ratio_to_adamw": timed[opt]["ratio"],
                   "ratio_spread": timed[opt]["ratio_spread"], **memory[opt],
                   "loadavg_start": load, "loadavg_end": list(os.getloadavg())})
      print({k: rows[-1][k] for k in ("optimizer", "batch", "context", "median_step_seconds",
                                       "temp_bytes", "loadavg_end")}, flush=True)
  payload = {"rows": rows, "rounds": rounds, "burst": burst,
             "grids": {opt: GRIDS[opt][0] for opt in ("adam", "riemod")},
             "machine": harness.machine_info()}
  payload["slopes"] = scaling_slopes(rows)
  harness.write_json(out / "char-lm_scaling.json", payload)
  scaling_report(out, payload)
  return payload


def _series(rows, opt, axis):
  fixed = ("context", CONTEXT) if axis == "batch" else ("batch", BATCH)
  return sorted((r for r in rows if r["optimizer"] == opt and r[fixed[0]] == fixed[1]),
                key=lambda r: r[axis])


def scaling_slopes(rows: list[dict]) -> list[dict]:
  """Log-log slopes of step time, temporaries and peak (arguments + temporaries) per optimizer
  against batch and context, and of riemod's temporaries above AdamW's (what riemod adds)."""
  slopes = []
  for axis in ("batch", "context"):
    for opt in ("adam", "riemod"):
      sel = _series(rows, opt, axis)
      if len(sel) < 2:
        continue
      xs = [r[axis] for r in sel]
      slopes.append({"optimizer": opt, "against": axis, "range": [xs[0], xs[-1]],
                     "step_time": log_log_slope(xs, [r["median_step_seconds"] for r in sel]),
                     "temp_bytes": log_log_slope(xs, [r["temp_bytes"] for r in sel]),
                     "peak_bytes": log_log_slope(
                         xs, [r["argument_bytes"] + r["temp_bytes"] for r in sel])})
    adam, riemod = _series(rows, "adam", axis), _series(rows, "riemod", axis)
    if len(riemod) >= 2 and [r[axis] for r in adam] == [r[axis] for r in riemod]:
      xs = [r[axis] for r in riemod]
      slopes.append({"optimizer": "riemod - adam", "against": axis, "range": [xs[0], xs[-1]],
                     "step_time": log_log_slope(xs, [r["median_step_seconds"] -
                                                     a["median_step_seconds"]
                                                     for r, a in zip(riemod, adam)]),
                     "temp_bytes": log_log_slope(xs, [r["temp_bytes"] - a["temp_bytes"]
                                                      for r, a in zip(riemod, adam)]),
                     "peak_bytes": None})
  return slopes


def scaling_report(out: Path, payload: dict) -> None:
  """``char-lm_scaling.md`` and ``char-lm_scaling.png`` from the sweep's payload."""
  rows, slopes = payload["rows"], payload["slopes"]
  rounds, burst = payload["rounds"], payload["burst"]
  _scaling_plot(out / "char-lm_scaling.png", rows)
  loads = [x for r in rows for x in (r["loadavg_start"][0], r["loadavg_end"][0])]
  name = {"adam": "AdamW", "riemod": "riemod", "riemod - adam": "riemod above AdamW"}
  lines = ["# char-lm: step time and memory against batch size and context", "",
           f"Model of `char-lm` (width {WIDTH}, {DEPTH} blocks); riemod `{GRIDS['riemod'][0]}` "
           "(layerwise, adaptive mass, per-token sampled softmax Fisher, one probe per sequence: "
           f"d = batch rows per block), AdamW `{GRIDS['adam'][0]}`. Machine: "
           f"{payload['machine']['cpu_model']}, {payload['machine']['cpu_count']} cores, shared "
           f"(1-minute load {min(loads):.1f}-{max(loads):.1f} during the sweep): times are "
           f"medians of {rounds} interleaved rounds of {burst} steps per optimizer and setting; "
           "the ratio (median over rounds of riemod's burst median over AdamW's) is the robust "
           "number. Memory is XLA's buffer assignment of the compiled step "
           "(`memory_analysis()`: arguments, i.e. parameters, optimizer state and batch, and "
           "temporaries), not RSS; peak = arguments + temporaries. Command: "
           "`OPENBLAS_NUM_THREADS=1 nice -n 5 python -m benchmarks.task_char_lm --scaling`.", "",
           "| optimizer | batch | context | step ms | riemod / AdamW (spread) | arguments MB | "
           "temporaries MB | peak MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ratio = (f"{r['ratio_to_adamw']:.2f} ({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f})"
             if r["optimizer"] == "riemod" else "1")
    lines.append(f"| {name[r['optimizer']]} | {r['batch']} | {r['context']} | "
                 f"{r['median_step_seconds'] * 1e3:.1f} | {ratio} | "
                 f"{r['argument_bytes'] / 2**20:.1f} | {r['temp_bytes'] / 2**20:.1f} | "
                 f"{(r['argument_bytes'] + r['temp_bytes']) / 2**20:.1f} |")
  lines += ["", "Log-log slopes (least squares over the settings; 1 = linear):", "",
            "| optimizer | against | range | step time | temporaries | peak |",
            "|---|---|---|---:|---:|---:|"]
  lines += [f"| {name[s['optimizer']]} | {s['against']} | {s['range'][0]}-{s['range'][1]} | "
            f"{s['step_time']:.2f} | {s['temp_bytes']:.2f} | "
            + ("-" if s["peak_bytes"] is None else f"{s['peak_bytes']:.2f}") + " |"
            for s in slopes]
  lines += ["", "Plot: [char-lm_scaling.png](char-lm_scaling.png) (log-log; solid: step time, "
            "dashed: temporaries)."]
  (out / "char-lm_scaling.md").write_text("\n".join(lines) + "\n")


def _scaling_plot(path: Path, rows: list[dict]) -> None:
  """Two log-log panels (against batch, against context): step time and temporaries."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, axis, fixed in ((axes[0], "batch", ("context", CONTEXT)),
                          (axes[1], "context", ("batch", BATCH))):
    memory_ax = ax.twinx()
    for colour, opt, label in (("C0", "adam", "AdamW"), ("C1", "riemod", "riemod")):
      sel = _series(rows, opt, axis)
      xs = [r[axis] for r in sel]
      ax.plot(xs, [1e3 * r["median_step_seconds"] for r in sel], "o-", color=colour,
              label=f"{label} step ms")
      memory_ax.plot(xs, [r["temp_bytes"] / 2**20 for r in sel], "s--", color=colour,
                     label=f"{label} temporaries MB")
    for a in (ax, memory_ax):
      a.set_xscale("log", base=2)
      a.set_yscale("log")
    ax.set_xlabel(f"{axis} ({fixed[0]} {fixed[1]})")
    ax.set_ylabel("step time (ms)")
    memory_ax.set_ylabel("XLA temporaries (MB)")
    lines = ax.get_legend_handles_labels()
    more = memory_ax.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
  fig.suptitle("char-lm step against batch size and context (log-log)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--untuned", action="store_true",
                      help="the first setting of each grid on the reported seeds (no tuning runs)")
  parser.add_argument("--scaling", action="store_true", help="only the batch/context sweep")
  parser.add_argument("--batches", default=",".join(map(str, SCALING_BATCHES)),
                      help="--scaling: batch sizes at the task's context (default: %(default)s)")
  parser.add_argument("--contexts", default=",".join(map(str, SCALING_CONTEXTS)),
                      help="--scaling: contexts at the task's batch size (default: %(default)s)")
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS)
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  if args.scaling:
    scaling(args.out, [int(b) for b in args.batches.split(",") if b],
            [int(t) for t in args.contexts.split(",") if t])
    return
  options = protocol.QUICK if args.quick else dict(timing_rounds=3, timing_burst=5) if (
      args.untuned) else {}
  payload = protocol.run_task(spec(args.quick, args.untuned), args.out, reference_name="adam",
                              **options)
  lines = ["# char-lm: validation loss at equal steps", ""] + equal_steps(payload)
  (args.out / "char-lm_equal.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()

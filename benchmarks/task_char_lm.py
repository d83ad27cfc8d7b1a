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
import statistics
import time
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


def scaling(out: Path, repeats: int = 5) -> dict:
  """Step time and compiled memory against batch size (context 64) and context (batch 32)."""
  rows = []
  settings = [(b, CONTEXT) for b in (8, 16, 32, 64)] + [(BATCH, t) for t in (16, 32, 128)]
  for batch, context in settings:
    task = CharLMTask(num_steps=repeats + 1, batch=batch, context=context)
    for opt, hyper in (("adam", GRIDS["adam"][0]), ("riemod", GRIDS["riemod"][0])):
      tx, step = task.compiled(opt, hyper)
      _, params = nnx.split(task._model(0))
      state = tx.init(params)
      x, y = map(jnp.asarray, task.lm.windows(task.train, np.arange(batch) * 1000, context))
      compiled = step.lower(params, state, x, y, jax.random.key(0)).compile()
      memory = compiled.memory_analysis()
      times = []
      for i in range(repeats + 1):
        t = time.perf_counter()
        params, state, loss = step(params, state, x, y, jax.random.key(i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
      rows.append({"optimizer": opt, "batch": batch, "context": context,
                   "median_step_seconds": statistics.median(times[1:]),
                   "argument_bytes": memory.argument_size_in_bytes,
                   "temp_bytes": memory.temp_size_in_bytes,
                   "loadavg": list(__import__("os").getloadavg())})
      print(rows[-1], flush=True)
  payload = {"rows": rows, "machine": harness.machine_info()}
  (out / "char-lm_scaling.json").write_text(json.dumps(payload, indent=1))
  lines = ["# char-lm: step time and memory against batch size and context", "",
           f"Machine: {payload['machine']['cpu_model']}, {payload['machine']['cpu_count']} cores, "
           f"load {payload['machine']['loadavg']} (shared machine: times are noisy). Memory is "
           "XLA's buffer assignment of the compiled step (arguments + temporaries), not RSS.", "",
           "| optimizer | batch | context | step ms | arguments MB | temporaries MB |",
           "|---|---:|---:|---:|---:|---:|"]
  lines += [f"| {r['optimizer']} | {r['batch']} | {r['context']} | "
            f"{r['median_step_seconds'] * 1e3:.0f} | {r['argument_bytes'] / 2**20:.1f} | "
            f"{r['temp_bytes'] / 2**20:.1f} |" for r in rows]
  (out / "char-lm_scaling.md").write_text("\n".join(lines) + "\n")
  return payload


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--untuned", action="store_true",
                      help="the first setting of each grid on the reported seeds (no tuning runs)")
  parser.add_argument("--scaling", action="store_true", help="only the batch/context sweep")
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS)
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  if args.scaling:
    scaling(args.out)
    return
  options = protocol.QUICK if args.quick else dict(timing_rounds=3, timing_burst=5) if (
      args.untuned) else {}
  payload = protocol.run_task(spec(args.quick, args.untuned), args.out, reference_name="adam",
                              **options)
  lines = ["# char-lm: validation loss at equal steps", ""] + equal_steps(payload)
  (args.out / "char-lm_equal.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()

"""What the step-refusal policy (``on_nonfinite``) costs a training step on the digits tasks.

The certified aliases (and every riemod transform) default to ``on_nonfinite="error"``: a step
with non-finite values, an estimated error above ``max_error`` or a diverging loss raises
``StepRefusedError``. Under ``jax.jit`` the raise is a host callback in the untaken branch of a
``lax.cond``; ``"skip"`` computes the same checks and keeps the previous state instead, with no
callback; ``"ignore"`` checks nothing. This times the certified inner step (the Kronecker
default geometry, SPRING momentum 0.8, a fixed learning rate, no controller) under each policy
against the task's tuned riemod step (which uses ``"ignore"``), seed 0, from step 30, in
interleaved bursts of 20 steps; and how long each call takes to return, the step's results not
yet awaited (JAX dispatches asynchronously, except that a program with a host callback is run
before the call returns, and on its slower Python dispatch path).

Run: ``python -m benchmarks.bench_refusal_check`` -> ``results/refusal_check.{json,md}``.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import jax
import numpy as np

import riemod
from benchmarks import harness
from benchmarks import task_tuning_free as tf

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("digits-mlp", "digits-autoencoder")
POLICIES = ("error", "skip", "ignore")
ROUNDS, BURST, WARM = 9, 20, 30


def measure(task: str) -> dict:
  """Median ms per step of every variant and its ratio to the tuned step (median and range over
  rounds)."""
  module, _, mlp_task = tf._digits_task(task, False)
  tuned = tf.tuned_config(task, module)
  keys = {k: tuned.get(k) for k in ("output_metric", "curvature_batch")}
  trainers = {"tuned": mlp_task.trainer("riemod", tuned, 0)}
  plain = riemod.layerwise_natural_gradient
  try:  # the certified trainer builds its fixed-lr twin with riemod.layerwise_natural_gradient
    for policy in POLICIES:
      riemod.layerwise_natural_gradient = functools.partial(plain, on_nonfinite=policy)
      trainers[f"certified inner, {policy}"] = tf.certified_trainer(
          mlp_task, policy, dict(keys, on_nonfinite=policy), 0, fixed_lr=0.03)
  finally:
    riemod.layerwise_natural_gradient = plain
  states = {}
  for name, trainer in trainers.items():
    state = trainer.init()
    for i in range(WARM):
      state, loss = trainer.step(state, i)
    jax.block_until_ready(loss)
    states[name] = state
  seconds = {name: [] for name in trainers}
  names = list(trainers)
  for r in range(ROUNDS):
    for name in names[r % len(names):] + names[:r % len(names)]:
      state, start = states[name], time.perf_counter()
      for i in range(WARM, WARM + BURST):
        state, loss = trainers[name].step(state, i)
      jax.block_until_ready(loss)
      seconds[name].append((time.perf_counter() - start) / BURST)
  # How long the call itself takes to return (the step not yet finished, unless the program
  # runs synchronously): a program with a host callback is executed before the call returns.
  dispatch = {name: [] for name in trainers}
  for name in names:
    state = states[name]
    for i in range(WARM, WARM + BURST):
      start = time.perf_counter()
      state, loss = trainers[name].step(state, i)
      dispatch[name].append(time.perf_counter() - start)
      jax.block_until_ready(loss)
  out = {}
  for name in names:
    ratios = [s / t for s, t in zip(seconds[name], seconds["tuned"])]
    out[name] = {"median_ms": 1e3 * float(np.median(seconds[name])),
                 "ratio": float(np.median(ratios)), "ratio_range": [min(ratios), max(ratios)],
                 "dispatch_ms": 1e3 * float(np.median(dispatch[name]))}
  return out


def report(payload: dict) -> str:
  text = ("# The step-refusal policy's cost\n\n" + __doc__.split("\n\n")[1].replace("\n", " ")
          + f"\n\nLoad (1 min) before and after: {payload['load']}. 2-core CPU, "
          "`OPENBLAS_NUM_THREADS=1`.\nReproduce: `python -m benchmarks.bench_refusal_check`.\n\n"
          "| task | step | ms per step | vs tuned (median, range over rounds) | ms until the call "
          "returns |\n|---|---|---|---|---|\n")
  for task, rows in payload["tasks"].items():
    for name, row in rows.items():
      text += (f"| {task} | {name} | {row['median_ms']:.2f} | {row['ratio']:.2f} "
               f"({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f}) | "
               f"{row['dispatch_ms']:.2f} |\n")
  return text


def main() -> None:
  load = [os.getloadavg()[0]]
  tasks = {task: measure(task) for task in TASKS}
  load.append(os.getloadavg()[0])
  payload = {"machine": harness.machine_info(), "load": load, "tasks": tasks,
             "config": {"rounds": ROUNDS, "burst": BURST, "warm": WARM}}
  harness.write_json(RESULTS / "refusal_check.json", payload)
  text = report(payload)
  (RESULTS / "refusal_check.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()

"""Today's replicated multi-device step: bytes communicated (from the compiled HLO) and step time.

The digits MLP 64-128-128-10 (tanh, a plain function with ``riemod.nn.dense``), cross-entropy with
the exact softmax Fisher on the first 32 of 128 samples (``curvature_batch``: ``d = 320`` rows per
module), ``riemod.layerwise_natural_gradient(0.1, mass=0.1, momentum=0.8)``, on 2, 4 and 8 forced
host devices (``--xla_force_host_platform_device_count``; one process per device count), two
recipes:

* ``jit``: ``jax.jit`` of the unchanged step, the batch placed with ``NamedSharding(P("batch"))``;
* ``shard_map``: the step inside ``jax.shard_map`` with ``axis_name="batch"`` (``curvature_batch``
  of ``32 / n`` per device, the same 32 rows in all).

Bytes are read from the compiled program's text: the result size of every collective (for an
``all-gather`` the gathered array, of which each device receives ``(n-1)/n``; for an ``all-reduce``
the array reduced). Step times are medians of interleaved bursts
(``benchmarks.harness.time_interleaved``) against the same step compiled for one device in the same
process; forced host devices share the machine's cores, so the times show the overhead of the
scheme on one CPU, not a speed-up.

Run: ``python -m benchmarks.bench_multidevice`` -> ``results/multidevice.{json,md}``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE_COUNTS = (2, 4, 8)
SIZES = (64, 128, 128, 10)
BATCH, CURVATURE_BATCH = 128, 32
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "s8": 1, "u8": 1,
          "pred": 1, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(f64|f32|bf16|f16|s64|u64|s32|u32|s8|u8|pred)\[([0-9,]*)\]")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _bytes(text: str) -> int:
  return sum(_BYTES[t] * math.prod(int(n) for n in dims.split(",") if n)
             for t, dims in _SHAPE.findall(text))


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """``{op: {"count", "bytes"}}`` from compiled HLO text: result sizes (compiled HLO names the
  operands without their shapes); ``-start`` ops of async pairs counted once.
  """
  out = {op: {"count": 0, "bytes": 0} for op in _COLLECTIVES}
  for line in hlo.splitlines():
    if "=" not in line:
      continue
    lhs, rhs = line.split("=", 1)
    for op in _COLLECTIVES:
      match = re.search(rf"\s{op}(-start)?\(", rhs)
      if match is None:
        continue
      size = _bytes(rhs[:match.start()])
      if match.group(1):  # async start: the result is a tuple (operands, results)
        size //= 2
      out[op]["count"] += 1
      out[op]["bytes"] += size
      break
  return out


def _child(devices: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import riemod
  from benchmarks.harness import time_interleaved

  assert jax.device_count() == devices, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  keys = jax.random.split(jax.random.key(0), 6)
  params = {f"l{i}": {"kernel": jax.random.normal(keys[i], (a, b)) / math.sqrt(a),
                      "bias": jnp.zeros(b)}
            for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))}
  x = jax.random.normal(keys[4], (BATCH, SIZES[0]))
  y = jax.random.randint(keys[5], (BATCH,), 0, SIZES[-1])
  tx = riemod.layerwise_natural_gradient(0.1, mass=0.1, momentum=0.8, on_nonfinite="ignore")
  state = tx.init(params)

  def model(p, x):
    for i in range(3):
      x = riemod.nn.dense(p[f"l{i}"], x)
      x = jnp.tanh(x) if i < 2 else x
    return x

  def step(p, s, x, y, axis_name=None, curvature_batch=CURVATURE_BATCH):
    loss, grads, curv = riemod.value_grad_and_curvature(
        model, x, lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean(),
        riemod.metrics.softmax_fisher(), params=p, curvature_batch=curvature_batch,
        axis_name=axis_name)
    updates, s = tx.update(grads, s, p, curvature=curv)
    return optax.apply_updates(p, updates), s, loss

  one = jax.jit(step)
  placed = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
  per_device = CURVATURE_BATCH // devices
  mapped = jax.jit(jax.shard_map(
      lambda p, s, x, y: step(p, s, x, y, "batch", per_device), mesh=mesh,
      in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P(), P(), P())))
  programs = {"one_device": (one, (params, state, x, y)), "jit": (one, (params, state, *placed)),
              "shard_map": (mapped, (params, state, x, y))}
  row = {"devices": devices, "recipes": {}}
  results = {}
  for name, (fn, args) in programs.items():
    hlo = fn.lower(*args).compile().as_text()
    row["recipes"][name] = {"collectives": collectives(hlo)}
    results[name] = jax.tree.map(np.asarray, fn(*args)[0])
  for name in ("jit", "shard_map"):
    row["recipes"][name]["max_relative_difference_to_one_device"] = max(
        float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        for a, b in zip(jax.tree.leaves(results[name]), jax.tree.leaves(results["one_device"])))
  timed = time_interleaved(programs, rounds=5, burst=5, reference="one_device")
  for name, entry in timed.items():
    row["recipes"][name].update(entry)
  num_params = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))
  row["gradient_bytes"] = 4 * num_params
  row["load_before_after"] = [os.getloadavg()[0]]
  return row


def _table(rows: list[dict]) -> str:
  lines = [
      "| devices | recipe | all-gathers | KiB all-gathered (results) | all-reduces | KiB all-reduced "
      "| step time (ms) | vs one device | max rel. diff to one device |",
      "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    for name in ("jit", "shard_map"):
      r = row["recipes"][name]
      c = r["collectives"]
      lines.append(
          f"| {row['devices']} | {name} | {c['all-gather']['count']} | "
          f"{c['all-gather']['bytes'] / 1024:.1f} | {c['all-reduce']['count']} | "
          f"{c['all-reduce']['bytes'] / 1024:.1f} | {1e3 * r['median_seconds']:.1f} | "
          f"{r['ratio']:.2f} ({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f}) | "
          + (f"{r['max_relative_difference_to_one_device']:.1e} |" if name == "jit" else
             "other rows (1) |"))
  return "\n".join(lines)


def main() -> None:
  from benchmarks.harness import machine_info, write_json

  rows = []
  for devices in DEVICE_COUNTS:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_multidevice", "--child",
                           str(devices)], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
      raise RuntimeError(f"{devices} devices failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["load_before_after"] = [load] + row["load_before_after"] + [os.getloadavg()[0]]
    rows.append(row)
    print(f"{devices} devices done", file=sys.stderr)
  write_json(RESULTS / "multidevice.json", {"machine": machine_info(), "rows": rows,
                                            "config": {"sizes": SIZES, "batch": BATCH,
                                                       "curvature_batch": CURVATURE_BATCH}})
  text = report(rows)
  (RESULTS / "multidevice.md").write_text(text)
  print(text)


def report(rows: list[dict]) -> str:
  """The results page from the rows of ``multidevice.json``."""
  gradient = rows[0]["gradient_bytes"]
  loads = [f"{l:.1f}" for row in rows for l in row["load_before_after"]]
  text = (
      "# Multi-device step today (replicated solves)\n\n"
      "Digits MLP 64-128-128-10 (tanh, plain function with `riemod.nn.dense`), batch 128, exact "
      "softmax Fisher on 32 samples (`d = 320` rows per module), layerwise natural gradient "
      "with momentum, float32, on forced host devices of a 2-core CPU. Bytes are read from the "
      "compiled HLO; the gradient itself is "
      f"{gradient / 1024:.1f} KiB. Step times: medians of 5 interleaved rounds of 5 steps; "
      "'vs one device': the same step compiled for one device in the same process (median ratio "
      f"and its range over rounds). Load averages (1 min) around the runs: {', '.join(loads)}.\n"
      "Reproduce: `python -m benchmarks.bench_multidevice`.\n\n" + _table(rows) + "\n\n"
      "(1) shard_map takes the curvature rows from the first `32 / n` samples of every shard, the "
      "one-device step from the first 32 of the batch: different rows, so the steps differ; "
      "equality on the same rows is tested in tests/test_multidevice.py. Each device receives "
      "`(n-1)/n` of the all-gathered bytes.\n")
  return text


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--child":
    print(json.dumps(_child(int(sys.argv[2]))))
  else:
    main()

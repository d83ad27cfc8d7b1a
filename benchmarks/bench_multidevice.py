"""Multi-device steps: layerwise blocks spread over the devices against the replicated scheme.

Two models, plain functions with ``riemod.nn.dense`` layers, ``riemod.layerwise_natural_gradient``
with SPRING momentum, float32, on 2, 4 and 8 forced host devices
(``--xla_force_host_platform_device_count``; one process per device count):

* ``mlp``: the digits MLP 64-128-128-10 (tanh), cross-entropy, exact softmax Fisher on the first 32
  of 128 samples (``curvature_batch``: ``d = 320`` rows per module, 3 blocks);
* ``autoencoder``: the digits autoencoder 64-128-32-8-32-128-64 (tanh, linear bottleneck and
  output), ``0.5 |x - xhat|^2``, identity metric on 8 of 128 samples (``d = 512``, 6 blocks, the
  two small ones in parameter space).

Recipes:

* ``jit``: ``jax.jit`` of the unchanged step, the batch placed with ``NamedSharding(P("batch"))``;
* ``replicated``: the step inside ``jax.shard_map`` with ``axis_name="batch"``, every device
  factoring every block (the curvature's ``axis_name`` removed before the update, which is the
  scheme before the spread);
* ``spread``: the same with the curvature as returned: each block factored and solved on one
  device, the directions shared by one all-reduce.

Per-device factorisation FLOPs are analytic (``riemod.curvature._mesh.factorisation_flops`` of the
blocks each device owns under ``_mesh.assign``: ``d^3/3 + n d^2`` in sample space, ``n^3/3 + d n^2``
in parameter space); the replicated scheme's is the sum over all blocks. Bytes are read from the
compiled program's text: the result size of every collective (for an ``all-gather`` the gathered
array, of which each device receives ``(n-1)/n``; for an ``all-reduce`` the array reduced). Step
times are medians of interleaved bursts (``benchmarks.harness.time_interleaved``) against the same
step compiled for one device in the same process; forced host devices share the machine's cores,
so the times show the overhead of a scheme on one CPU, not a speed-up.

Run: ``python -m benchmarks.bench_multidevice`` -> ``results/multidevice.{json,md}``.

The one-block structure (``--one-block``, :func:`one_block`): ``riemod.natural_gradient`` with
``structure="full"`` on the same models, the ``d x d`` kernel assembled by every device
(``replicated``) or in slabs of ``d / devices`` rows, one per device, joined by an all-gather
(``sharded``); the Cholesky factorisation is replicated in both.

The transformer (``--transformer``, :func:`transformer`): the model of ``examples/transformer_lm.py``,
small (:data:`TRANSFORMER`), with the example's per-token sampled Fisher and adaptive mass, both
structures, replicated against spread (layerwise) and sharded (one block).

The Kronecker mass (``--kronecker``, :func:`kronecker`): MODELS with ``riemod.masses.kronecker()``,
replicated against spread (statistics per device and one all-reduce, refreshes on their owners),
with analytic statistics/refresh FLOPs per device (:func:`kronecker_flops`) and all-reduced
bytes (:func:`kronecker_bytes`).

Rows to their owners (``--owners``, :func:`owners`): the spread layerwise step's collectives
(compiled HLO) with every row gathered to every device (the curvature's shards dropped) against
each block's rows sent to its owner alone (riemod's default), beside the analytic owner-only
bytes (:func:`owner_exchange`), for MODELS and the transformer; compile and one step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE_COUNTS = (2, 4, 8)
BATCH = 128
# name: (layer sizes, linear layers (no tanh after them), loss, output metric, curvature samples)
MODELS = {
    "mlp": ((64, 128, 128, 10), (2,), "cross_entropy", "softmax_fisher", 32),
    "autoencoder": ((64, 128, 32, 8, 32, 128, 64), (2, 5), "squares", "identity", 8),
}
RECIPES = ("jit", "replicated", "spread")
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


def _model(name: str):
  """``(params, x, y, step, (model, loss, metric))`` of one of MODELS,
  ``step(p, s, x, y, tx, axis_name, m, spread)``, ``loss(outputs, y)``."""
  import jax
  import jax.numpy as jnp
  import optax

  import riemod

  sizes, linear, loss_name, metric_name, _ = MODELS[name]
  keys = jax.random.split(jax.random.key(0), len(sizes) + 1)
  params = {f"l{i}": {"kernel": jax.random.normal(keys[i], (a, b)) / math.sqrt(a),
                      "bias": jnp.zeros(b)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
  x = jax.random.normal(keys[-1], (BATCH, sizes[0]))
  if loss_name == "cross_entropy":
    y = jax.random.randint(keys[-2], (BATCH,), 0, sizes[-1])
    loss = lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
  else:
    y = x
    loss = lambda z, y: 0.5 * jnp.mean(jnp.sum((z - y) ** 2, -1))
  metric = getattr(riemod.metrics, metric_name)()

  def model(p, x):
    for i in range(len(sizes) - 1):
      x = riemod.nn.dense(p[f"l{i}"], x)
      x = x if i in linear or i == len(sizes) - 2 else jnp.tanh(x)
    return x

  def step(p, s, x, y, tx, axis_name, curvature_batch, spread=True, shards=True):
    value, grads, curv = riemod.value_grad_and_curvature(
        model, x, lambda z: loss(z, y), metric, params=p, curvature_batch=curvature_batch,
        axis_name=axis_name)
    if not shards:  # the spread before rows went to owners only: every device gathers all rows
      curv = curv.replicated()
    if not spread:  # the scheme before the spread: every device factors every block
      curv = dataclasses.replace(curv.replicated(), axis_name=())
    updates, s = tx.update(grads, s, p, curvature=curv)
    return optax.apply_updates(p, updates), s, value

  return params, x, y, step, (model, loss, metric)


def blocks(name: str) -> list[dict]:
  """Every layerwise block of MODELS[name]: parameters ``n``, rows ``d``, space, FLOPs."""
  from riemod.curvature import _mesh

  sizes, _, _, metric_name, samples = MODELS[name]
  rows = samples * (sizes[-1] if metric_name in ("softmax_fisher", "identity") else 1)
  out = []
  for a, b in zip(sizes[:-1], sizes[1:]):
    n = a * b + b
    space = "parameter" if n < rows else "sample"  # Geometry(space="auto")
    out.append({"n": n, "d": rows, "space": space,
                "flops": _mesh.factorisation_flops(n, rows, space)})
  return out


def _steps(name: str, devices: int, tx):
  """``(params, state, x, y, one, mapped)`` for MODELS[name] on ``devices`` devices: ``one``
  the jitted one-device step, ``mapped(spread)`` the jitted ``shard_map`` step (``spread=False``
  drops the curvature's axes, so every device factors and assembles everything)."""
  import jax
  import numpy as np
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == devices, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  params, x, y, step, _ = _model(name)
  samples = MODELS[name][4]
  one = jax.jit(lambda p, s, x, y: step(p, s, x, y, tx, None, samples))

  def mapped(spread, shards=True):
    return jax.jit(jax.shard_map(
        lambda p, s, x, y: step(p, s, x, y, tx, "batch", samples // devices, spread, shards),
        mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P(), P(), P())))

  return params, tx.init(params), x, y, one, mapped


def _compiled(programs: dict) -> tuple[dict, Any]:
  """``({recipe: {"collectives"}}, diff)``: every program's collectives from its compiled HLO,
  and ``diff(a, b)``, the largest relative difference of the parameters after one step."""
  import jax
  import numpy as np

  recipes, results = {}, {}
  for recipe, (fn, args) in programs.items():
    recipes[recipe] = {"collectives": collectives(fn.lower(*args).compile().as_text())}
    results[recipe] = jax.tree.map(np.asarray, fn(*args)[0])
  diff = lambda a, b: max(float(np.max(np.abs(u - v)) / np.max(np.abs(v)))
                          for u, v in zip(jax.tree.leaves(results[a]), jax.tree.leaves(results[b])))
  return recipes, diff


def _child(devices: int) -> dict:
  import jax
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import riemod
  from benchmarks.harness import time_interleaved
  from riemod.curvature import _mesh

  out = {}
  for name in MODELS:
    tx = riemod.layerwise_natural_gradient(0.1, mass=0.1, momentum=0.8, on_nonfinite="ignore")
    params, state, x, y, one, mapped = _steps(name, devices, tx)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    placed = jax.device_put((x, y), NamedSharding(mesh, P("batch")))
    programs = {"one_device": (one, (params, state, x, y)),
                "jit": (one, (params, state, *placed)),
                "replicated": (mapped(False), (params, state, x, y)),
                "spread": (mapped(True), (params, state, x, y))}
    recipes, diff = _compiled(programs)
    row = {"recipes": recipes}
    row["recipes"]["jit"]["max_relative_difference"] = {"to": "one_device",
                                                        "value": diff("jit", "one_device")}
    row["recipes"]["spread"]["max_relative_difference"] = {"to": "replicated",
                                                           "value": diff("spread", "replicated")}
    timed = time_interleaved(programs, rounds=5, burst=5, reference="one_device")
    for recipe, entry in timed.items():
      row["recipes"][recipe].update(entry)
    found = blocks(name)
    owner = _mesh.assign([b["flops"] for b in found], devices)
    per_device = [sum(b["flops"] for b, o in zip(found, owner) if o == j) for j in range(devices)]
    row["blocks"] = found
    row["owner"] = list(owner)
    row["flops_per_device"] = {"replicated": sum(b["flops"] for b in found),
                               "spread_max": max(per_device), "spread": per_device}
    row["parameter_bytes"] = 4 * sum(b["n"] for b in found)
    out[name] = row
  return {"devices": devices, "models": out, "load_before_after": [os.getloadavg()[0]]}


def assembly_flops(name: str) -> dict:
  """The one-block kernel's analytic cost for MODELS[name], in multiply-adds: every dense layer's
  Gram-Hadamard product (cotangent Gram ``d^2 fan_out``, feature Gram ``B^2 fan_in``, their
  product ``d^2``) and the Cholesky factorisation of the ``d x d`` capacitance (``d^3 / 3``).
  A device assembling a slab does ``1 / devices`` of the assembly."""
  sizes, _, _, metric_name, samples = MODELS[name]
  rows = samples * (sizes[-1] if metric_name in ("softmax_fisher", "identity") else 1)
  assembly = sum(rows ** 2 * b + samples ** 2 * a + rows ** 2
                 for a, b in zip(sizes[:-1], sizes[1:]))
  return {"d": rows, "samples": samples, "assembly": float(assembly),
          "cholesky": rows ** 3 / 3}


def _child_one_block(devices: int) -> dict:
  import numpy as np

  import riemod
  from benchmarks.harness import time_interleaved

  out = {}
  for name in MODELS:
    samples = MODELS[name][4]
    tx = riemod.natural_gradient(0.1, geometry=riemod.Geometry(mass=0.1, structure="full"),
                                 momentum=0.8, on_nonfinite="ignore")
    # mapped(False) drops the curvature's axes: every device assembles the whole kernel.
    params, state, x, y, one, mapped = _steps(name, devices, tx)
    # One device measures the curvature on its first `samples` samples; the mapped steps on the
    # first samples // devices of every shard: those go first in the one-device batch, so all
    # three steps use the same samples.
    shard, m = BATCH // devices, samples // devices
    lead = np.concatenate([np.arange(j * shard, j * shard + m) for j in range(devices)])
    order = np.concatenate([lead, np.setdiff1d(np.arange(BATCH), lead)])
    programs = {"one_device": (one, (params, state, x[order], y[order])),
                "replicated": (mapped(False), (params, state, x, y)),
                "sharded": (mapped(True), (params, state, x, y))}
    recipes, diff = _compiled(programs)
    row = {"recipes": recipes}
    row["max_relative_difference"] = {"sharded_vs_replicated": diff("sharded", "replicated"),
                                      "sharded_vs_one_device": diff("sharded", "one_device")}
    # Ratios against the replicated step of the same round: what the slabs change.
    timed = time_interleaved(programs, rounds=5, burst=5, reference="replicated")
    for recipe, entry in timed.items():
      row["recipes"][recipe].update(entry)
    flops = assembly_flops(name)
    row["flops_per_device"] = {"replicated": flops["assembly"],
                               "sharded": flops["assembly"] / devices,
                               "cholesky": flops["cholesky"], "d": flops["d"]}
    out[name] = row
  return {"devices": devices, "models": out, "load_before_after": [os.getloadavg()[0]]}


def one_block() -> None:
  """The one-block rows: replicated against sharded kernel assembly on 2, 4, 8 devices.

  Run: ``python -m benchmarks.bench_multidevice --one-block`` ->
  ``results/multidevice_one_block.{json,md}``.
  """
  _measure("--child-one-block", "multidevice_one_block", one_block_report)


def one_block_report(rows: list[dict]) -> str:
  """The results page from the rows of ``multidevice_one_block.json``."""
  loads = [f"{l:.1f}" for row in rows for l in row["load_before_after"]]
  text = (
      "# Multi-device step, one-block structure: kernel assembled in slabs vs replicated\n\n"
      "`riemod.natural_gradient` with `structure=\"full\"`, SPRING momentum 0.8, mass 0.1, "
      "float32, batch 128, plain functions with `riemod.nn.dense`, on forced host devices of a "
      "2-core CPU. 'replicated': every device assembles the whole `d x d` kernel; 'sharded': "
      "every device assembles the rows of its `1/devices` of the curvature's samples and one "
      "all-gather joins them. Both factor the kernel on every device. 'assembly MMAC per "
      "device': analytic multiply-adds of the Gram-Hadamard products (`d^2 fan_out + B^2 "
      "fan_in + d^2` per layer; the Cholesky's `d^3/3` is given beside). Collectives and bytes "
      "from the compiled HLO (result sizes; each device receives `(n-1)/n` of an all-gather). "
      "Step times: medians of 5 interleaved rounds of 5 steps; 'vs replicated': the median "
      "over rounds of the step's time over the replicated step's in the same round, with its "
      "range. The devices share two cores, so a replicated step does the assembly once per "
      "device on the same two cores and a sharded one once in all: the times measure total "
      "work and overhead, not a speed-up. Load averages (1 min) around the runs: "
      f"{', '.join(loads)}.\n"
      "Reproduce: `python -m benchmarks.bench_multidevice --one-block`.\n")
  for name, (sizes, _, loss, metric, samples) in MODELS.items():
    first = rows[0]["models"][name]["flops_per_device"]
    diffs = [row["models"][name]["max_relative_difference"] for row in rows]
    text += (
        f"\n## {name}: {'-'.join(map(str, sizes))}, {loss}, {metric} on {samples} samples, "
        f"d = {first['d']}\n\n"
        f"Cholesky per device (replicated in both): {first['cholesky'] / 1e6:.1f} MMAC. "
        "Parameters after one step, max relative difference: sharded vs replicated "
        f"{max(d['sharded_vs_replicated'] for d in diffs):.1e}, sharded vs one device "
        f"{max(d['sharded_vs_one_device'] for d in diffs):.1e}.\n\n"
        "| devices | assembly | assembly MMAC per device | all-gathers | KiB all-gathered "
        "| all-reduces | KiB all-reduced | step time (ms) | vs replicated |\n"
        "|---|---|---|---|---|---|---|---|---|\n")
    for row in rows:
      model = row["models"][name]
      one = model["recipes"]["one_device"]
      text += f"| {row['devices']} | one device | {first['replicated'] / 1e6:.1f} | 0 | 0 | 0 | 0 | " \
              f"{1e3 * one['median_seconds']:.1f} | {one['ratio']:.2f} " \
              f"({one['ratio_spread'][0]:.2f}-{one['ratio_spread'][1]:.2f}) |\n"
      for recipe in ("replicated", "sharded"):
        r = model["recipes"][recipe]
        c = r["collectives"]
        text += (
            f"| {row['devices']} | {recipe} | {model['flops_per_device'][recipe] / 1e6:.1f} | "
            f"{c['all-gather']['count']} | {c['all-gather']['bytes'] / 1024:.1f} | "
            f"{c['all-reduce']['count']} | {c['all-reduce']['bytes'] / 1024:.1f} | "
            f"{1e3 * r['median_seconds']:.1f} | {r['ratio']:.2f} "
            f"({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f}) |\n")
  return text


# The transformer of examples/transformer_lm.py, small: (vocabulary, width, heads, depth, context),
# sequences per batch.
TRANSFORMER = ((64, 64, 4, 2, 32), 16)


def _transformer_setup():
  """``(lm, graphdef, params, x, y, metric, key)``: :data:`TRANSFORMER`'s model from
  examples/transformer_lm.py, a batch of random ids, the example's per-token sampled Fisher."""
  import importlib.util

  import jax
  import numpy as np
  from flax import nnx

  import riemod

  spec = importlib.util.spec_from_file_location(
      "transformer_lm", Path(__file__).resolve().parents[1] / "examples" / "transformer_lm.py")
  lm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(lm)
  (vocab, width, heads, depth, context), batch = TRANSFORMER
  graphdef, params = nnx.split(lm.CharLM(vocab, width=width, heads=heads, depth=depth,
                                         context=context))
  rng = np.random.default_rng(0)
  x, y = (np.asarray(rng.integers(0, vocab, (batch, context))) for _ in range(2))
  return lm, graphdef, params, x, y, riemod.metrics.sampled_softmax_fisher(1), jax.random.key(0)


def _child_transformer(devices: int) -> dict:
  """Both structures on examples/transformer_lm.py's model: replicated against spread (layerwise)
  and against the kernel in slabs (one block)."""
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  import riemod
  from benchmarks.harness import time_interleaved
  from riemod.curvature import _mesh

  lm, graphdef, params, x, y, metric, key = _transformer_setup()
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  out = {}
  for structure, scheme in (("layerwise", "spread"), ("full", "sharded")):
    # The example's geometry (adaptive mass, SPRING momentum), without its schedule and clip.
    make = riemod.layerwise_natural_gradient if structure == "layerwise" else riemod.natural_gradient
    tx = make(0.01, geometry=riemod.Geometry(mass=30.0, structure=structure,
                                             mass_policy=riemod.masses.adaptive(0.99)),
              momentum=0.9, on_nonfinite="ignore")
    state = tx.init(params)

    def step(p, s, x, y, axis_name, keep_axes=True):
      loss, grads, curv = riemod.value_grad_and_curvature(
          nnx.merge(graphdef, p), x, lambda logits: lm.cross_entropy(logits, y), metric, key=key,
          axis_name=axis_name)
      if not keep_axes:  # every device factors (and assembles) everything
        curv = dataclasses.replace(curv.replicated(), axis_name=())
      updates, s = tx.update(grads, s, p, curvature=curv)
      return optax.apply_updates(p, updates), s, loss

    def mapped(keep_axes):
      return jax.jit(jax.shard_map(lambda p, s, x, y: step(p, s, x, y, "batch", keep_axes),
                                   mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
                                   out_specs=(P(), P(), P())))

    programs = {"one_device": (jax.jit(lambda p, s, x, y: step(p, s, x, y, None)),
                               (params, state, x, y)),
                "replicated": (mapped(False), (params, state, x, y)),
                scheme: (mapped(True), (params, state, x, y))}
    recipes, diff = _compiled(programs)
    # The sampled Fisher draws with the key folded with the device's index: one device's rows
    # are other draws, so only the two mapped schemes are compared.
    row = {"recipes": recipes, "max_relative_difference": diff(scheme, "replicated")}
    timed = time_interleaved(programs, rounds=5, burst=3, reference="replicated")
    for recipe, entry in timed.items():
      row["recipes"][recipe].update(entry)
    curv = jax.eval_shape(lambda p: riemod.value_grad_and_curvature(
        nnx.merge(graphdef, p), x, lambda logits: lm.cross_entropy(logits, y), metric,
        key=key)[2], params)
    factors = [m.factor for m in curv.modules if m.factor is not None]
    d = curv.num_rows
    if structure == "layerwise":
      costs = [_mesh.factorisation_flops(f.num_params, d, "parameter" if f.num_params < d
                                         else "sample") for f in factors]
      row["blocks"] = len(costs)
      row["flops_per_device"] = {"replicated": sum(costs), scheme: largest_load(costs, devices)}
    else:
      # Rows of the d x d kernel each device assembles; the factorisation is replicated.
      row["kernel_rows_per_device"] = {"replicated": d, scheme: d // devices}
    row["d"] = d
    out[structure] = row
  return {"devices": devices, "models": out, "load_before_after": [os.getloadavg()[0]]}


def transformer() -> None:
  """The transformer rows. Run: ``python -m benchmarks.bench_multidevice --transformer`` ->
  ``results/multidevice_transformer.{json,md}``."""
  _measure("--child-transformer", "multidevice_transformer", transformer_report)


def transformer_report(rows: list[dict]) -> str:
  """The results page from the rows of ``multidevice_transformer.json``."""
  (vocab, width, heads, depth, context), batch = TRANSFORMER
  loads = [f"{l:.1f}" for row in rows for l in row["load_before_after"]]
  first = rows[0]["models"]
  text = (
      "# Multi-device step: the transformer of examples/transformer_lm.py\n\n"
      f"`CharLM` with vocabulary {vocab}, width {width}, {heads} heads, {depth} blocks, context "
      f"{context}; batch {batch} sequences of random ids; per-token sampled softmax Fisher with "
      f"one probe per sequence (`d = {first['layerwise']['d']}` rows), adaptive mass 30, SPRING "
      "momentum 0.9, float32, on forced host devices of a 2-core CPU. Layerwise: "
      f"{first['layerwise']['blocks']} blocks, factored by every device ('replicated') or each "
      "on one ('spread'; 'factorisation MFLOP per device' analytic as in multidevice.md, the "
      "most loaded device). One block (`structure=\"full\"`): the kernel assembled whole by "
      "every device ('replicated') or in slabs of `d / devices` rows ('sharded'), factored by "
      "every device. Collectives from the compiled HLO. Step times: medians of 5 interleaved "
      "rounds of 3 steps, 'vs replicated' the median ratio to the replicated step of the same "
      "structure in the same round (range over rounds). The sampled rows are drawn per device "
      "(the key folded with the device's index), so the mapped steps are compared with each "
      "other, not with one device. The devices share two cores: the times measure total work "
      f"and overhead, not a speed-up. Load averages (1 min) around the runs: {', '.join(loads)}."
      "\nReproduce: `python -m benchmarks.bench_multidevice --transformer`.\n\n"
      "| structure | devices | scheme | work per device | all-gathers | KiB all-gathered | "
      "KiB all-to-all | all-reduces | KiB all-reduced | step time (ms) | vs replicated | "
      "parameters vs replicated |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
  for structure, scheme in (("layerwise", "spread"), ("full", "sharded")):
    for row in rows:
      model = row["models"][structure]
      for recipe in ("one_device", "replicated", scheme):
        if recipe == "one_device" and row is not rows[0]:
          continue
        r = model["recipes"][recipe]
        c = r["collectives"]
        if structure == "layerwise":
          work = model["flops_per_device"]["replicated" if recipe == "one_device" else recipe]
          work = f"{work / 1e6:.2f} MFLOP"
        else:
          work = model["kernel_rows_per_device"]["replicated" if recipe == "one_device"
                                                 else recipe]
          work = f"{work} of {model['d']} kernel rows"
        same = (f"{model['max_relative_difference']:.1e}" if recipe == scheme else "")
        devices = 1 if recipe == "one_device" else row["devices"]
        text += (
            f"| {structure} | {devices} | {recipe.replace('_', ' ')} | {work} | "
            f"{c['all-gather']['count']} | {c['all-gather']['bytes'] / 1024:.1f} | "
            f"{c['all-to-all']['bytes'] / 1024:.1f} | "
            f"{c['all-reduce']['count']} | {c['all-reduce']['bytes'] / 1024:.1f} | "
            f"{1e3 * r['median_seconds']:.1f} | {r['ratio']:.2f} "
            f"({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f}) | {same} |\n")
  return text


def _table(rows: list[dict], name: str) -> str:
  lines = [
      "| devices | recipe | factorisation GFLOP per device (max) | all-gathers | KiB all-gathered "
      "| KiB all-to-all | all-reduces | KiB all-reduced | step time (ms) | vs one device |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    model = row["models"][name]
    flops = model["flops_per_device"]
    for recipe in RECIPES:
      r = model["recipes"][recipe]
      c = r["collectives"]
      work = flops["spread_max"] if recipe == "spread" else flops["replicated"]
      lines.append(
          f"| {row['devices']} | {recipe} | {work / 1e9:.3f} | {c['all-gather']['count']} | "
          f"{c['all-gather']['bytes'] / 1024:.1f} | {c['all-to-all']['bytes'] / 1024:.1f} | "
          f"{c['all-reduce']['count']} | "
          f"{c['all-reduce']['bytes'] / 1024:.1f} | {1e3 * r['median_seconds']:.1f} | "
          f"{r['ratio']:.2f} ({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f}) |")
  return "\n".join(lines)


def _measure(flag: str, stem: str, page) -> None:
  """Runs ``flag``'s child once per device count (the host device count is fixed when JAX
  starts) and writes ``results/{stem}.json`` and the page ``page(rows)`` as ``{stem}.md``."""
  from benchmarks.harness import machine_info, write_json

  rows = []
  for devices in DEVICE_COUNTS:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_multidevice", flag,
                           str(devices)], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
      raise RuntimeError(f"{devices} devices failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["load_before_after"] = [load] + row["load_before_after"] + [os.getloadavg()[0]]
    rows.append(row)
    print(f"{devices} devices done", file=sys.stderr)
  write_json(RESULTS / f"{stem}.json", {"machine": machine_info(), "rows": rows,
                                        "config": {"models": MODELS, "batch": BATCH}})
  text = page(rows)
  (RESULTS / f"{stem}.md").write_text(text)
  print(text)


def main() -> None:
  _measure("--child", "multidevice", report)


def report(rows: list[dict]) -> str:
  """The results page from the rows of ``multidevice.json``."""
  loads = [f"{l:.1f}" for row in rows for l in row["load_before_after"]]
  text = (
      "# Multi-device step: layerwise blocks spread over devices vs replicated\n\n"
      "Plain functions with `riemod.nn.dense`, batch 128, layerwise natural gradient with SPRING "
      "momentum, float32, on forced host devices of a 2-core CPU. 'factorisation GFLOP per "
      "device': analytic, `d^3/3 + n d^2` (sample space) or `n^3/3 + d n^2` (parameter space) "
      "summed over the blocks a device factors (replicated: all; spread: the most loaded "
      "device under the greedy assignment). Collectives and bytes are read from the compiled "
      "HLO (result sizes); each device receives `(n-1)/n` of the all-gathered and all-to-all "
      "bytes (the spread sends each block's rows to its owner only). Step times: medians of 5 "
      "interleaved rounds of 5 steps; 'vs one device': the same step compiled for one device in "
      "the same process (median ratio and its range over rounds). The devices share two cores, "
      "so the times measure overhead, not speed-up. Load averages (1 min) around the runs: "
      f"{', '.join(loads)}.\n"
      "Reproduce: `python -m benchmarks.bench_multidevice`.\n")
  for name, (sizes, _, loss, metric, samples) in MODELS.items():
    model = rows[0]["models"][name]
    found = model["blocks"]
    shapes = ", ".join(f"{b['n']}x{b['d']} ({b['space'][0]})" for b in found)
    diffs = [row["models"][name]["recipes"][r]["max_relative_difference"]["value"]
             for row in rows for r in ("jit", "spread")]
    text += (
        f"\n## {name}: {'-'.join(map(str, sizes))}, {loss}, {metric} on {samples} samples\n\n"
        f"Blocks (parameters x rows, s: sample space, p: parameter space): {shapes}; "
        f"parameters {model['parameter_bytes'] / 1024:.1f} KiB. Owners per device count: "
        + "; ".join(f"{row['devices']}: {row['models'][name]['owner']}" for row in rows)
        + f". Spread vs replicated parameters after one step: max relative difference "
        f"{max(diffs[1::2]):.1e}; jit vs one device {max(diffs[0::2]):.1e}.\n\n"
        + _table(rows, name) + "\n")
  return text


def assembly() -> None:
  """The one-block structure's replicated work on one device: the kernel's assembly (the modules'
  ``K_a D^-1 K_a^T`` summed) against its Cholesky factorisation, for each model of MODELS.

  Run: ``python -m benchmarks.bench_multidevice --assembly`` -> ``results/multidevice_assembly.*``.
  """
  import jax
  import jax.numpy as jnp

  import riemod
  from benchmarks.harness import machine_info, time_interleaved, write_json

  rows = {}
  load = [os.getloadavg()[0]]
  for name in MODELS:
    params, x, y, _, (model, loss, metric) = _model(name)
    _, _, curv = riemod.value_grad_and_curvature(
        model, x, lambda z: loss(z, y), metric, params=params, curvature_batch=MODELS[name][4])
    factors = [m.factor for m in curv.modules if m.factor is not None]
    inverse = [{k: jnp.asarray(10.0) for k in f.leaf_names} for f in factors]  # mass 0.1
    kernel = jax.jit(lambda fs: sum(f.gram(m) for f, m in zip(fs, inverse)))
    matrix = jnp.eye(curv.num_rows) + kernel(factors)
    factor = jax.jit(lambda a: jax.lax.linalg.cholesky(a, symmetrize_input=False))
    timed = time_interleaved({"assembly": (kernel, (factors,)), "cholesky": (factor, (matrix,))},
                             rounds=7, burst=10, reference="cholesky")
    rows[name] = {"d": curv.num_rows, **timed}
  load.append(os.getloadavg()[0])
  write_json(RESULTS / "multidevice_assembly.json", {"machine": machine_info(), "rows": rows,
                                                     "load_before_after": load})
  lines = ["# One-block structure: kernel assembly vs Cholesky (one device)\n",
           "The replicated work of `structure=\"full\"` per step: assembling the `d x d` kernel "
           "(sum of the modules' Gram-Hadamard products) and factoring it, float32, medians of 7 "
           "interleaved rounds of 10 calls on a 2-core CPU; 'ratio': assembly / Cholesky "
           f"(median, range over rounds). Load (1 min) before/after: {load[0]:.1f}, {load[1]:.1f}. "
           "Reproduce: `python -m benchmarks.bench_multidevice --assembly`.\n",
           "| model | d | assembly (ms) | Cholesky (ms) | assembly / Cholesky |", "|---|---|---|---|---|"]
  for name, row in rows.items():
    a, c = row["assembly"], row["cholesky"]
    lines.append(f"| {name} | {row['d']} | {1e3 * a['median_seconds']:.2f} | "
                 f"{1e3 * c['median_seconds']:.2f} | {a['ratio']:.2f} "
                 f"({a['ratio_spread'][0]:.2f}-{a['ratio_spread'][1]:.2f}) |")
  text = "\n".join(lines) + "\n"
  (RESULTS / "multidevice_assembly.md").write_text(text)
  print(text)


# --- the Kronecker mass: statistics per device, refreshes spread -----------------------------------


def kronecker_flops(name: str, devices: int) -> dict:
  """Analytic FLOPs of the Kronecker mass for MODELS[name], per device.

  Statistics: ``A`` sums ``m P`` outer products of the inputs (``2 m P fan_in^2``), ``S`` sums
  ``k m P`` of the pulled-back cotangents (``2 k m P fan_out^2``), ``m`` curvature samples and
  ``k`` rows per sample; spread, each device sums ``1 / devices`` of them. Refresh: the Cholesky
  factorisation (``n^3 / 3``) and triangular inverse (``n^3``) of both damped factors,
  ``n = 1 + fan_in`` and ``fan_out``; spread, the most loaded device's modules under
  ``_mesh.assign`` (balanced by ``n_in^3 + n_out^3``).

  Example:
    >>> kronecker_flops("mlp", 2)["refresh"]["spread"] < kronecker_flops("mlp", 2)["refresh"]["replicated"]
    True
  """
  from riemod.curvature import _mesh

  sizes, _, _, metric_name, samples = MODELS[name]
  k = sizes[-1] if metric_name in ("softmax_fisher", "identity") else 1
  layers = list(zip(sizes[:-1], sizes[1:]))
  statistics = sum(2 * samples * a ** 2 + 2 * k * samples * b ** 2 for a, b in layers)
  refresh = [4 / 3 * ((a + 1) ** 3 + b ** 3) for a, b in layers]
  return {"statistics": {"replicated": float(statistics), "spread": statistics / devices},
          "refresh": {"replicated": sum(refresh), "spread": largest_load(refresh, devices)},
          "owner": list(_mesh.assign(refresh, devices))}


def kronecker_bytes(name: str, itemsize: int = 4) -> dict:
  """Bytes each all-reduce of the spread Kronecker mass carries for MODELS[name] (result sizes).

  ``statistics``: per dense layer the lower triangles of ``sum x x^T`` (``fan_in (fan_in + 1)
  / 2``) and ``sum c c^T`` (``fan_out (fan_out + 1) / 2``) and ``sum x`` (``fan_in``), every
  step; ``refresh``: the lower triangles of both damped factors' Cholesky roots and inverses
  (``2 (n (n + 1) / 2)`` for ``n = 1 + fan_in`` and ``fan_out``), on refresh steps only.

  Example:
    >>> kronecker_bytes("mlp")["statistics"]
    141916
  """
  layers = list(zip(MODELS[name][0][:-1], MODELS[name][0][1:]))
  statistics = sum(a * (a + 1) // 2 + a + b * (b + 1) // 2 for a, b in layers)
  refresh = sum((a + 1) * (a + 2) + b * (b + 1) for a, b in layers)
  return {"statistics": itemsize * statistics, "refresh": itemsize * refresh}


def largest_load(costs: list[float], devices: int) -> float:
  """The most loaded device's summed ``costs`` under ``_mesh.assign`` (the spread's work per
  device).

  Example:
    >>> largest_load([8.0, 1.0, 5.0, 4.0], devices=2)
    9.0
  """
  from riemod.curvature import _mesh

  owner = _mesh.assign(costs, devices)
  return max(sum(c for c, o in zip(costs, owner) if o == j) for j in range(devices))


def _child_kronecker(devices: int) -> dict:
  """MODELS with the Kronecker mass (layerwise, SPRING momentum): one device, replicated (the
  curvature's axes dropped: every device sums every statistic, refreshes every factor and factors
  every block) and spread (statistics per device + one all-reduce, refreshes and blocks on their
  owners)."""
  import riemod
  from benchmarks.harness import time_interleaved

  out = {}
  for name in MODELS:
    tx = riemod.layerwise_natural_gradient(
        0.1, geometry=riemod.Geometry(mass=1.0, structure="layerwise",
                                      mass_policy=riemod.masses.kronecker()),
        momentum=0.8, on_nonfinite="ignore")
    params, state, x, y, one, mapped = _steps(name, devices, tx)
    programs = {"one_device": (one, (params, state, x, y)),
                "replicated": (mapped(False), (params, state, x, y)),
                "spread": (mapped(True), (params, state, x, y))}
    recipes, diff = _compiled(programs)
    row = {"recipes": recipes, "max_relative_difference": diff("spread", "replicated")}
    timed = time_interleaved(programs, rounds=5, burst=5, reference="replicated")
    for recipe, entry in timed.items():
      row["recipes"][recipe].update(entry)
    costs = [b["flops"] for b in blocks(name)]
    row["kronecker_flops"] = kronecker_flops(name, devices)
    row["block_flops"] = {"replicated": sum(costs), "spread": largest_load(costs, devices)}
    out[name] = row
  return {"devices": devices, "models": out, "load_before_after": [os.getloadavg()[0]]}


def kronecker() -> None:
  """The Kronecker-mass rows. Run: ``python -m benchmarks.bench_multidevice --kronecker`` ->
  ``results/multidevice_kronecker.{json,md}``."""
  _measure("--child-kronecker", "multidevice_kronecker", kronecker_report)


def kronecker_report(rows: list[dict]) -> str:
  """The results page from the rows of ``multidevice_kronecker.json``."""
  loads = [f"{l:.1f}" for row in rows for l in row["load_before_after"]]
  text = (
      "# Multi-device step with the Kronecker mass: statistics and refreshes spread vs replicated\n"
      "\n`riemod.layerwise_natural_gradient` with `riemod.masses.kronecker()` (mass 1, "
      "refreshed every step), SPRING momentum 0.8, float32, batch 128, the models of "
      "multidevice.md, on forced host devices of a 2-core CPU. 'replicated': the curvature's "
      "axes dropped, so every device sums the statistics of all samples, refreshes every "
      "module's factors and factors every block; 'spread': each device sums its samples' "
      "statistics (one all-reduce joins them), refreshes its modules' factors and factors its "
      "blocks (one all-reduce shares each). FLOPs per device are analytic "
      "(`benchmarks.bench_multidevice.kronecker_flops`: statistics `2 m (fan_in^2 + k fan_out^2)` "
      "per layer, `m` curvature samples, `k` rows each, divided over the devices; refresh "
      "`4/3 (n_in^3 + n_out^3)` per module, the most loaded device; blocks as in multidevice.md). "
      "Collectives from the compiled HLO (result sizes). Step times: medians of 5 interleaved "
      "rounds of 5 steps, 'vs replicated' the median ratio to the replicated step of the same "
      "round (range over rounds). The devices share two cores: the times measure total work "
      f"and overhead, not a speed-up. Load averages (1 min) around the runs: {', '.join(loads)}."
      "\nReproduce: `python -m benchmarks.bench_multidevice --kronecker`.\n")
  for name, (sizes, _, loss, metric, samples) in MODELS.items():
    diffs = [row["models"][name]["max_relative_difference"] for row in rows]
    sent = kronecker_bytes(name)
    text += (
        f"\n## {name}: {'-'.join(map(str, sizes))}, {loss}, {metric} on {samples} samples\n\n"
        "Spread vs replicated parameters after one step: max relative difference "
        f"{max(diffs):.1e}. The spread's all-reduces, beyond the gradient's: the solved steps "
        "(parameter-sized, as in multidevice.md), the statistics "
        f"({sent['statistics'] / 1024:.1f} KiB, every step; XLA combines them with the "
        "gradient's) and the refreshed factors' triangles "
        f"({sent['refresh'] / 1024:.1f} KiB, on refresh steps; analytic, "
        "`kronecker_bytes`). Refresh owners per device count: "
        + "; ".join(f"{row['devices']}: {row['models'][name]['kronecker_flops']['owner']}"
                    for row in rows) + ".\n\n"
        "| devices | scheme | statistics MFLOP per device | refresh MFLOP per device | blocks "
        "GFLOP per device | all-gathers | KiB all-gathered | KiB all-to-all | all-reduces | "
        "KiB all-reduced | step time (ms) | vs replicated |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for row in rows:
      model = row["models"][name]
      flops = model["kronecker_flops"]
      for recipe in ("one_device", "replicated", "spread"):
        if recipe == "one_device" and row is not rows[0]:
          continue
        work = "replicated" if recipe == "one_device" else recipe
        r = model["recipes"][recipe]
        c = r["collectives"]
        text += (
            f"| {1 if recipe == 'one_device' else row['devices']} | {recipe.replace('_', ' ')} | "
            f"{flops['statistics'][work] / 1e6:.2f} | {flops['refresh'][work] / 1e6:.2f} | "
            f"{model['block_flops'][work] / 1e9:.3f} | {c['all-gather']['count']} | "
            f"{c['all-gather']['bytes'] / 1024:.1f} | {c['all-to-all']['bytes'] / 1024:.1f} | "
            f"{c['all-reduce']['count']} | "
            f"{c['all-reduce']['bytes'] / 1024:.1f} | {1e3 * r['median_seconds']:.1f} | "
            f"{r['ratio']:.2f} ({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f}) |\n")
  return text


# --- rows to their owners: what an owner-only exchange would move ----------------------------------


def owner_exchange(module_arrays: list[dict], costs: list[float], devices: int) -> dict:
  """Bytes per device of the layerwise rows: gathered to every device (today) or only to each
  block's owner by one ``all_to_all`` of per-owner packed buffers.

  ``module_arrays[b]``: ``{key: bytes}`` of the whole-batch arrays block ``b`` needs (layer
  inputs, pulled-back rows), equal keys for an array several blocks share (attention's query, key
  and value read one input; XLA gathers it once). Gathered to every device, each device holds the
  union, ``sum_b s_b`` without repeats. With owners ``o(b) = _mesh.assign(costs)`` device ``j``
  needs only ``S_j``, the union over the blocks it owns; every device would pack, for each
  owner, its own samples' share of that owner's arrays (``S_j / devices``) padded to the largest
  share (``max_j S_j / devices``), and one ``all_to_all`` delivers each owner its ``devices``
  pieces: ``max_j S_j`` per device (result size; ``(n-1)/n`` of it from the other devices, as for
  an all-gather).

  Example:
    >>> owner_exchange([{"x": 40}, {"x": 40, "c": 30}, {"e": 30}], [1.0, 3.0, 2.0], devices=2)
    {'gathered': 100, 'owner_only': 70, 'per_owner': [70, 70]}
  """
  from riemod.curvature import _mesh

  owner = _mesh.assign(costs, devices)
  union = lambda blocks: sum({k: v for b in blocks for k, v in b.items()}.values())
  per_owner = [union([a for a, o in zip(module_arrays, owner) if o == j])
               for j in range(devices)]
  return {"gathered": union(module_arrays), "owner_only": max(per_owner),
          "per_owner": per_owner}


def _rows_layout(curv) -> tuple[list[dict], list[float], int]:
  """``(each block's arrays {content hash: bytes}, each block's factorisation cost, bytes of the
  loss gradient's coordinates)`` of a whole-batch curvature on one device (concrete: arrays that
  several blocks share are recognised by their contents)."""
  import hashlib

  import jax
  import numpy as np

  from riemod.curvature import _mesh

  factors = [m.factor for m in curv.modules if m.factor is not None]
  d = curv.num_rows
  costs = [_mesh.factorisation_flops(f.num_params, d, "parameter" if f.num_params < d
                                     else "sample") for f in factors]
  arrays = []
  for f in factors:
    leaves = [np.ascontiguousarray(a) for a in jax.tree.leaves(f)]
    arrays.append({hashlib.sha1(a.tobytes()).hexdigest(): a.nbytes for a in leaves})
  coordinates = 0 if curv.coordinates is None else int(np.asarray(curv.coordinates).nbytes)
  return arrays, costs, coordinates


def _child_owners(devices: int) -> dict:
  """Today's all-gathered bytes (compiled HLO of the spread layerwise step) and the owner-only
  exchange's (analytic from the whole-batch curvature's shapes), for MODELS and the transformer."""
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  import riemod

  out = {}
  for name in MODELS:
    tx = riemod.layerwise_natural_gradient(0.1, mass=0.1, momentum=0.8, on_nonfinite="ignore")
    params, state, x, y, _, mapped = _steps(name, devices, tx)
    _, _, _, _, (model, loss, metric) = _model(name)
    programs = {"all_rows": (mapped(True, shards=False), (params, state, x, y)),
                "owners": (mapped(True), (params, state, x, y))}
    recipes, diff = _compiled(programs)
    curv = jax.jit(lambda p: riemod.value_grad_and_curvature(
        model, x, lambda z: loss(z, y), metric, params=p,
        curvature_batch=MODELS[name][4])[2])(params)
    out[name] = {"collectives": recipes["all_rows"]["collectives"],
                 "owners_collectives": recipes["owners"]["collectives"],
                 "owners_vs_all_rows": diff("owners", "all_rows"), "layout": _rows_layout(curv)}
  lm, graphdef, params, x, y, metric, key = _transformer_setup()
  tx = riemod.layerwise_natural_gradient(
      0.01, geometry=riemod.Geometry(mass=30.0, structure="layerwise",
                                     mass_policy=riemod.masses.adaptive(0.99)),
      momentum=0.9, on_nonfinite="ignore")
  mesh = Mesh(np.array(jax.devices()), ("batch",))

  def step(p, s, x, y, shards):
    _, grads, curv = riemod.value_grad_and_curvature(
        nnx.merge(graphdef, p), x, lambda logits: lm.cross_entropy(logits, y), metric, key=key,
        axis_name="batch")
    updates, s = tx.update(grads, s, p, curvature=curv if shards else curv.replicated())
    return optax.apply_updates(p, updates), s

  mapped = lambda shards: jax.jit(jax.shard_map(
      lambda p, s, x, y: step(p, s, x, y, shards), mesh=mesh,
      in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P(), P())))
  args = (params, tx.init(params), x, y)
  recipes, diff = _compiled({"all_rows": (mapped(False), args), "owners": (mapped(True), args)})
  curv = jax.jit(lambda p: riemod.value_grad_and_curvature(
      nnx.merge(graphdef, p), x, lambda logits: lm.cross_entropy(logits, y), metric,
      key=key)[2])(params)
  out["transformer"] = {"collectives": recipes["all_rows"]["collectives"],
                        "owners_collectives": recipes["owners"]["collectives"],
                        "owners_vs_all_rows": diff("owners", "all_rows"),
                        "layout": _rows_layout(curv)}
  for row in out.values():
    arrays, costs, coordinates = row.pop("layout")
    row["owners"] = owner_exchange(arrays, costs, devices)
    row["coordinates_bytes"] = coordinates
    row["blocks"] = len(arrays)
  return {"devices": devices, "models": out, "load_before_after": [os.getloadavg()[0]]}


def owners() -> None:
  """The rows-to-owners analysis. Run: ``python -m benchmarks.bench_multidevice --owners`` ->
  ``results/multidevice_owners.{json,md}``."""
  _measure("--child-owners", "multidevice_owners", owners_report)


def owners_report(rows: list[dict]) -> str:
  """The results page from the rows of ``multidevice_owners.json``."""
  text = (
      "# Rows to their owners: every row on every device against each block's rows to its owner\n\n"
      "The layerwise step inside `jax.shard_map` (the spread scheme, float32), compiled twice: "
      "'all rows' with the curvature's per-device shards dropped (`curvature.replicated()`), so "
      "every device all-gathers every module's layer inputs and pulled-back rows although only "
      "a block's owner factors it; 'owners' as riemod runs it, each block's rows sent to its "
      "owner alone by one `all_to_all` per dtype of per-owner packed buffers "
      "(`riemod.curvature._mesh.to_owners`). Bytes are the result sizes of the compiled "
      "program's all-gathers and all-to-alls (each device holds them; `(n-1)/n` arrive from the "
      "other devices); the loss gradient's coordinates are still all-gathered. 'analytic': the "
      "owner-only bytes predicted from the whole-batch curvature's shapes, `max_j S_j` plus the "
      "coordinates, with arrays several blocks share counted once "
      "(`benchmarks.bench_multidevice.owner_exchange`); riemod sends such an array once per "
      "block, so the measured bytes exceed it where blocks share inputs (the transformer's "
      "query, key and value). 'rows per owner': `S_j` of every device. 'max diff': the largest "
      "relative difference of the parameters after one step, owners against all rows. Models: "
      "the digits MLP and autoencoder of multidevice.md (constant mass 0.1) and the transformer "
      "of multidevice_transformer.md. Compile and one step, no timing.\n"
      "Reproduce: `python -m benchmarks.bench_multidevice --owners`.\n\n"
      "| model | blocks | devices | all rows: all-gather KiB | owners: all-gather KiB | "
      "owners: all-to-all KiB | owners / all rows | analytic (KiB) | rows per owner (KiB) | "
      "max diff |\n|---|---|---|---|---|---|---|---|---|---|\n")
  for name in rows[0]["models"]:
    for row in rows:
      model = row["models"][name]
      today = model["collectives"]["all-gather"]["bytes"]
      mine = model["owners_collectives"]
      moved = mine["all-gather"]["bytes"] + mine["all-to-all"]["bytes"]
      found, coordinates = model["owners"], model["coordinates_bytes"]
      per_owner = ", ".join(f"{b / 1024:.0f}" for b in found["per_owner"])
      text += (f"| {name} | {model['blocks']} | {row['devices']} | {today / 1024:.1f} | "
               f"{mine['all-gather']['bytes'] / 1024:.1f} | {mine['all-to-all']['bytes'] / 1024:.1f} | "
               f"{moved / today:.2f} | {(found['owner_only'] + coordinates) / 1024:.1f} | "
               f"{per_owner} | {model['owners_vs_all_rows']:.1e} |\n")
  return text


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--child":
    print(json.dumps(_child(int(sys.argv[2]))))
  elif len(sys.argv) == 3 and sys.argv[1] == "--child-one-block":
    print(json.dumps(_child_one_block(int(sys.argv[2]))))
  elif len(sys.argv) == 3 and sys.argv[1] == "--child-transformer":
    print(json.dumps(_child_transformer(int(sys.argv[2]))))
  elif len(sys.argv) == 3 and sys.argv[1] == "--child-kronecker":
    print(json.dumps(_child_kronecker(int(sys.argv[2]))))
  elif len(sys.argv) == 3 and sys.argv[1] == "--child-owners":
    print(json.dumps(_child_owners(int(sys.argv[2]))))
  elif sys.argv[1:] == ["--kronecker"]:
    kronecker()
  elif sys.argv[1:] == ["--owners"]:
    owners()
  elif sys.argv[1:] == ["--one-block"]:
    one_block()
  elif sys.argv[1:] == ["--transformer"]:
    transformer()
  elif sys.argv[1:] == ["--assembly"]:
    assembly()
  else:
    main()

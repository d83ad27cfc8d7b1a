"""The same MLP as an NNX model and as plain functions: step time and compile time.

The MLP 64-128-128-10 (tanh) with the exact softmax Fisher on a batch of 128 (d = 1280 rows per
module), layerwise natural gradient: as ``riemod.nn.Sequential``; as a plain function written with
``riemod.nn.dense`` (structured path); and as a plain function with ``@`` (generic path, rows
materialised). Adam on the NNX model for the compile-time comparison. Step times are interleaved
(benchmarks.harness.time_interleaved), ratios against the NNX step.

A small conv net (8x8x3 inputs, 3x3 conv to 8 channels SAME, tanh, dense to 10; B = 64, exact
softmax Fisher, d = 640 rows) the same three ways: ``nnx.Conv`` + ``nnx.Linear``; a plain function
with ``riemod.nn.conv`` + ``riemod.nn.dense``; a plain function with ``lax.conv_general_dilated``
and ``@`` (generic path).

Run: ``python -m benchmarks.bench_plain_function [--groups mlp,conv]`` ->
results/plain_function.{json,md} (rows of groups not run are kept from the last run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import riemod
from benchmarks.harness import machine_info, time_interleaved, write_json

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (64, 128, 128, 10)


def _problem():
  k = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(k[0], (128, SIZES[0]))
  y = jax.random.randint(k[1], (128,), 0, SIZES[-1])
  loss_fn = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  model = riemod.nn.Sequential(
      riemod.nn.Dense(64, 128, rngs=nnx.Rngs(0)), jnp.tanh,
      riemod.nn.Dense(128, 128, rngs=nnx.Rngs(1)), jnp.tanh,
      riemod.nn.Dense(128, 10, rngs=nnx.Rngs(2)))
  pure = nnx.as_pure(nnx.state(model, nnx.Param))
  params = {f"l{i}": {"kernel": pure["layers"][2 * i]["kernel"], "bias": pure["layers"][2 * i]["bias"]}
            for i in range(3)}
  return x, loss_fn, model, params


def _structured(p, x):
  h = jnp.tanh(riemod.nn.dense(p["l0"], x))
  h = jnp.tanh(riemod.nn.dense(p["l1"], h))
  return riemod.nn.dense(p["l2"], h)


def _generic(p, x):
  h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"])
  h = jnp.tanh(h @ p["l1"]["kernel"] + p["l1"]["bias"])
  return h @ p["l2"]["kernel"] + p["l2"]["bias"]


class _ConvNet(nnx.Module):
  def __init__(self):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    self.head = nnx.Linear(8 * 8 * 8, 10, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.head(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))


def _conv_structured(p, x):
  h = jnp.tanh(riemod.nn.conv(p["conv"], x))
  return riemod.nn.dense(p["head"], h.reshape(x.shape[0], -1))


def _conv_generic(p, x):
  y = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jnp.tanh(y + p["conv"]["bias"]).reshape(x.shape[0], -1)
  return h @ p["head"]["kernel"] + p["head"]["bias"]


def _cases(x, loss_fn, graphdef, state, params, structured, generic, names) -> dict:
  """The four steps of a group: NNX, plain structured, plain generic (riemod, exact Fisher,
  layerwise), Adam on the plain function; ``names`` in that order."""
  tx = riemod.layerwise_natural_gradient(0.1, mass=1e-2)
  metric = riemod.metrics.softmax_fisher()

  def nnx_step(state, opt_state):
    _, g, curv = riemod.value_grad_and_curvature(nnx.merge(graphdef, state), x, loss_fn, metric)
    return tx.update(nnx.as_pure(g), opt_state, curvature=curv)

  def fn_step(f):
    def step(p, opt_state):
      _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, metric, params=p)
      return tx.update(g, opt_state, p, curvature=curv)
    return step

  adam = optax.adam(1e-2)

  def adam_step(p, opt_state):
    g = jax.grad(lambda q: loss_fn(generic(q, x)))(p)
    return adam.update(g, opt_state, p)

  steps = (nnx_step, fn_step(structured), fn_step(generic), adam_step)
  args = ((state, tx.init(nnx.as_pure(state))), (params, tx.init(params)),
          (params, tx.init(params)), (params, adam.init(params)))
  return dict(zip(names, zip(steps, args)))


def _conv_group():
  k = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(k[0], (64, 8, 8, 3))
  y = jax.random.randint(k[1], (64,), 0, 10)
  loss_fn = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  model = _ConvNet()
  graphdef, state = nnx.split(model, nnx.Param)
  pure = nnx.as_pure(state)
  params = {m: dict(pure[m]) for m in ("conv", "head")}
  cases = _cases(x, loss_fn, graphdef, state, params, _conv_structured, _conv_generic, (
      "conv net: nnx (nnx.Conv)", "conv net: plain function, riemod.nn.conv",
      "conv net: plain function, generic path", "conv net: adam (plain function)"))
  return cases, "conv net: nnx (nnx.Conv)"


def _timed_rows(cases, reference, group):
  compiled, compile_seconds = {}, {}
  for name, (fn, args) in cases.items():
    start = time.perf_counter()
    compiled[name] = (jax.jit(fn).lower(*args).compile(), args)
    compile_seconds[name] = time.perf_counter() - start
  timing = time_interleaved(compiled, rounds=5, burst=5, reference=reference)
  return [{"group": group, "case": name, "step_ms": 1e3 * timing[name]["median_seconds"],
           "ratio_to_nnx": timing[name].get("ratio"),
           "ratio_spread": timing[name].get("ratio_spread"),
           "compile_s": compile_seconds[name]} for name in cases]


def main() -> None:
  parser = argparse.ArgumentParser(description="Plain functions against the NNX model.")
  parser.add_argument("--groups", default="mlp,conv",
                      help="comma-separated groups to run: mlp, conv (default: mlp,conv)")
  groups = parser.parse_args().groups.split(",")
  path = RESULTS / "plain_function.json"
  kept = json.loads(path.read_text()) if path.exists() else {"rows": []}
  runs = {r.get("group", "mlp"): kept.get("machines", {}).get(r.get("group", "mlp"),
                                                              kept.get("machine"))
          for r in kept["rows"]}
  rows = [dict(r, group=r.get("group", "mlp")) for r in kept["rows"]
          if r.get("group", "mlp") not in groups]
  if "mlp" in groups:
    rows += _mlp_rows()
    runs["mlp"] = machine_info()
  if "conv" in groups:
    cases, reference = _conv_group()
    rows += _timed_rows(cases, reference, "conv")
    runs["conv"] = machine_info()
  rows.sort(key=lambda r: r["group"] != "mlp")
  write_json(path, {"machines": runs, "rows": rows})
  lines = ["# Plain functions against the NNX model (exact Fisher, layerwise)", "",
           "MLP 64-128-128-10, B = 128; conv net 8x8x3 -> 3x3 conv (8) -> dense 10, B = 64. "
           "Step times interleaved (5 rounds x 5 steps), ratio to the NNX model of the group "
           "(median over rounds, spread); compile s is one lowering + compile.", ""]
  for group, machine in runs.items():
    lines.append(f"Machine ({group}): {machine}")
  lines += ["", "| case | step ms | ratio to NNX (spread) | compile s |", "| --- | --- | --- | --- |"]
  for r in rows:
    lo, hi = r["ratio_spread"]
    lines.append(f"| {r['case']} | {r['step_ms']:.1f} | {r['ratio_to_nnx']:.3g} ({lo:.3g}-{hi:.3g}) | "
                 f"{r['compile_s']:.1f} |")
  (RESULTS / "plain_function.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


def _mlp_rows() -> list[dict]:
  x, loss_fn, model, params = _problem()
  graphdef, state = nnx.split(model, nnx.Param)
  cases = _cases(x, loss_fn, graphdef, state, params, _structured, _generic, (
      "nnx (riemod.nn.Dense)", "plain function, riemod.nn.dense", "plain function, generic path",
      "adam (plain function)"))
  return _timed_rows(cases, "nnx (riemod.nn.Dense)", "mlp")


if __name__ == "__main__":
  main()

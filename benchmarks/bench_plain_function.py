"""The same MLP as an NNX model and as plain functions: step time and compile time.

The MLP 64-128-128-10 (tanh) with the exact softmax Fisher on a batch of 128 (d = 1280 rows per
module), layerwise natural gradient: as ``riemod.nn.Sequential``; as a plain function written with
``riemod.nn.dense`` (structured path); and as a plain function with ``@`` (generic path, rows
materialised). Adam on the NNX model for the compile-time comparison. Step times are interleaved
(benchmarks.harness.time_interleaved), ratios against the NNX step.

Run: ``python -m benchmarks.bench_plain_function`` -> results/plain_function.{json,md}.
"""

from __future__ import annotations

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


def main() -> None:
  x, loss_fn, model, params = _problem()
  tx = riemod.layerwise_natural_gradient(0.1, mass=1e-2)
  metric = riemod.metrics.softmax_fisher()
  graphdef, state = nnx.split(model, nnx.Param)

  def nnx_step(state, opt_state):
    m = nnx.merge(graphdef, state)
    _, g, curv = riemod.value_grad_and_curvature(m, x, loss_fn, metric)
    g = nnx.as_pure(g)
    u, opt_state = tx.update(g, opt_state, curvature=curv)
    return u, opt_state

  def fn_step(f):
    def step(p, opt_state):
      _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, metric, params=p)
      return tx.update(g, opt_state, p, curvature=curv)
    return step

  adam = optax.adam(1e-2)

  def adam_step(p, opt_state):
    g = jax.grad(lambda q: loss_fn(_generic(q, x)))(p)
    return adam.update(g, opt_state, p)

  pure_state = nnx.as_pure(state)
  cases = {
      "nnx (riemod.nn.Dense)": (nnx_step, (state, tx.init(pure_state))),
      "plain function, riemod.nn.dense": (fn_step(_structured), (params, tx.init(params))),
      "plain function, generic path": (fn_step(_generic), (params, tx.init(params))),
      "adam (plain function)": (adam_step, (params, adam.init(params))),
  }
  compiled, compile_seconds = {}, {}
  for name, (fn, args) in cases.items():
    start = time.perf_counter()
    compiled[name] = (jax.jit(fn).lower(*args).compile(), args)
    compile_seconds[name] = time.perf_counter() - start
  timing = time_interleaved(compiled, rounds=5, burst=5, reference="nnx (riemod.nn.Dense)")
  rows = [{"case": name, "step_ms": 1e3 * timing[name]["median_seconds"],
           "ratio_to_nnx": timing[name].get("ratio"), "ratio_spread": timing[name].get("ratio_spread"),
           "compile_s": compile_seconds[name]} for name in cases]
  write_json(RESULTS / "plain_function.json", {"machine": machine_info(), "rows": rows})
  lines = ["# Plain functions against the NNX model (exact Fisher, layerwise, MLP 64-128-128-10, B = 128)",
           "", f"Machine: {machine_info()}", "",
           "| case | step ms | ratio to NNX (spread) | compile s |", "| --- | --- | --- | --- |"]
  for r in rows:
    lo, hi = r["ratio_spread"]
    lines.append(f"| {r['case']} | {r['step_ms']:.1f} | {r['ratio_to_nnx']:.3g} ({lo:.3g}-{hi:.3g}) | "
                 f"{r['compile_s']:.1f} |")
  (RESULTS / "plain_function.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

"""Benchmark: the cost of one riemod step against its anchors (issue 2's speed bullets).

Two measurements on the digits MLP (64-128-128-10 tanh, batch 128, layerwise structure):

* **sampled Fisher** (``sampled_softmax_fisher(1)``, ``d = B = 128`` rows per module): the whole
  jitted training step (curvature, composer, transform, ``apply_updates``) against a whole optax
  Adam step on the same batch. Reported for ``on_nonfinite="skip"`` and the default ``"error"``.
* **exact Fisher** (``softmax_fisher()``, ``d = 10 B = 1280``): the whole step against the dense
  Cholesky factorisations alone, i.e. bare LAPACK ``potrf`` (no symmetrisation, no checks) of the
  very capacitance matrices that step factors (three ``1280 x 1280``).

Each pair is timed in interleaved bursts (order rotated every round, ``block_until_ready`` after
every call), and the ratio is the median over rounds of the per-round ratio, so load on the machine
hits both sides alike. Results go to ``step_cost.json`` and ``step_cost.md``.

Usage:
  OPENBLAS_NUM_THREADS=1 python -m benchmarks.bench_step_cost [--rounds 9] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import riemod
from benchmarks import harness, mlp, problems

SIZES = [64, 128, 128, 10]
ACTIVATIONS = ["tanh", "tanh", None]
BATCH = 128
LEARNING_RATE, MASS = 0.1, 0.1


def _setup(seed: int = 0):
  task = mlp.MLPTask(SIZES, ACTIVATIONS, mlp.cross_entropy, "labels", BATCH, 1, None)
  graphdef, params = nnx.split(mlp.build_model(SIZES, ACTIVATIONS, seed))
  idx = jnp.asarray(problems.batch_table(seed, 1500, BATCH, 1)[0])
  x, y = task.batch(idx)
  return task, graphdef, params, x, y


def riemod_step(output_metric, on_nonfinite: str = "skip"):
  """The whole jitted riemod training step ``(params, opt_state) -> (params, opt_state)``."""
  task, graphdef, params, x, y = _setup()
  tx = riemod.layerwise_natural_gradient(LEARNING_RATE, MASS, on_nonfinite=on_nonfinite)
  key = jax.random.key(0)

  @jax.jit
  def step(p, s):
    loss, grads, curv = riemod.value_grad_and_curvature(
        nnx.merge(graphdef, p), x, lambda out: task.loss(out, y), output_metric, key=key)
    updates, s = tx.update(grads, s, p, curvature=curv, value=loss)
    return optax.apply_updates(p, updates), s

  return step, (params, tx.init(params))


def adam_step():
  task, graphdef, params, x, y = _setup()
  adam = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    grads = jax.grad(lambda q: task.loss(task.apply(q, x), y))(p)
    updates, s = adam.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  return step, (params, adam.init(params))


def capacitances(output_metric) -> list[jax.Array]:
  """The matrices the riemod step factors (one per module), computed once."""
  task, graphdef, params, x, y = _setup()
  _, _, curv = riemod.value_grad_and_curvature(
      nnx.merge(graphdef, params), x, lambda out: task.loss(out, y), output_metric,
      key=jax.random.key(0))
  geometry = riemod.Geometry(mass=MASS)
  composed = geometry.compose(curv, geometry.init(params))
  return [jnp.eye(block.chol.shape[0], dtype=block.chol.dtype)
          + sum(f.gram(m) for f, m in zip(block.factors, block.inv_masses))
          for block in composed.blocks]


def bare_choleskys(matrices):
  return [jax.lax.linalg.cholesky(m, symmetrize_input=False) for m in matrices]


def run(rounds: int = 9) -> dict:
  sampled = riemod.metrics.sampled_softmax_fisher(1)
  exact = riemod.metrics.softmax_fisher()
  load_start = list(os.getloadavg())
  first = harness.time_interleaved(
      {"adam": adam_step(), "riemod sampled (skip)": riemod_step(sampled, "skip"),
       "riemod sampled (error)": riemod_step(sampled, "error")},
      rounds=rounds, burst=30, reference="adam")
  mats = capacitances(exact)
  second = harness.time_interleaved(
      {"choleskys alone": (jax.jit(bare_choleskys), (mats,)),
       "riemod exact (skip)": riemod_step(exact, "skip")},
      rounds=rounds, burst=3, reference="choleskys alone")
  return {"sampled_vs_adam": first, "exact_vs_choleskys": second,
          "capacitance_sizes": [int(m.shape[0]) for m in mats],
          "targets": {"sampled_vs_adam": 1.5, "exact_vs_choleskys": 1.5},
          "machine": harness.machine_info(), "loadavg_start": load_start}


def markdown(result: dict) -> str:
  lines = ["# Step cost (digits MLP 64-128-128-10, batch 128, layerwise)", ""]
  for key, title in (("sampled_vs_adam", "Sampled Fisher (d = 128) against an Adam step"),
                     ("exact_vs_choleskys", "Exact Fisher (d = 1280) against its Cholesky "
                      "factorisations alone")):
    lines += [f"## {title} (target at most {result['targets'][key]}x)", "",
              harness.markdown_table(
                  ["part", "median ms", "ratio (median of rounds)", "ratio spread"],
                  [[name, 1e3 * e["median_seconds"], e["ratio"],
                    f"{e['ratio_spread'][0]:.2f}-{e['ratio_spread'][1]:.2f}"]
                   for name, e in result[key].items()]), ""]
  m = result["machine"]
  lines.append(f"Machine: {m.get('cpu_model')}, {m.get('affinity_cores')} cores, backend {m.get('backend')}, "
               f"load {result['loadavg_start']}, BLAS env {m.get('blas_env')}, "
               f"versions {m.get('versions')}.")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS)
  args = parser.parse_args(argv)
  result = run(args.rounds)
  args.out.mkdir(parents=True, exist_ok=True)
  harness.write_json(args.out / "step_cost.json", result)
  (args.out / "step_cost.md").write_text(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()

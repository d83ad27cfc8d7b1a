"""What the test suite's XLA flags buy: CPU seconds of an eager riemod workload per flag set.

The tests are compile-bound: an eager call runs every primitive through its own small XLA
compilation (a test of 3 curvatures and 6 updates compiled 450 programs, 35 of its 60 s), so the
flags that make XLA compile faster make the suite faster. The workload (NNX MLP 4-16-3, batch 8:
``value_grad_and_curvature``, both aliases' eager ``update``, one jitted update) runs in a fresh
subprocess per flag set, the sets interleaved over rounds; user CPU seconds (``getrusage``) are
reported beside wall seconds, since the CPU time is less disturbed by other load.

Run: ``python -m benchmarks.bench_test_flags`` -> results/test_flags.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.harness import machine_info, markdown_table, write_json

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDS = 3
FLAG_SETS = {
    "default": "",
    "O0": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    "O0 + no fusion emitters": ("--xla_backend_optimization_level=0 "
                                "--xla_llvm_disable_expensive_passes=true "
                                "--xla_cpu_use_fusion_emitters=false"),
}

WORKLOAD = r"""
import json, resource, time
t0 = time.time()
import jax, jax.numpy as jnp
from flax import nnx
import riemod
class M(nnx.Module):
  def __init__(self):
    self.a = nnx.Linear(4, 16, rngs=nnx.Rngs(0)); self.b = nnx.Linear(16, 3, rngs=nnx.Rngs(1))
  def __call__(self, x): return self.b(jnp.tanh(self.a(x)))
m = M(); x = jax.random.normal(jax.random.key(0), (8, 4)); t = jax.random.normal(jax.random.key(1), (8, 3))
loss = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
_, g, c = riemod.value_grad_and_curvature(m, x, loss, riemod.metrics.identity())
g = nnx.as_pure(g)
for make in (riemod.layerwise_natural_gradient, riemod.natural_gradient):
  tx = make(0.3, 1e-3); u, s = tx.update(g, tx.init(g), curvature=c)
jax.block_until_ready(u)
step = jax.jit(lambda g, s: tx.update(g, s, curvature=c))
jax.block_until_ready(step(g, s))
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(wall=time.time() - t0, user=r.ru_utime, sys=r.ru_stime)))
"""


def _run(flags: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=flags, OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", WORKLOAD], env=env, capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  load_before = os.getloadavg()
  runs = {name: [] for name in FLAG_SETS}
  for r in range(ROUNDS):
    for name, flags in FLAG_SETS.items():
      runs[name].append(_run(flags))
      print(r, name, runs[name][-1], flush=True)
  info = machine_info()
  info["load_after"] = os.getloadavg()
  info["load_before"] = load_before
  base = np.median([x["user"] for x in runs["default"]])
  rows = []
  for name, values in runs.items():
    user = np.array([x["user"] for x in values])
    wall = np.array([x["wall"] for x in values])
    rows.append([name, FLAG_SETS[name] or "(none)", f"{np.median(user):.1f} ({user.min():.1f}-{user.max():.1f})",
                 f"{np.median(wall):.1f} ({wall.min():.1f}-{wall.max():.1f})",
                 f"{np.median(user) / base:.2f}"])
  RESULTS.mkdir(exist_ok=True)
  write_json(RESULTS / "test_flags.json", dict(machine=info, rounds=ROUNDS, flag_sets=FLAG_SETS,
                                               runs=runs))
  text = ("# XLA flags and the test suite's compile-bound workload\n\n"
          f"`python -m benchmarks.bench_test_flags`: {ROUNDS} interleaved rounds, median (range). "
          f"Load {load_before[0]:.1f} before, {info['load_after'][0]:.1f} after; "
          "user CPU is less disturbed by load than wall time.\n\n"
          + markdown_table(["flags", "XLA_FLAGS", "user CPU s", "wall s", "user vs default"], rows)
          + "\n")
  (RESULTS / "test_flags.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()

"""Times ``count_laws`` for the architectures of the conservation tests and ~200-parameter networks.

Run: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.bench_conservation`` (or as a script). Writes
``benchmarks/results/conservation.json`` and ``conservation.md``. Each time includes JIT compilation
(a cold call, what a user of ``riemod laws`` waits for) and is the best of ``--repeat`` cold calls.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp

from riemod import conservation as cons

CASES = [
    ("x1 x2 x3", lambda: (lambda x: jnp.prod(x)[None], 3), {}, 2),
    ("U V^T n=3 m=2 r=2", lambda: (cons.factorization(3, 2, 2), None), {}, 3),
    ("U V^T n=2 m=2 r=3", lambda: (cons.factorization(2, 2, 3), None), {}, 6),
    ("U V^T n=3 m=3 r=3", lambda: (cons.factorization(3, 3, 3), None), {}, 6),
    ("two-layer ReLU 3-3-2", lambda: (cons.two_layer_relu(3, 3, 2), None), {}, 3),
    ("deep ReLU 2-3-3-2", lambda: (cons.relu_network((2, 3, 3, 2)), None), {}, 6),
    ("deep ReLU 2-3-3-2 + bias", lambda: (cons.relu_network((2, 3, 3, 2), bias=True), None), {}, 6),
    ("NMF mirror flow 3x3 r=2", lambda: (cons.factorization(3, 3, 2, positive=True), None),
     {"metric": "entropic"}, None),
    ("momentum U V^T 2x2 r=2", lambda: (cons.factorization(2, 2, 2), None), {"flow": "momentum"}, None),
    ("momentum two-layer ReLU 3-2-2", lambda: (cons.two_layer_relu(3, 2, 2), None), {"flow": "momentum"}, 0),
    ("~200 params: ReLU 6-10-8-3 + bias (185)", lambda: (cons.relu_network((6, 10, 8, 3), bias=True), None),
     {}, 18),
    ("~200 params: U V^T 10x10 r=10 (200)", lambda: (cons.factorization(10, 10, 10), None), {}, 55),
    ("~200 params: linear 8-10-8 (160)", lambda: (cons.linear_network((8, 10, 8)), None), {}, 55),
]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeat", type=int, default=1)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  rows = []
  for name, build, options, expected in CASES:
    best = float("inf")
    for _ in range(args.repeat):
      jax.clear_caches()
      phi, shapes = build()
      started = time.perf_counter()
      result = cons.count_laws(phi, shapes, num_points=3, **options)
      best = min(best, time.perf_counter() - started)
    rows.append(dict(case=name, parameters=result.parameters, dimension=result.dimension, laws=result.count,
                     expected=expected, lie_dimension=result.lie_dimension,
                     rank_history=result.rank_history[0], seconds=round(best, 3),
                     ambiguous=result.ambiguous))
    print(f"{name:45s} D={result.parameters:4d} laws={result.count:3d} (expected {expected}) "
          f"{best:7.2f} s", flush=True)
  machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                 cpu_count=os.cpu_count(), python=platform.python_version(), jax=jax.__version__,
                 backend=jax.default_backend(), openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
                 num_points=3, timing="best of %d cold calls (includes JIT compilation)" % args.repeat)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "conservation.json").write_text(json.dumps(dict(machine=machine, results=rows), indent=2))
  lines = ["# Conservation-law counting times", "",
           f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, Python {machine['python']}, "
           f"jax {machine['jax']} ({machine['backend']}), OPENBLAS_NUM_THREADS={machine['openblas_threads']}. "
           f"Times: {machine['timing']}, 3 random points each.", "",
           "| case | D | laws | expected | rank per round | seconds |", "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['case']} | {row['parameters']} | {row['laws']} | {row['expected']} | "
                 f"{row['rank_history']} | {row['seconds']:.2f} |")
  (out / "conservation.md").write_text("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

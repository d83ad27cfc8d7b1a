"""scaling: step time and compiled memory of one training step versus batch size and width.

Model: MLP 64-W-W-10 tanh, softmax cross-entropy, random inputs and labels. Methods:

* ``adam``: ``optax.adam`` (the baseline cost of a gradient step).
* ``riemod``: :func:`riemod.layerwise_natural_gradient` with the one-sample Monte-Carlo Fisher
  (``sampled_softmax_fisher:1``, so ``d = B`` factor rows per layer), Woodbury in sample space
  (``space="sample"``): the design promises ``O(n d^2 + d^3)`` per layer and no materialised
  ``K`` (Gram-Hadamard kernels).
* ``dense``: the same metric solved in parameter space (``space="parameter"``): ``K`` is
  materialised and ``G`` (``n x n`` per layer) factored by Cholesky, ``O(n^2 d + n^3)``.

Measured per (method, batch, width): median step seconds (interleaved bursts over the methods
of one configuration, after compilation), and from XLA's ``compile().memory_analysis()`` the temp
(scratch) bytes and argument bytes of the compiled step. ``K_bytes`` is what a materialised ``K``
of the largest layer would take (``d * n * itemsize``): riemod's temp bytes staying below it shows
that ``K`` is never formed. Configurations whose estimated cost is over budget are skipped and
recorded (the dense solve when a layer has more than ``DENSE_MAX_PARAMS`` parameters).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import riemod
from benchmarks import harness, mlp

NAME = "scaling"
BATCHES = [32, 64, 128, 256, 512, 1024]
WIDTHS = [64, 128, 256, 512, 1024, 2048]
FIXED_WIDTH, FIXED_BATCH = 256, 128
DENSE_MAX_PARAMS = 5000
STEP_BUDGET_S = 5.0
RIEMOD = dict(learning_rate=0.1, mass=0.1, output_metric="sampled_softmax_fisher:1")


def _step_fn(method: str, graphdef, space: str | None = None):
  if method == "adam":
    tx = optax.adam(1e-3)

    def step(params, opt_state, x, y, key):
      loss, grads = jax.value_and_grad(
          lambda p: mlp.cross_entropy(nnx.merge(graphdef, p)(x), y))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    return tx, step
  tx = riemod.layerwise_natural_gradient(RIEMOD["learning_rate"], RIEMOD["mass"], space=space,
                                         on_nonfinite="ignore")
  metric = riemod.metrics.sampled_softmax_fisher(1)

  def step(params, opt_state, x, y, key):
    model = nnx.merge(graphdef, params)
    loss, grads, curvature = riemod.value_grad_and_curvature(
        model, x, lambda out: mlp.cross_entropy(out, y), metric, key=key)
    updates, opt_state = tx.update(grads, opt_state, params, curvature=curvature, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss
  return tx, step


def measure(batch: int, width: int, methods, rounds: int, burst: int) -> list[dict]:
  model = mlp.build_model([64, width, width, 10], ["tanh", "tanh", None], 0)
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(batch + width)
  x = jnp.asarray(rng.normal(size=(batch, 64)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 10, size=batch).astype(np.int32))
  key = jax.random.key(0)
  largest = max(64 * width + width, width * width + width)
  entries, runners = [], []
  for method in methods:
    entry = {"method": method, "batch": batch, "width": width,
             "largest_layer_params": largest, "K_bytes": batch * largest * 4}
    if method == "dense" and largest > DENSE_MAX_PARAMS:
      entry["skipped"] = (f"largest layer has {largest} > {DENSE_MAX_PARAMS} parameters: an "
                          f"{largest}x{largest} Cholesky per step is over the time budget")
      entries.append(entry)
      continue
    tx, step = _step_fn("adam" if method == "adam" else "riemod", graphdef,
                        {"riemod": "sample", "dense": "parameter"}.get(method))
    opt_state = tx.init(params)
    jitted = jax.jit(step)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, opt_state, x, y, key).compile()
    entry["compile_seconds"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
      entry["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0))
      entry["argument_bytes"] = int(getattr(mem, "argument_size_in_bytes", 0))
      entry["output_bytes"] = int(getattr(mem, "output_size_in_bytes", 0))
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, opt_state, x, y, key))
    if time.perf_counter() - t0 > STEP_BUDGET_S:
      entry["skipped"] = f"one step took more than {STEP_BUDGET_S} s"
      entries.append(entry)
      continue
    entries.append(entry)
    runners.append((entry, compiled, [params, opt_state]))
  times = {id(e): [] for e, _, _ in runners}
  for r in range(rounds):
    for entry, compiled, state in runners[r % max(len(runners), 1):] + runners[:r % max(
        len(runners), 1)]:
      for _ in range(burst):
        t = time.perf_counter()
        p, o, loss = compiled(state[0], state[1], x, y, key)
        jax.block_until_ready((p, o, loss))
        times[id(entry)].append(time.perf_counter() - t)
  for entry, _, _ in runners:
    entry["median_step_seconds"] = statistics.median(times[id(entry)])
  adam = next((e for e in entries if e["method"] == "adam" and "median_step_seconds" in e), None)
  for e in entries:
    if adam and "median_step_seconds" in e:
      e["ratio_to_adam"] = e["median_step_seconds"] / adam["median_step_seconds"]
  return entries


def run(out: Path, quick: bool = False) -> dict:
  started = time.perf_counter()
  machine = harness.machine_info()
  batches = [32, 256] if quick else BATCHES
  widths = [1024] if quick else WIDTHS
  rounds, burst = (2, 3) if quick else (3, 5)
  methods = ["adam", "riemod", "dense"]
  entries = []
  configs = [(b, FIXED_WIDTH) for b in batches] + [(FIXED_BATCH, w) for w in widths
                                                  if (FIXED_BATCH, w) != (FIXED_BATCH, FIXED_WIDTH)
                                                  or FIXED_BATCH not in batches]
  for b, w in configs:
    entries += measure(b, w, methods, rounds, burst)
    print(f"[{time.strftime('%H:%M:%S')}] scaling batch {b} width {w}: " + ", ".join(
        f"{e['method']} {e.get('median_step_seconds', float('nan')) * 1e3:.2f} ms "
        f"temp {e.get('temp_bytes', 0) / 2**20:.1f} MiB" for e in entries[-3:]), flush=True)
  payload = {"task": NAME, "entries": entries, "machine": machine,
             "loadavg_end": list(__import__("os").getloadavg()),
             "wall_seconds": time.perf_counter() - started, "riemod": RIEMOD,
             "dense_max_params": DENSE_MAX_PARAMS}
  out.mkdir(parents=True, exist_ok=True)
  harness.write_json(out / f"{NAME}.json", payload)
  write_markdown(out, payload)
  plot(out, payload)
  return payload


def write_markdown(out: Path, payload: dict) -> None:
  entries = payload["entries"]
  header = ["batch", "width", "method", "step ms", "ratio to adam", "temp MiB", "K of largest layer MiB",
            "note"]
  rows = [[e["batch"], e["width"], e["method"],
           1e3 * e["median_step_seconds"] if "median_step_seconds" in e else None,
           e.get("ratio_to_adam"), e["temp_bytes"] / 2**20 if "temp_bytes" in e else None,
           e["K_bytes"] / 2**20, e.get("skipped", "")] for e in entries]
  m = payload["machine"]
  text = ["# scaling", "",
          "One training step of MLP 64-W-W-10 (tanh, cross-entropy). riemod: layerwise, "
          f"`{payload['riemod']}`, sample-space Woodbury; dense: the same metric in parameter "
          "space. Step times: medians of interleaved bursts after compilation. temp: XLA scratch "
          "bytes of the compiled step (`memory_analysis().temp_size_in_bytes`).", "",
          harness.markdown_table(header, rows), "",
          f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, backend {m['backend']}, load "
          f"{m['loadavg']} -> {payload['loadavg_end']}, BLAS env {m['blas_env']}.", ""]
  (out / f"{NAME}.md").write_text("\n".join(text))


def plot(out: Path, payload: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  entries = payload["entries"]
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  for col, (key, fixed_key, fixed) in enumerate((("batch", "width", FIXED_WIDTH),
                                                 ("width", "batch", FIXED_BATCH))):
    for i, method in enumerate(("adam", "riemod", "dense")):
      sel = sorted((e for e in entries if e["method"] == method and e[fixed_key] == fixed
                    and "median_step_seconds" in e), key=lambda e: e[key])
      if not sel:
        continue
      xs = [e[key] for e in sel]
      axes[0, col].plot(xs, [1e3 * e["median_step_seconds"] for e in sel], "o-", color=f"C{i}",
                        label=method)
      axes[1, col].plot(xs, [e.get("temp_bytes", np.nan) / 2**20 for e in sel], "o-",
                        color=f"C{i}", label=method)
    sel = sorted((e for e in entries if e["method"] == "riemod" and e[fixed_key] == fixed),
                 key=lambda e: e[key])
    axes[1, col].plot([e[key] for e in sel], [e["K_bytes"] / 2**20 for e in sel], "k--",
                      label="size of K (largest layer)")
    for row, label in ((0, "step ms"), (1, "temp MiB")):
      ax = axes[row, col]
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel(f"{key} ({fixed_key} = {fixed})")
      ax.set_ylabel(label)
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / f"{NAME}.png", dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS)
  args = parser.parse_args(argv)
  run(args.out, args.quick)


if __name__ == "__main__":
  main()

"""``riemod demo``: the digits MLP trained with riemod beside optax Adam, then certified.

Both optimizers see the same initialisation and the same batches; their steps are interleaved so that
the step-time comparison is fair on a busy machine. Prints a comparison table, saves a loss-versus-time
plot and the raw numbers to ``--out``, and prints riemod's stability certificate for the trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from typing import Any, Callable

import numpy as np

# The demo's riemod settings (one place to change them): a one-probe sampled softmax Fisher
# (d = B rows per module, so each step factors three 128 x 128 capacitances) with SPRING momentum.
DEMO_RIEMOD = dict(learning_rate=0.1, mass=0.1, momentum=0.8, curvature_batch=None,
                   metric=("sampled_softmax_fisher", 1))
DEMO_ADAM = dict(learning_rate=1e-2)
LOSS_THRESHOLD = 0.05


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser("demo", help="train the digits MLP with riemod and Adam, certify it")
  parser.add_argument("--steps", type=int, default=300, help="training steps per optimizer")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="riemod-demo-output", help="folder for the plot and JSON")
  parser.add_argument("--no-certificate", action="store_true", help="skip the certificate")
  parser.set_defaults(func=run)


def build_model(seed: int):
  """The demo network: MLP 64-128-128-10 with tanh, as riemod modules."""
  import jax.numpy as jnp
  from flax import nnx

  import riemod

  rngs = nnx.Rngs(seed)
  return riemod.nn.Sequential(
      riemod.nn.Dense(64, 128, rngs=rngs), jnp.tanh,
      riemod.nn.Dense(128, 128, rngs=rngs), jnp.tanh,
      riemod.nn.Dense(128, 10, rngs=rngs))


def cross_entropy(labels):
  import optax

  return lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _trainer(model, tx, use_curvature: bool, settings: dict[str, Any]) -> tuple[Callable, Any]:
  """A jitted functional step ``(params, state, x, y, key) -> (params, state, loss)``."""
  import jax
  import optax
  from flax import nnx

  import riemod

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if use_curvature:
    name, *metric_args = settings["metric"]
    metric = getattr(riemod.metrics, name)(*metric_args)

  @jax.jit
  def step(params, state, x, y, key):
    net = nnx.merge(graphdef, params, rest)
    if use_curvature:
      loss, grads, curvature = riemod.value_grad_and_curvature(
          net, x, cross_entropy(y), metric, key=key,
          curvature_batch=settings.get("curvature_batch"))
      updates, state = tx.update(grads, state, params, curvature=curvature, value=loss)
    else:
      loss, grads = jax.value_and_grad(
          lambda p: cross_entropy(y)(nnx.merge(graphdef, p, rest)(x)))(params)
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step, (graphdef, params, rest)


def run(args) -> int:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import riemod
  from riemod.data import load_digits

  data = load_digits(seed=args.seed)
  x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
  runs = {
      "riemod": (riemod.layerwise_natural_gradient(
          DEMO_RIEMOD["learning_rate"], mass=DEMO_RIEMOD["mass"],
          momentum=DEMO_RIEMOD["momentum"]), True),
      "adam": (optax.adam(DEMO_ADAM["learning_rate"]), False),
  }
  trainers = {}
  for name, (tx, use_curvature) in runs.items():
    step, (graphdef, params, rest) = _trainer(build_model(args.seed), tx, use_curvature,
                                              DEMO_RIEMOD)
    trainers[name] = dict(step=step, params=params, state=tx.init(params), graphdef=graphdef,
                          rest=rest, times=[], curve=[], hit=None)

  def full_loss(t):
    logits = nnx.merge(t["graphdef"], t["params"], t["rest"])(x_train)
    return float(cross_entropy(y_train)(logits))

  rng = np.random.default_rng(args.seed)
  key = jax.random.key(args.seed)
  batches = []
  order: list[int] = []
  for _ in range(args.steps):
    if len(order) < args.batch:
      order = list(rng.permutation(len(x_train)))
    batches.append(np.asarray(order[:args.batch]))
    order = order[args.batch:]

  # Compile both before timing.
  for t in trainers.values():
    jax.block_until_ready(t["step"](t["params"], t["state"], x_train[batches[0]],
                                    y_train[batches[0]], key))
  progress = _progress(args.steps)
  for i, idx in enumerate(batches):
    xb, yb, k = x_train[idx], y_train[idx], jax.random.fold_in(key, i)
    for name, t in trainers.items():  # interleaved: the same machine state for both
      start = time.perf_counter()
      t["params"], t["state"], loss = t["step"](t["params"], t["state"], xb, yb, k)
      jax.block_until_ready(loss)
      t["times"].append(time.perf_counter() - start)
      if i % 10 == 9 or i == args.steps - 1:
        value = full_loss(t)
        t["curve"].append((float(np.sum(t["times"])), i + 1, value))
        if t["hit"] is None and value < LOSS_THRESHOLD:
          t["hit"] = i + 1
    progress.update(1)
    progress.set_postfix({n: f"{t['curve'][-1][2]:.3f}" for n, t in trainers.items()
                          if t["curve"]})
  progress.close()

  rows = []
  for name, t in trainers.items():
    logits = nnx.merge(t["graphdef"], t["params"], t["rest"])(x_test)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
    rows.append(dict(optimizer=name, final_train_loss=t["curve"][-1][2], test_accuracy=accuracy,
                     wall_seconds=float(np.sum(t["times"])),
                     median_step_ms=1e3 * float(np.median(t["times"])),
                     steps_to_threshold=t["hit"]))
  print(_table(rows))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = dict(settings=dict(riemod=DEMO_RIEMOD, adam=DEMO_ADAM, steps=args.steps,
                               batch=args.batch, seed=args.seed), results=rows,
                 curves={n: t["curve"] for n, t in trainers.items()})
  (out / "results.json").write_text(json.dumps(results, indent=2))
  plot = _plot(trainers, out / "loss_vs_time.png")
  print(f"\nSaved {out / 'results.json'}" + (f" and {plot}" if plot else ""))

  if not args.no_certificate:
    _print_certificate(trainers["riemod"], x_train[batches[-1]], y_train[batches[-1]],
                       len(x_train))
  return 0


def _progress(total: int):
  try:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="step", disable=None)
  except ImportError:  # pragma: no cover - tqdm is in the demo extra
    class _Silent:
      def update(self, n): ...
      def set_postfix(self, d): ...
      def close(self): ...
    return _Silent()


def _table(rows: list[dict]) -> str:
  header = ["optimizer", "train loss", "test acc", "wall s", "median step ms",
            f"steps to loss<{LOSS_THRESHOLD}"]
  lines = [" | ".join(header), " | ".join("-" * len(h) for h in header)]
  for r in rows:
    lines.append(" | ".join([
        r["optimizer"], f"{r['final_train_loss']:.4f}", f"{r['test_accuracy']:.3f}",
        f"{r['wall_seconds']:.2f}", f"{r['median_step_ms']:.2f}",
        str(r["steps_to_threshold"]) if r["steps_to_threshold"] else "not reached"]))
  return "\n".join(lines)


def _plot(trainers: dict, path: pathlib.Path) -> pathlib.Path | None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover - matplotlib is in the demo extra
    return None
  fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for name, t in trainers.items():
    curve = np.asarray(t["curve"])
    by_step.semilogy(curve[:, 1], curve[:, 2], label=name)
    by_time.semilogy(curve[:, 0], curve[:, 2], label=name)
  for ax in (by_step, by_time):
    ax.axhline(LOSS_THRESHOLD, color="gray", ls=":", lw=1)
    ax.legend()
  by_step.set_xlabel("step")
  by_step.set_ylabel("full training loss")
  by_time.set_xlabel("wall time (s, compiled steps only)")
  fig.suptitle("digits MLP 64-128-128-10: riemod vs Adam, same batches")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _print_certificate(trainer: dict, x, y, dataset_size: int) -> None:
  from flax import nnx

  import riemod

  certify = getattr(getattr(riemod, "certify", None), "certify", None) or getattr(
      riemod, "certify", None)
  if not callable(certify):
    print("\n(riemod.certify is not available in this build: no certificate.)")
    return
  model = nnx.merge(trainer["graphdef"], trainer["params"], trainer["rest"])
  report = certify(model, x, cross_entropy(y), riemod.metrics.softmax_fisher(),
                   learning_rate=DEMO_RIEMOD["learning_rate"], opt_state=trainer["state"],
                   mass=DEMO_RIEMOD["mass"], dataset_size=dataset_size)
  print("\nCertificate of the trained model (one batch):")
  print(report.table())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="riemod-demo")
  add_parser(parser.add_subparsers(dest="command", required=True))
  return run(parser.parse_args(["demo"] + list(argv or [])))


if __name__ == "__main__":
  os.sys.exit(main())

"""``riemod certify``: train the digits MLP and certify its steps; write a table and a plot.

Example:
  riemod certify --steps 20 --every 10 --out runs/certify
  riemod certify --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
  parser = subparsers.add_parser(
      "certify", help="certify natural-gradient training of the digits MLP",
      description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
  parser.add_argument("--every", type=int, default=10, help="certify every N steps (default 10)")
  parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
  parser.add_argument("--learning-rate", type=float, default=0.1)
  parser.add_argument("--mass", type=float, default=1e-2)
  parser.add_argument("--lanczos", type=int, default=20, help="Lanczos steps (default 20)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object (the final certificate and the history)")
  parser.add_argument("--out", default="riemod-certify",
                      help="folder for certificate.md, certificate.json and certificate.png")
  parser.set_defaults(func=run)
  return parser


def _demo_model(seed: int):
  import jax.numpy as jnp
  from flax import nnx

  import riemod

  rngs = nnx.Rngs(seed)
  return riemod.nn.Sequential(riemod.nn.Dense(64, 128, rngs=rngs), jnp.tanh,
                              riemod.nn.Dense(128, 128, rngs=rngs), jnp.tanh,
                              riemod.nn.Dense(128, 10, rngs=rngs))


def _plot(history: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps = [h["step"] for h in history]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  ax = axes[0]
  ax.semilogy(steps, [h["contraction_factor"] for h in history], "o-", label="whole network")
  ax.semilogy(steps, [h["composed_rate"] for h in history], "s--", label="composed rho(N)")
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_title("contraction factor max|1 - lr lam|")
  ax.set_xlabel("step")
  ax.legend()
  ax = axes[1]
  ax.semilogy(steps, [h["max_stable_learning_rate"] for h in history], "o-",
              label="2 / lam_max")
  ax.axhline(history[0]["learning_rate"], color="r", lw=0.8, label="learning rate")
  ax.set_title("largest stable learning rate")
  ax.set_xlabel("step")
  ax.legend()
  ax = axes[2]
  gaps = [(h["step"], h["action_gap"]) for h in history if h["action_gap"] is not None]
  if gaps:
    ax.plot(*zip(*gaps), "o-", label="action gap")
  ax.plot(steps, [h["loss"] for h in history], "s--", label="loss")
  ax.set_title("action gap S - (l0 - lT) and loss")
  ax.set_xlabel("step")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import riemod
  from riemod.certify import certify
  from riemod.data import load_digits

  if args.steps < 1 or args.every < 1 or args.batch < 1:
    print("riemod certify: --steps, --every and --batch must be >= 1.", file=sys.stderr)
    return 2
  data = load_digits()
  x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  batch = min(args.batch, x_all.shape[0])
  model = _demo_model(args.seed)
  metric = riemod.metrics.softmax_fisher()
  tx = riemod.layerwise_natural_gradient(args.learning_rate, mass=args.mass)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # The certificate batch is fixed, so its loss function (and the compiled certificate) is reused.
  x_cert, y_cert = x_all[:batch], y_all[:batch]
  cert_loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y_cert).mean()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss_fn = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads, curvature = riemod.value_grad_and_curvature(model, x, loss_fn, metric)
    optimizer.update(model, grads, curvature=curvature, value=loss)
    return loss

  history, report = [], None
  key = jax.random.key(args.seed)
  start = time.time()
  for step in range(args.steps + 1):
    if step % args.every == 0 or step == args.steps:
      report = certify(model, x_cert, cert_loss, metric, learning_rate=args.learning_rate,
                       opt_state=optimizer.opt_state, mass=args.mass, num_lanczos=args.lanczos,
                       dataset_size=int(x_all.shape[0]), key=jax.random.fold_in(key, step))
      d = report.to_dict()
      history.append({"step": step, "learning_rate": args.learning_rate,
                      "loss": d["settings"]["loss"],
                      "contraction_factor": d["contraction_factor"],
                      "composed_rate": d["composition"]["composed_rate"],
                      "max_stable_learning_rate": d["max_stable_learning_rate"],
                      "action_gap": d["action_gap"], "stability_bound": d["stability_bound"],
                      "verdict": d["verdict"]})
      if not args.json:
        print(f"step {step:4d}  loss {history[-1]['loss']:.4f}  {report.verdict}", flush=True)
    if step == args.steps:
      break
    idx = jax.random.choice(jax.random.fold_in(key, 10_000 + step), x_all.shape[0], (batch,),
                            replace=False)
    train_step(model, optimizer, x_all[idx], y_all[idx])

  os.makedirs(args.out, exist_ok=True)
  table = report.table()
  lines = ["# riemod certificate of the digits MLP", "", "```", table, "```", "",
           "| step | loss | contraction factor | composed rho(N) | 2/lam_max | action gap | "
           "stability bound | verdict |", "|---|---|---|---|---|---|---|---|"]
  fmt = lambda v: "-" if v is None else f"{v:.4g}"
  for h in history:
    lines.append(f"| {h['step']} | {fmt(h['loss'])} | {fmt(h['contraction_factor'])} | "
                 f"{fmt(h['composed_rate'])} | {fmt(h['max_stable_learning_rate'])} | "
                 f"{fmt(h['action_gap'])} | {fmt(h['stability_bound'])} | {h['verdict']} |")
  with open(os.path.join(args.out, "certificate.md"), "w") as handle:
    handle.write("\n".join(lines) + "\n")
  final = report.to_dict()
  final["history"] = history
  final["wall_seconds"] = time.time() - start
  with open(os.path.join(args.out, "certificate.json"), "w") as handle:
    json.dump(final, handle, indent=1)
  _plot(history, os.path.join(args.out, "certificate.png"))
  if args.json:
    print(json.dumps(final))
  else:
    print(table)
    print(f"wrote {args.out}/certificate.md, certificate.json, certificate.png")
  return 0

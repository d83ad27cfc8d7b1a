"""riemod certify: train the digits MLP and certify its steps; write a table, JSON and a plot.

Every --every steps the run is certified on a fixed batch: the spectrum of G^-1 H (full Hessian)
and of G^-1 H_GN (its Gauss-Newton part), a verdict that keeps the step-size condition, negative
curvature and contraction apart, Lipschitz constants, the action gap and the stability bound. At the
end the same run is repeated on the training set with one sample replaced, and the distance of the
two runs is printed beside the bound.

Example:
  riemod certify --steps 20 --every 10 --out runs/certify
  riemod certify --learning-rate 1.0     (ten times too large: the verdict says unstable)
  riemod certify --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
  parser = subparsers.add_parser(
      "certify", help="certify natural-gradient training of the digits MLP",
      description=__doc__.split("\n\nExample:")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=20, help="training steps")
  parser.add_argument("--every", type=int, default=10, help="certify every N steps")
  parser.add_argument("--batch", type=int, default=128, help="batch size")
  parser.add_argument("--learning-rate", type=float, default=0.1, help="step size")
  parser.add_argument("--mass", type=float, default=1e-2, help="default mass of the metric")
  parser.add_argument("--lanczos", type=int, default=20, help="Lanczos steps per spectrum")
  parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
  parser.add_argument("--replace", type=int, default=0,
                      help="training sample replaced (by a held-out one) for the measured "
                           "stability figure")
  parser.add_argument("--no-stability-run", action="store_true",
                      help="skip the second run that measures stability")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object (the final certificate and the history)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--out", default=os.path.join("riemod-output", "certify"),
                      help="folder for certificate.md, certificate.json and certificate.png "
                           "(created if missing)")
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
  ax.semilogy(steps, [h["edge_ratio"] for h in history], "o-", label="full Hessian")
  gn = [(h["step"], h["gauss_newton_edge_ratio"]) for h in history
        if h["gauss_newton_edge_ratio"]]
  if gn:
    ax.semilogy(*zip(*gn), "s--", label="Gauss-Newton model")
  ax.axhline(1.0, color="k", lw=0.8, label="edge of stability")
  ax.set_title("step size against the edge: lr lam_max / 2")
  ax.set_xlabel("step")
  ax.legend()
  ax = axes[1]
  ax.plot(steps, [h["lam_min"] for h in history], "o-", label="lam_min (descent if < 0)")
  ax.plot(steps, [h["lam_max"] for h in history], "s-", label="lam_max")
  ax.axhline(0.0, color="k", lw=0.8)
  ax.set_title("spectrum of G^-1 H")
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


@contextlib.contextmanager
def _ticking(bar, interval: float = 0.5):
  """Refreshes the bar (its elapsed time) while a long call blocks, e.g. a first compile."""
  stop = threading.Event()

  def tick():
    while not stop.wait(interval):
      bar.refresh()

  thread = threading.Thread(target=tick, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()


def _gauss_newton_fn(graphdef, rest, loss_fn, output_metric, geometry, num_lanczos: int):
  """A jitted ``(params, x, geometry_state, key) -> LanczosResult`` of ``G^-1 H_GN`` at the
  certificate batch, with the optimizer's own ``G`` (its geometry and geometry state)."""
  import jax
  from flax import nnx
  from jax.flatten_util import ravel_pytree

  import riemod
  from riemod.certify.contraction import gauss_newton_spectrum

  @jax.jit
  def spectrum(params, x, geometry_state, key):
    model = nnx.merge(graphdef, params, rest)
    _, _, curvature = riemod.value_grad_and_curvature(model, x, loss_fn, output_metric)
    metric = geometry.compose(curvature, geometry_state)
    flat, unravel = ravel_pytree(params)
    ravel = lambda tree: ravel_pytree(tree)[0]
    start = jax.random.normal(key, flat.shape, flat.dtype)
    return gauss_newton_spectrum(
        lambda f: nnx.merge(graphdef, unravel(f), rest)(x), flat, loss_fn,
        lambda v: ravel(metric.solve(unravel(v))), lambda v: ravel(metric.matvec(unravel(v))),
        start, num_lanczos)

  return spectrum


def run(args: argparse.Namespace) -> int:
  """``riemod certify``: trains the digits MLP, certifies it every ``--every`` steps (with the
  Gauss-Newton spectrum), measures the stability figure, prints and saves the reports; returns
  1 if the run diverged."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from tqdm.auto import tqdm

  import riemod
  from riemod.certify.bound import measured_stability
  from riemod.data import load_digits

  if args.steps < 1 or args.every < 1 or args.batch < 1:
    print("riemod certify: --steps, --every and --batch must be >= 1.", file=sys.stderr)
    return 2
  data = load_digits()
  x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
  n = int(x_all.shape[0])
  if not 0 <= args.replace < n:
    print(f"riemod certify: --replace must be in [0, {n}).", file=sys.stderr)
    return 2
  batch = min(args.batch, n)
  model = _demo_model(args.seed)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  metric = riemod.metrics.softmax_fisher()
  geometry = riemod.Geometry(mass=args.mass)
  tx = riemod.layerwise_natural_gradient(args.learning_rate, geometry=geometry)
  opt_state = tx.init(params)
  start_params, start_state = params, opt_state
  # The certificate batch is fixed, so its loss function (and the compiled certificate) is reused.
  x_cert, y_cert = x_all[:batch], y_all[:batch]
  cert_loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y_cert).mean()
  gauss_newton = _gauss_newton_fn(graphdef, rest, cert_loss, metric, geometry, args.lanczos)

  @jax.jit
  def train_step(params, opt_state, batch_data):
    x, y = batch_data
    loss_fn = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads, curvature = riemod.value_grad_and_curvature(
        nnx.merge(graphdef, params, rest), x, loss_fn, metric)
    updates, opt_state = tx.update(grads, opt_state, params, curvature=curvature, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.key(args.seed)
  batches = np.stack([np.asarray(jax.random.choice(jax.random.fold_in(key, 10_000 + step), n,
                                                   (batch,), replace=False))
                      for step in range(args.steps)])
  cert_steps = sorted({s for s in range(0, args.steps + 1, args.every)} | {args.steps})
  bar = tqdm(total=args.steps + len(cert_steps), unit="phase", disable=args.no_progress or None,
             desc="starting")
  say = bar.write if not args.json else (lambda line: None)
  history, report, diverged = [], None, None
  start = time.time()
  for step in range(args.steps + 1):
    if step in cert_steps:
      first = not history
      bar.set_description(f"certificate at step {step}" + (
          " (first compile, about 60 s on a CPU host)" if first else ""))
      key_step = jax.random.fold_in(key, step)
      try:
        with _ticking(bar):
          report = riemod.certify.certify(
              nnx.merge(graphdef, params, rest), x_cert, cert_loss, metric,
              learning_rate=args.learning_rate, geometry=geometry, opt_state=opt_state,
              num_lanczos=args.lanczos, dataset_size=n, key=key_step)
          geometry_state = riemod.find_state(opt_state, riemod.MetricState).geometry
          report = report.with_gauss_newton(jax.device_get(gauss_newton(
              params, x_cert, geometry_state, jax.random.fold_in(key_step, 1))))
      except FloatingPointError as error:
        diverged = f"unstable: the run produced NaN or inf by step {step} ({error})"
        say(f"step {step:4d}  {diverged}")
        bar.update(1)
        break
      detail = report.verdict_detail
      d = report.to_dict()
      history.append({"step": step, "learning_rate": args.learning_rate,
                      "loss": d["settings"]["loss"],
                      "lam_min": d["network"]["lam_min"], "lam_max": d["network"]["lam_max"],
                      "edge_ratio": detail.edge_ratio,
                      "gauss_newton_edge_ratio": detail.gauss_newton_edge_ratio,
                      "contraction_factor": d["contraction_factor"],
                      "composed_rate": d["composition"]["composed_rate"],
                      "max_stable_learning_rate": d["max_stable_learning_rate"],
                      "action_gap": d["action_gap"], "stability_bound": d["stability_bound"],
                      "status": detail.status, "verdict": d["verdict"]})
      say(f"step {step:4d}  loss {history[-1]['loss']:.4f}  {report.verdict}")
      bar.update(1)
    if step == args.steps:
      break
    bar.set_description(f"training step {step + 1}/{args.steps}")
    idx = jnp.asarray(batches[step])
    with _ticking(bar):
      params, opt_state, _ = train_step(params, opt_state, (x_all[idx], y_all[idx]))
    bar.update(1)
  bar.close()

  measured = None
  if report is not None and diverged is None and not args.no_stability_run:
    per_sample = lambda p, d: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p, rest)(d[0]), d[1])
    try:
      measured = measured_stability(
          train_step, start_params, start_state, (x_all, y_all), args.replace,
          num_steps=args.steps, batch_indices=batches,
          replacement=(jnp.asarray(data.x_test[0]), jnp.asarray(data.y_test[0])),
          sample_loss=per_sample,
          progress=not (args.no_progress or args.json) and sys.stderr.isatty())
      report = report.with_measured_stability(measured)
    except FloatingPointError as error:
      say(f"stability run: {error}")

  os.makedirs(args.out, exist_ok=True)
  final = report.to_dict() if report is not None else {"verdict": diverged}
  if diverged is not None:
    final["verdict"] = diverged
  final["history"] = history
  final["wall_seconds"] = time.time() - start
  fmt = lambda v: "-" if v is None else f"{v:.4g}"
  lines = ["# riemod certificate of the digits MLP", ""]
  if report is not None:
    lines += ["```", report.table(), "```", ""]
  if diverged is not None:
    lines += [f"**{diverged}**", ""]
  lines += ["| step | loss | lr lam_max/2 (full) | lr lam_max/2 (Gauss-Newton) | lam_min | "
            "action gap | stability bound | verdict |", "|---|---|---|---|---|---|---|---|"]
  for h in history:
    lines.append(f"| {h['step']} | {fmt(h['loss'])} | {fmt(h['edge_ratio'])} | "
                 f"{fmt(h['gauss_newton_edge_ratio'])} | {fmt(h['lam_min'])} | "
                 f"{fmt(h['action_gap'])} | {fmt(h['stability_bound'])} | {h['verdict']} |")
  if measured is not None:
    lines += ["", f"Measured stability (sample {measured.index} replaced by a held-out one, "
                  f"{measured.num_steps} steps, same batches): ||w - w'|| = "
                  f"{fmt(measured.parameter_distance)}, max_z |l(w, z) - l(w', z)| = "
                  f"{fmt(measured.loss_difference)}; the bound says "
                  f"{fmt(report.stability_bound)}."]
  with open(os.path.join(args.out, "certificate.md"), "w") as handle:
    handle.write("\n".join(lines) + "\n")
  with open(os.path.join(args.out, "certificate.json"), "w") as handle:
    json.dump(final, handle, indent=1)
  if history:
    _plot(history, os.path.join(args.out, "certificate.png"))
  if args.json:
    print(json.dumps(final))
  else:
    if report is not None:
      print(report.table())
    if measured is not None:
      print(f"stability: bound {fmt(report.stability_bound)} against measured max_z |l(w, z) - "
            f"l(w', z)| = {fmt(measured.loss_difference)} (||w - w'|| = "
            f"{fmt(measured.parameter_distance)})")
    if diverged is not None:
      print(diverged)
    print(f"wrote {args.out}/certificate.md, certificate.json"
          + (", certificate.png" if history else ""))
  return 1 if diverged is not None else 0

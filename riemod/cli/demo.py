"""``riemod demo``: where riemod stands against optax Adam, in two panels, then a certificate.

1. **Digits**: the MLP 64-128-128-10 on scikit-learn's digits, riemod at its defaults
   (:func:`riemod.certify.certified_layerwise_natural_gradient`, with a one-probe sampled Fisher:
   no learning rate, the certified step-size controller sets it to half the edge of stability
   ``2 / lam_max(G^{-1} H_GN)``, re-measured every 30 steps) beside Adam, same
   initialisation and batches, steps interleaved; the demo prints the certified step size the run
   ended with.
2. **PINN**: the energy natural gradient paper's Poisson problem (2-32-1 tanh, 784 + 116 collocation
   points, float64; :mod:`riemod.cli._pinn`), riemod's least-squares recipe
   (:func:`riemod.certify.certified_gauss_newton`: the Gauss-Newton step at the cut-off the
   precision check accepts, the certified rate, the paper's grid line search, Levenberg-Marquardt
   mass adaptation; nothing to tune) beside Adam on the same budget: Adam runs ``PINN_ADAM_STEPS_PER_STEP`` of its (much
   cheaper) steps per riemod step, interleaved, so it gets at least riemod's step time on this
   machine; absolute L2 error against step time, one plot and one table.

Every error and loss the demo prints is reproducible (fixed seeds, full-batch or seeded batches,
deterministic CPU arithmetic); times are step times of compiled steps (compilation is timed and shown
separately). Writes ``results.json`` and the plots to ``--out`` and prints riemod's stability
certificate of the trained digits model.
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
# (d = B rows per module, so each step factors three 128 x 128 capacitances) and otherwise
# riemod's defaults, riemod.certify.certified_layerwise_natural_gradient(): no learning rate, mass
# or momentum to choose (the Kronecker mass, SPRING momentum 0.8, the controller keeping the rate
# at half the edge of stability).
DEMO_RIEMOD = dict(optimizer="riemod.certify.certified_layerwise_natural_gradient()",
                   curvature_batch=None, metric=("sampled_softmax_fisher", 1))
DEMO_ADAM = dict(learning_rate=1e-2)
LOSS_THRESHOLD = 0.05
# The PINN panel: riemod.certify.certified_gauss_newton at its defaults (no learning rate, mass or
# cut-off to choose; benchmarks/task_tuning_free.py compares it with the tuned ENGD setting).
PINN_RIEMOD = dict(recipe="riemod.certify.certified_gauss_newton()")
PINN_ADAM = dict(learning_rate=1e-3)
PINN_ADAM_STEPS_PER_STEP = 20
PINN_EVAL_EVERY = 10  # riemod steps between error evaluations (not timed)
PANELS = ("digits", "pinn")


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "demo", help="riemod vs Adam on digits and on a PINN, then a certificate",
      description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=300, help="digits training steps per optimizer")
  parser.add_argument("--batch", type=int, default=128, help="digits batch size")
  parser.add_argument("--pinn-steps", type=int, default=200,
                      help=f"riemod iterations on the PINN (Adam: {PINN_ADAM_STEPS_PER_STEP}x as many)")
  parser.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
  parser.add_argument("--panels", nargs="+", choices=PANELS, default=list(PANELS),
                      help="which comparisons to run")
  parser.add_argument("--out", default=os.path.join("riemod-output", "demo"),
                      help="folder for the plots and results.json (created if missing)")
  parser.add_argument("--no-certificate", action="store_true",
                      help="skip the certificate of the trained digits model")
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
      updates, state = tx.update(grads, state, params, curvature=curvature, value=loss,
                                 apply_fn=lambda p: nnx.merge(graphdef, p, rest)(x),
                                 loss_fn=cross_entropy(y))
    else:
      loss, grads = jax.value_and_grad(
          lambda p: cross_entropy(y)(nnx.merge(graphdef, p, rest)(x)))(params)
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step, (graphdef, params, rest)


def run(args) -> int:
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results: dict[str, Any] = {}
  saved: list[pathlib.Path] = []
  digits = None
  if "digits" in args.panels:
    digits = _run_digits(args, results, saved, out)
  if "pinn" in args.panels:
    _run_pinn(args, results, saved, out)
  (out / "results.json").write_text(json.dumps(results, indent=2))
  print(f"\nSaved {out / 'results.json'}" + "".join(f", {p}" for p in saved))
  if digits is not None and not args.no_certificate:
    _print_certificate(*digits)
  return 0


def _run_digits(args, results: dict, saved: list, out: pathlib.Path):
  """The digits panel; returns what the certificate needs."""
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
      "riemod": (riemod.certify.certified_layerwise_natural_gradient(),
                 True),
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

  # Compile both before timing (a throw-away step each; its result is discarded).
  compile_s = _compile(
      "digits: compiling the riemod and Adam steps",
      {n: (lambda t=t: t["step"](t["params"], t["state"], x_train[batches[0]],
                                y_train[batches[0]], key)) for n, t in trainers.items()})
  progress = _progress(args.steps, "digits: training riemod and Adam (interleaved)")
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
                     compile_seconds=compile_s[name], steps_to_threshold=t["hit"]))
  print("\nDigits MLP 64-128-128-10, batch "
        f"{args.batch}, {args.steps} steps each, same batches (float32):")
  print(_table(rows))
  print(TIMES_NOTE)
  certified = _certified_step(trainers["riemod"]["state"])
  print(f"riemod's certified step size at the end: lr = {certified['learning_rate']:.4g} "
        "= 0.5 x 2/lam_max, lam_max(G^-1 H_GN) = "
        f"{certified['edge_lam']:.4g} (the sharpest recent estimate; the latest "
        f"{certified['lam_max']:.4g}; {certified['estimates']} estimates in {args.steps} steps; "
        "no learning rate was given)")
  results.update(settings=dict(riemod=DEMO_RIEMOD, adam=DEMO_ADAM, steps=args.steps,
                               batch=args.batch, seed=args.seed), results=rows,
                 certified_step=certified,
                 curves={n: t["curve"] for n, t in trainers.items()})
  plot = _plot(trainers, out / "loss_vs_time.png")
  if plot:
    saved.append(plot)
  return trainers["riemod"], x_train[batches[-1]], y_train[batches[-1]], len(x_train)


def _run_pinn(args, results: dict, saved: list, out: pathlib.Path) -> None:
  """The PINN panel: riemod's certified Gauss-Newton step vs Adam, error against step time
  (float64)."""
  import jax
  import optax

  import riemod
  from riemod.cli import _pinn

  with jax.enable_x64(True):
    prob = _pinn.problem()
    params0 = _pinn.init_params(args.seed)
    riemod_tx = riemod.certify.certified_gauss_newton()
    adam_tx = optax.adam(PINN_ADAM["learning_rate"])
    trainers = {
        "riemod": dict(step=_pinn.riemod_step(riemod_tx, prob), state=riemod_tx.init(params0),
                       per_round=1),
        "adam": dict(step=_pinn.adam_step(adam_tx, prob), state=adam_tx.init(params0),
                     per_round=PINN_ADAM_STEPS_PER_STEP),
    }
    error = jax.jit(lambda p: _pinn.l2_error(p, prob))
    first = float(error(params0))
    for t in trainers.values():
      t.update(params=params0, times=[], curve=[(0.0, 0, first)])
    compile_s = _compile("PINN: compiling the riemod and Adam steps (float64)",
                         {n: (lambda t=t: t["step"](t["params"], t["state"]))
                          for n, t in trainers.items()})
    progress = _progress(args.pinn_steps, "PINN: training riemod and Adam (interleaved)")
    for i in range(args.pinn_steps):
      for name, t in trainers.items():  # one riemod step, then Adam's share of the budget
        for _ in range(t["per_round"]):
          start = time.perf_counter()
          t["params"], t["state"], loss = t["step"](t["params"], t["state"])
          jax.block_until_ready(loss)
          t["times"].append(time.perf_counter() - start)
        if (i + 1) % PINN_EVAL_EVERY == 0 or i + 1 == args.pinn_steps:
          t["curve"].append((float(np.sum(t["times"])), len(t["times"]), float(error(t["params"]))))
      progress.update(1)
      progress.set_postfix({n: f"{t['curve'][-1][2]:.1e}" for n, t in trainers.items()})
    progress.close()
    loss = jax.jit(lambda p: _pinn.loss(p, prob))
    rows = [dict(optimizer=name, steps=len(t["times"]), final_l2_error=t["curve"][-1][2],
                 final_loss=float(loss(t["params"])), wall_seconds=float(np.sum(t["times"])),
                 median_step_ms=1e3 * float(np.median(t["times"])),
                 compile_seconds=compile_s[name]) for name, t in trainers.items()]
  print("\nPINN: the ENGD paper's Poisson problem (2-32-1 tanh, 784 + 116 points, float64), "
        f"init seed {args.seed}; absolute L2 error on the 198 x 198 grid (at init {first:.3g}):")
  print(_pinn_table(rows))
  print(TIMES_NOTE)
  results["pinn"] = dict(
      settings=dict(riemod=PINN_RIEMOD, adam=PINN_ADAM, riemod_steps=args.pinn_steps,
                    adam_steps_per_riemod_step=PINN_ADAM_STEPS_PER_STEP, seed=args.seed),
      results=rows, curves={n: t["curve"] for n, t in trainers.items()})
  plot = _plot_pinn(trainers, out / "pinn_error_vs_time.png")
  if plot:
    saved.append(plot)


TIMES_NOTE = ("(wall s, median step ms: compiled step time only, measured after "
              "block_until_ready; compilation excluded and shown as compile s; error evaluation "
              "not timed.)")


def _compile(desc: str, thunks: dict[str, Callable]) -> dict[str, float]:
  """Runs each thunk once (compiling its step) under a progress bar; seconds per name."""
  import jax

  seconds = {}
  bar = _progress(len(thunks), desc, unit="step fn")
  for name, thunk in thunks.items():
    start = time.perf_counter()
    jax.block_until_ready(thunk())
    seconds[name] = time.perf_counter() - start
    bar.update(1)
  bar.close()
  return seconds


def _progress(total: int, desc: str, unit: str = "step"):
  try:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None)
  except ImportError:  # pragma: no cover - tqdm is in the demo extra
    class _Silent:
      def update(self, n): ...
      def set_postfix(self, d): ...
      def close(self): ...
    return _Silent()


def _pyplot():
  """``matplotlib.pyplot`` on the file backend, or ``None`` without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover - matplotlib is in the demo extra
    return None
  return plt


def _text_table(header: list[str], rows: list[list[str]]) -> str:
  lines = [" | ".join(header), " | ".join("-" * len(h) for h in header)]
  return "\n".join(lines + [" | ".join(row) for row in rows])


def _pinn_table(rows: list[dict]) -> str:
  return _text_table(
      ["optimizer", "steps", "abs. L2 error", "loss", "wall s", "median step ms", "compile s"],
      [[r["optimizer"], str(r["steps"]), f"{r['final_l2_error']:.2e}", f"{r['final_loss']:.2e}",
        f"{r['wall_seconds']:.2f}", f"{r['median_step_ms']:.2f}", f"{r['compile_seconds']:.1f}"]
       for r in rows])


def _plot_pinn(trainers: dict, path: pathlib.Path) -> pathlib.Path | None:
  plt = _pyplot()
  if plt is None:  # pragma: no cover - matplotlib is in the demo extra
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, t in trainers.items():
    curve = np.asarray(t["curve"])
    ax.semilogy(curve[:, 0], curve[:, 2], marker=".", label=f"{name} ({int(curve[-1, 1])} steps)")
  ax.set_xlabel("wall time (s, compiled steps only)")
  ax.set_ylabel("absolute L2 error")
  ax.legend()
  ax.set_title("Poisson PINN (ENGD paper's setup): riemod vs Adam")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _table(rows: list[dict]) -> str:
  return _text_table(
      ["optimizer", "train loss", "test acc", "wall s", "median step ms", "compile s",
       f"steps to loss<{LOSS_THRESHOLD}"],
      [[r["optimizer"], f"{r['final_train_loss']:.4f}", f"{r['test_accuracy']:.3f}",
        f"{r['wall_seconds']:.2f}", f"{r['median_step_ms']:.2f}", f"{r['compile_seconds']:.1f}",
        str(r["steps_to_threshold"]) if r["steps_to_threshold"] else "not reached"]
       for r in rows])


def _plot(trainers: dict, path: pathlib.Path) -> pathlib.Path | None:
  plt = _pyplot()
  if plt is None:  # pragma: no cover - matplotlib is in the demo extra
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


def _certified_step(state) -> dict:
  """The controller's last learning rate, the ``lam_max`` it is set from (``edge_lam``: the
  sharpest recent estimate), the latest estimate and the estimates taken."""
  import riemod

  c = riemod.find_state(state, riemod.certify.ControllerState)
  return dict(learning_rate=float(c.learning_rate), edge_lam=float(c.edge_lam),
              lam_max=float(c.lam_max), estimates=int(c.estimates))


def _print_certificate(trainer: dict, x, y, dataset_size: int) -> None:
  from flax import nnx

  import riemod

  certify = getattr(getattr(riemod, "certify", None), "certify", None) or getattr(
      riemod, "certify", None)
  if not callable(certify):
    print("\n(riemod.certify is not available in this build: no certificate.)")
    return
  model = nnx.merge(trainer["graphdef"], trainer["params"], trainer["rest"])
  bar = _progress(1, "certificate: spectra of the trained digits model (compiles first)",
                  unit="report")
  report = certify(model, x, cross_entropy(y), riemod.metrics.softmax_fisher(),
                   learning_rate=_certified_step(trainer["state"])["learning_rate"],
                   opt_state=trainer["state"],
                   geometry=riemod.certify.certified_geometry(),
                   dataset_size=dataset_size)
  bar.update(1)
  bar.close()
  print("\nCertificate of the trained model (one batch):")
  print(report.table())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="riemod-demo")
  add_parser(parser.add_subparsers(dest="command", required=True))
  return run(parser.parse_args(["demo"] + list(argv or [])))


if __name__ == "__main__":
  os.sys.exit(main())

"""kfac-jax on the digits tasks, in its own environment (jax < 0.10; see ``setup.sh``).

Run: ``/tmp/kfac-venv/bin/python -m benchmarks.kfac.run_kfac --out DIR [--quick]`` from the
repository root. Uses the suite's NumPy data, initialisation and batch order
(:mod:`benchmarks.problems`) and the same protocol (:mod:`benchmarks.protocol`): grid tuned on
seeds {100, 101}, reported on {0, 1, 2}, every step timed after ``block_until_ready``. Because
this process cannot import riemod, it times optax Adam (the task's Adam setting) beside kfac-jax
in interleaved rounds, so ``ratio_to_adam`` compares kfac-jax with Adam *on the same jax*.
Writes ``DIR/kfac_<task>.json``, which ``run_all`` hands to the task as external runs.

kfac-jax setting: ``kfac_jax.Optimizer`` with its adaptive learning rate, momentum and damping
(the documented default mode), layers found by its graph matcher, the loss registered by hand
(softmax cross-entropy, or squared error for the autoencoder). The grid is its initial damping.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from benchmarks import harness, problems, protocol

# The task definitions must match task_digits_mlp.py / task_digits_autoencoder.py.
TASKS = {
    "digits-mlp": dict(sizes=[64, 128, 128, 10], acts=["tanh", "tanh", None], target="labels",
                       steps=600, quick_steps=150, thresholds={"train_loss": [0.05]},
                       adam_lr=1e-2),
    "digits-autoencoder": dict(sizes=[64, 128, 32, 8, 32, 128, 64],
                               acts=["tanh", "tanh", None, "tanh", "tanh", None], target="inputs",
                               steps=1000, quick_steps=200,
                               thresholds={"train_loss": [1.0, 0.5, 0.3, 0.2]}, adam_lr=1e-2),
}
GRID = [dict(initial_damping=d) for d in (1e-2, 1e-1, 1.0)]
INVERSE_PERIOD = 5  # kfac-jax's default inverse_update_period


def _forward(params, x, acts):
  for (w, b), act in zip(params, acts):
    x = x @ w + b
    if act == "tanh":
      x = jnp.tanh(x)
  return x


def _loss(params, batch, cfg, register: bool):
  import kfac_jax

  x, t = batch
  out = _forward(params, x, cfg["acts"])
  if cfg["target"] == "labels":
    if register:
      kfac_jax.register_softmax_cross_entropy_loss(out, t)
    return optax.softmax_cross_entropy_with_integer_labels(out, t).mean()
  if register:
    kfac_jax.register_squared_error_loss(out, t)
  return 0.5 * jnp.mean(jnp.sum((out - t) ** 2, -1))


def make_spec(name: str, quick: bool) -> protocol.TaskSpec:
  import kfac_jax

  cfg = TASKS[name]
  steps = cfg["quick_steps"] if quick else cfg["steps"]
  x_train, y_train, _, _ = problems.digits()
  x_train = jnp.asarray(x_train)
  y_train = jnp.asarray(y_train) if cfg["target"] == "labels" else x_train
  first_level = list(cfg["thresholds"]["train_loss"])[-1 if name == "digits-mlp" else 1]
  x_test, y_test = (jnp.asarray(a) for a in problems.digits()[2:])
  evaluate_fn = jax.jit(lambda p: _loss(p, (x_train, y_train), cfg, False))
  accuracy_fn = jax.jit(lambda p: jnp.mean(jnp.argmax(_forward(p, x_test, cfg["acts"]), -1)
                                           == y_test))
  optimizers = {}  # one kfac_jax.Optimizer (one compilation) per hyperparameter setting

  def make_trainer(opt, hyper, seed):
    params0 = [(jnp.asarray(w), jnp.asarray(b))
               for w, b in problems.mlp_init(cfg["sizes"], seed)]
    table = problems.batch_table(seed, x_train.shape[0], 128, steps)

    def batch(i):
      idx = table[i % len(table)]
      return x_train[idx], y_train[idx]

    def evaluate(state):
      out = {"train_loss": float(evaluate_fn(state[0]))}
      if cfg["target"] == "labels":
        out["test_accuracy"] = float(accuracy_fn(state[0]))
      return out

    if opt.startswith("adam"):
      tx = optax.adam(hyper["learning_rate"])

      @jax.jit
      def adam_step(params, opt_state, xb, yb):
        loss, grads = jax.value_and_grad(lambda p: _loss(p, (xb, yb), cfg, False))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

      def step(state, i):
        params, opt_state, loss = adam_step(state[0], state[1], *batch(i))
        return (params, opt_state), loss

      return harness.Trainer("adam (kfac env)", hyper, lambda: (params0, tx.init(params0)),
                             step, evaluate)

    key = json.dumps(hyper, sort_keys=True)
    optimizer = optimizers.get(key) or kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(lambda p, b: _loss(p, b, cfg, True)),
        l2_reg=0.0, value_func_has_aux=False, value_func_has_state=False,
        value_func_has_rng=False, use_adaptive_learning_rate=True,
        use_adaptive_momentum=True, use_adaptive_damping=True,
        initial_damping=hyper["initial_damping"], num_burnin_steps=0,
        inverse_update_period=INVERSE_PERIOD, multi_device=False)
    optimizers[key] = optimizer
    rng = jax.random.key(seed)

    def init():  # kfac-jax donates its inputs: hand it fresh copies
      params = jax.tree.map(jnp.array, params0)
      return params, optimizer.init(params, jax.random.fold_in(rng, 10**6), batch(0))

    def step(state, i):
      params, opt_state, stats = optimizer.step(state[0], state[1], jax.random.fold_in(rng, i),
                                                batch=batch(i), global_step_int=i)
      return (params, opt_state), stats["loss"]

    # kfac-jax compiles separate step variants (curvature-inverse updates every
    # INVERSE_PERIOD steps): warm all of them up before timing.
    return harness.Trainer("kfac-jax", hyper, init, step, evaluate,
                           warmup_steps=2 * INVERSE_PERIOD + 1)

  def score(r):
    if name == "digits-mlp":
      hit = r["thresholds"]["train_loss<0.05"]["steps"]
      return hit if hit is not None else steps * (1 + r["final"]["train_loss"])
    return r["final"]["train_loss"]

  del first_level
  return protocol.TaskSpec(
      name=name, num_steps=steps,
      grids={"adam (kfac env)": [dict(learning_rate=cfg["adam_lr"])],
             "kfac-jax": GRID[1:2] if quick else GRID},
      make_trainer=make_trainer, thresholds=cfg["thresholds"], score=score,
      final_keys=["train_loss"], time_budget_s=120.0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--tasks", nargs="*", default=list(TASKS))
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  try:
    import kfac_jax
    environment = (f"jax {jax.__version__}, kfac_jax {kfac_jax.__version__}, "
                   f"python {sys.version.split()[0]}")
  except Exception:  # noqa: BLE001
    environment = "kfac_jax import failed: " + traceback.format_exc(limit=1)
  for name in args.tasks:
    path = args.out / f"kfac_{name}.json"
    try:
      spec = make_spec(name, args.quick)
      # Interleaved ratios against this environment's Adam (named "adam (kfac env)").
      payload = protocol.run_task(spec, args.out / "kfac_env",
                                  **(protocol.QUICK if args.quick else {}),
                                  reference_name="adam (kfac env)")
      runs = [dict(r, task=name) for r in payload["runs"] if r["optimizer"] == "kfac-jax"]
      out = {"task": name, "environment": environment, "runs": runs,
             "chosen": payload["chosen"], "not_run": payload["not_run"],
             "interleaved_timing": payload["interleaved_timing"], "machine": payload["machine"]}
    except Exception:  # noqa: BLE001 - the reason is the result
      out = {"task": name, "environment": environment, "runs": [],
             "error": traceback.format_exc(limit=3)}
    path.write_text(json.dumps(harness._clean(out), indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  main()

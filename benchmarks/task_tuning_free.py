"""tuning-free: riemod's default settings with the certified step-size controller, no learning rate.

For each task, on the reported seeds 0, 1, 2 (same data, initialisation and batch order as the task
files):

* ``riemod-tuned``: the task's tuned riemod (its chosen configuration in
  ``benchmarks/results/<task>.json`` when this riemod still accepts it, else the task file's
  headline ``RIEMOD_GRID[0]``; the PINN: its line-searched ENGD setting).
* ``riemod-certified``: :func:`riemod.certify.certified_layerwise_natural_gradient` (the PINN:
  :func:`riemod.certify.certified_natural_gradient`) with riemod's defaults for everything a user
  would otherwise tune: no learning rate (the controller's ``fraction * 2 / lam_max(G^{-1} H_GN)``,
  defaults, recorded in the results), the aliases' default geometry
  (:func:`riemod.certify.certified_geometry`: the Kronecker mass at its default mass 1, ``1e-2 I``
  on modules without dense structure), their default SPRING momentum 0.8, no clipping, no line
  search, ``on_nonfinite``/``max_error`` defaults. Kept from the task: the
  output metric and curvature batch (they set what the curvature costs, not the step).
* ``riemod-certified-gauss-newton`` (the PINN, the recipe its target is judged on):
  :func:`riemod.certify.certified_gauss_newton` at its defaults (the Gauss-Newton limit: the
  truncated solve at the cut-off the precision check accepts, the mass at that cut-off, the
  certified rate, a grid line search from the edge of stability, Levenberg-Marquardt mass
  adaptation: the solve's constants set by the dtype's precision, the Levenberg-Marquardt rule at
  its library defaults (chosen on this PINN's tuning seeds 100-105, not on the reported seeds)).
* ``riemod-certified+guard`` (the PINN): ``riemod-certified`` wrapped in :func:`riemod.certify.guarded` at its
  defaults (Levenberg-Marquardt mass adaptation and step rejection from the measured reduction
  ratio): on a full-batch least-squares loss the Gauss-Newton edge is ``lr = 1`` whatever the mass,
  so the controller alone cannot shorten a step the nonlinearity punishes; the guard can.
* ``riemod-certified-constant`` (digits tasks): the same with the constant mass 1e-2
  (``riemod.Geometry()``), the aliases' default before the Kronecker mass.
* ``riemod-certified-adaptive`` (with ``--adaptive``): the same with ``riemod.masses.adaptive()``.

Measured: stable seeds (not diverged, not climbed back; a run that raises counts as unstable),
steps and seconds (step time only, the harness's protocol) to the task's threshold, the final
metric, the last certified learning rate, and the controller's overhead: from seed 0's trained
state, interleaved single steps of the inner step at a fixed learning rate (the same inner step:
the controller's SPRING momentum included), the controlled step
with no estimate due and with one due; a run's overhead is the bookkeeping ratio minus 1 plus
(estimates per step) x (the extra time of a step with an estimate), over the fixed-lr step. On
digits-mlp the controller settings of ``CONTROLLER_GRID`` and the tuned riemod are compared on
the tuning seeds ``TUNING_SEEDS`` (the defaults were chosen there).

kfac-jax's adaptive mode (learning rate, momentum and damping adapted by kfac-jax) is shown from
``benchmarks/results/kfac_<task>.json`` (``benchmarks/kfac/run_kfac.py``, its own environment),
with the date and load of that run; this script does not re-run it.

Replays (digits tasks): a run of ~0.2 s moves by tens of percent with the machine (in the
committed results the CNN's single-run ratio is 1.65 where its replays give 1.27), so the tuned
and certified runs of each seed are replayed to their thresholds (the same steps: the runs are
deterministic) ``REPLAYS`` times in lockstep (one step of each in turn, so a change of the
machine's speed reaches both alike), and the median over repeats is the seed's time;
``time / tuned (replayed)`` is the ratio of the medians over seeds.

Targets (issue 16): ``riemod-certified`` stable on 3/3 seeds and its median time to threshold
within 1.5x of ``riemod-tuned``'s (on the digits tasks the replayed times).

Run: ``python -m benchmarks.task_tuning_free [--tasks ...] [--quick] [--out DIR]``; the PINN runs in
its own process (it needs float64 everywhere).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import riemod
from benchmarks import harness, problems, riemod_config

NAME = "tuning_free"
TASKS = ("digits-mlp", "digits-autoencoder", "digits-cnn", "char-lm", "engd-poisson")
# digits-cnn reaches its threshold in < 1 s; its task's 20 s budget is for accuracy at equal time.
TIME_BUDGET_S = {"digits-cnn": 5.0}
LM_EVAL_EVERY = 10  # the validation loss costs ~a step; every step would double the wall time
SEEDS = (0, 1, 2)
# The controller's own defaults (riemod.certify.controlled's signature), recorded in the results.
CONTROLLER = {k: v.default for k, v in inspect.signature(
    riemod.certify.certified_layerwise_natural_gradient).parameters.items()
              if k in ("fraction", "every", "warmup", "recheck_rise", "num_steps", "memory",
                       "momentum")}
# Controller settings compared on the tuning seeds (digits-mlp), each written out in full: the
# first release's defaults, the previous ones, and the current ones (momentum 0.8, memory 0.8,
# every 30), which were chosen from this comparison, with their neighbours.
_OLD = {"recheck_rise": 2.0, "momentum": None, "memory": 0.0}
CONTROLLER_GRID = ({"every": 10, "recheck_rise": 1.5, "momentum": None, "memory": 0.0},
                   dict(_OLD, every=20),
                   dict(_OLD, every=20, memory=0.8),
                   dict(_OLD, every=20, momentum=0.8),
                   dict(_OLD, every=20, momentum=0.8, memory=0.8),
                   dict(_OLD, every=30, momentum=0.8, memory=0.8),
                   dict(_OLD, every=30, momentum=0.5, memory=0.8),
                   dict(_OLD, every=40, momentum=0.8, memory=0.8))
TUNING_SEEDS = (100, 101, 102, 103)
# The threshold each task's time is measured to: the task's own (digits-mlp), the issue 6 target
# level (autoencoder), and an L2 level the tuned ENGD setting reaches on 3/3 seeds (PINN).
THRESHOLD = {"digits-mlp": ("train_loss", 0.05), "digits-autoencoder": ("train_loss", 0.5),
             "digits-cnn": ("train_loss", 0.05), "char-lm": ("val_loss", 2.2),
             "engd-poisson": ("l2", 1e-5)}
RESULTS = Path(__file__).resolve().parent / "results"
REPLAYS = 5  # repeats of each digits run to its threshold (see the module docs)
# Interleaved rounds of the overhead measurement: with 21 the no-estimate step's median ratio
# moved 0.93-1.08 between runs of the same code (a 5% ratio counted whole into the overhead).
OVERHEAD_ROUNDS = 101
POLICIES = ("skip", "ignore")  # the certified run replayed with these on_nonfinite policies too


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tuned_config(task: str, module) -> dict:
  """The task's tuned riemod configuration (see the module docs)."""
  path = RESULTS / f"{task}.json"
  if path.exists():
    chosen = json.loads(path.read_text()).get("chosen", {}).get("riemod", {}).get("hyperparameters")
    if chosen and riemod_config.supported(chosen)[0]:
      return chosen
  return dict(module.RIEMOD_GRID[0])


# --------------------------------------------------------------------------- digits tasks
def _digits_task(task: str, quick: bool):
  from benchmarks import task_digits_autoencoder, task_digits_cnn, task_digits_mlp

  module = {"digits-mlp": task_digits_mlp, "digits-autoencoder": task_digits_autoencoder,
            "digits-cnn": task_digits_cnn}[task]
  spec = module.spec(quick)
  return module, spec, spec.make_trainer.__self__  # the MLPTask behind the trainer factory


def certified_trainer(mlp_task, name: str, hyper: dict, seed: int, *, fixed_lr=None,
                      controller: dict | None = None):
  """A harness trainer of the certified step on a digits task (``fixed_lr``: the same inner step
  at a fixed learning rate, no controller, for the overhead timing; ``controller``: settings
  other than the defaults)."""
  from flax import nnx

  controller = controller or {}
  key = ("certified", json.dumps(hyper, sort_keys=True), fixed_lr,
         json.dumps(controller, sort_keys=True))
  cache = mlp_task._cache
  if key not in cache:
    # No mass policy named: the certified aliases' own default geometry.
    geometry = (riemod.certify.certified_geometry("layerwise", hyper.get("mass"))
                if "mass_policy" not in hyper else riemod.Geometry(
                    mass=hyper.get("mass"),
                    mass_policy=riemod_config.mass_policy(hyper["mass_policy"])))
    if fixed_lr is None:
      tx = riemod.certify.certified_layerwise_natural_gradient(geometry=geometry, **controller)
    else:
      # The same inner step: the controller's momentum (its default unless given) included.
      momentum = controller.get("momentum", CONTROLLER["momentum"])
      tx = riemod.layerwise_natural_gradient(fixed_lr, geometry=geometry, momentum=momentum)
    metric = riemod_config.output_metric(hyper["output_metric"])
    vgc = {"curvature_batch": hyper["curvature_batch"]} if hyper.get("curvature_batch") else {}
    graphdef = mlp_task.graphdef

    def step(params, opt_state, idx, i, seed):
      x, t = mlp_task.batch(idx)
      loss_fn = lambda out: mlp_task.loss(out, t)
      model = nnx.merge(graphdef, params)
      loss, grads, curvature = riemod.value_grad_and_curvature(
          model, x, loss_fn, metric, key=jax.random.fold_in(jax.random.key(seed), i), **vgc)
      updates, opt_state = tx.update(grads, opt_state, params, curvature=curvature, value=loss,
                                     apply_fn=lambda p: nnx.merge(graphdef, p)(x), loss_fn=loss_fn)
      return optax.apply_updates(params, updates), opt_state, loss

    cache[key] = (tx, jax.jit(step))
  tx, step = cache[key]
  table = problems.batch_table(seed, mlp_task.x_train.shape[0], mlp_task.batch_size,
                               mlp_task.num_steps)
  _, params0 = nnx.split(mlp_task.model(seed))
  seed_arr = jnp.asarray(seed, jnp.uint32)

  def one_step(state, i):
    params, opt_state, loss = step(state[0], state[1], table[i % len(table)],
                                   jnp.asarray(i, jnp.int32), seed_arr)
    return (params, opt_state), loss

  def evaluate(state):
    return {k: float(v) for k, v in mlp_task._eval(state[0]).items()}

  return harness.Trainer(name, hyper, lambda: (params0, tx.init(params0)), one_step, evaluate)


def _reason(error: Exception) -> str:
  """The line that says why (under jit a refused step arrives wrapped in a runtime error)."""
  lines = str(error).strip().splitlines()
  named = [line.strip() for line in lines if "StepRefusedError:" in line]
  return (named[-1] if named else f"{type(error).__name__}: {lines[0] if lines else ''}")[:400]


def _controller_summary(state) -> dict:
  c = riemod.find_state(state, riemod.certify.ControllerState)
  if c is None:
    return {}
  out = {"learning_rate": float(c.learning_rate), "lam_max": float(c.lam_max),
         "estimates": int(c.estimates), "count": int(c.count)}
  guard = riemod.find_state(state, riemod.certify.GuardState)
  if guard is not None:
    out.update(rejected_steps=int(guard.rejected_steps), mass_scale=float(
        riemod.find_state(state, riemod.MetricState).geometry.mass_scale))
  return out


def _train(trainer, num_steps, thresholds, time_budget_s, eval_every: int = 1):
  """One run; a run that raises (a refused step, a crash) is recorded as unstable."""
  try:
    r = harness.run_training(trainer, num_steps, thresholds=thresholds, eval_every=eval_every,
                             time_budget_s=time_budget_s)
  except Exception as error:  # noqa: BLE001 - recorded with its reason
    reason = _reason(error)
    _log(f"{trainer.name}: raised ({reason})")
    return {"optimizer": trainer.name, "hyperparameters": trainer.hyper, "raised": reason,
            "diverged": True, "thresholds": {}, "final": {}, "curve": {}, "steps_run": None,
            "median_step_seconds": None, "total_step_seconds": None}
  r["controller"] = _controller_summary(r["_state"][1])
  return r


def _with_count(state, count):
  """``state`` with the controller's step count set (the schedule decides on it) and no loss
  history (no recheck)."""
  def visit(node):
    if isinstance(node, riemod.certify.ControllerState):
      return node._replace(count=jnp.asarray(count, node.count.dtype),
                           smoothed_value=jnp.full_like(node.smoothed_value, jnp.nan))
    return node
  return jax.tree.map(visit, state, is_leaf=lambda n: isinstance(n, riemod.certify.ControllerState))


def estimate_cost(twin, mine, state, rounds: int) -> dict:
  """Interleaved single steps from the same trained state: the inner step at a fixed learning
  rate (``twin``), the controlled step with no estimate due, and with one due. Returns the median
  seconds of each and the ratios to the fixed-lr step."""
  every = CONTROLLER["every"]
  twin_state = (state[0], twin.init()[1])
  variants = {"fixed lr": (twin, twin_state),
              "controlled, no estimate": (mine, (state[0], _with_count(state[1], 100 * every + 1))),
              "controlled, estimate": (mine, (state[0], _with_count(state[1], 100 * every)))}
  for t, s in variants.values():
    jax.block_until_ready(t.step(s, 0))  # compile
  times = {name: [] for name in variants}
  for r in range(rounds):
    for name, (t, s) in list(variants.items())[r % 3:] + list(variants.items())[:r % 3]:
      start = time.perf_counter()
      jax.block_until_ready(t.step(s, 10_000 + r))
      times[name].append(time.perf_counter() - start)
  base = [t for t in times["fixed lr"]]
  return {"rounds": rounds, "median_seconds": {k: statistics.median(v) for k, v in times.items()},
          "ratio_to_fixed": {k: statistics.median([a / b for a, b in zip(v, base)])
                             for k, v in times.items()},
          "ratio_spread": {k: [min(a / b for a, b in zip(v, base)), max(a / b for a, b in zip(v, base))]
                           for k, v in times.items()}}


def whole_run_overhead(cost: dict, estimates: int, steps: int) -> float:
  """The controller's share of a run: per estimate, the extra time of a step with one over a
  step without (the same compiled program, so the ratio is free of other differences), plus
  the bookkeeping of a step without an estimate against the fixed-lr step when it is positive
  (a separately compiled program; below 1 it is noise, counted as 0)."""
  r = cost["ratio_to_fixed"]
  extra = r["controlled, estimate"] / r["controlled, no estimate"] - 1
  return max(r["controlled, no estimate"] - 1, 0.0) + estimates / steps * extra


ACCURACY_STEPS = (1, 2, 3, 5)   # Lanczos steps compared (the default is 5)
ACCURACY_REFERENCE = 30        # the reference estimate's Lanczos steps


def estimate_accuracy(task: str, seed: int, num_steps: int) -> dict:
  """How close a warm-started estimate with fewer Lanczos steps comes to ``lam_max``: along a run
  at the defaults, at every step that estimates (after the first), the same step from the same
  state (so from the same warm start) with ``num_steps`` in ``ACCURACY_STEPS`` and a
  ``ACCURACY_REFERENCE``-step reference; the ratios estimate / reference (a Ritz value is a
  lower estimate, so below 1 is an underestimate and a rate set too high)."""
  module, _, mlp_task = _digits_task(task, False)
  tuned = tuned_config(task, module)
  keys = {k: tuned.get(k) for k in ("output_metric", "curvature_batch")}
  run = certified_trainer(mlp_task, "riemod-certified", dict(keys), seed)
  variants = {m: certified_trainer(mlp_task, "riemod-certified", dict(keys), seed,
                                   controller={"num_steps": m})
              for m in ACCURACY_STEPS + (ACCURACY_REFERENCE,)}
  lam = lambda state: riemod.find_state(state[1], riemod.certify.ControllerState)
  state, rows = run.init(), []
  for i in range(num_steps):
    new, _ = run.step(state, i)
    if i > 0 and int(lam(new).estimates) > int(lam(state).estimates):
      values = {m: float(lam(t.step(state, i)[0]).lam_max) for m, t in variants.items()}
      reference = values.pop(ACCURACY_REFERENCE)
      rows.append({"step": i, "reference": reference,
                   "ratio": {str(m): v / reference for m, v in values.items()}})
      _log(f"accuracy {task} step {i}: reference {reference:.4g}, {rows[-1]['ratio']}")
    state = new
  ratios = {str(m): [r["ratio"][str(m)] for r in rows] for m in ACCURACY_STEPS}
  return {"task": task, "seed": seed, "num_steps": num_steps, "reference_steps": ACCURACY_REFERENCE,
          "rows": rows, "min": {m: min(v) for m, v in ratios.items()},
          "median": {m: statistics.median(v) for m, v in ratios.items()}}


def write_accuracy(results: list[dict], out: Path) -> None:
  """``tuning_free_estimate_accuracy.{json,md}``."""
  harness.write_json(out / f"{NAME}_estimate_accuracy.json", {
      "results": results, "machine": harness.machine_info(), "loadavg_end": list(os.getloadavg())})
  lines = ["# Warm-started estimates with fewer Lanczos steps", "",
           f"Estimate / {ACCURACY_REFERENCE}-step reference of `lam_max(G^-1 H_GN)` at every "
           "estimate after the first along a run of the certified defaults, each from the same "
           "state and warm start (`python -m benchmarks.task_tuning_free --estimate-accuracy`). "
           "1 Lanczos step is the Rayleigh quotient of the previous estimate's Ritz vector.", "",
           "| task | seed | Lanczos steps | min | median |", "|---|---|---|---|---|"]
  for r in results:
    for m in r["min"]:
      lines.append(f"| {r['task']} | {r['seed']} | {m} | {harness.fmt(r['min'][m])} | "
                   f"{harness.fmt(r['median'][m])} |")
  lines += ["", "Per estimate (step: ratios for " + ", ".join(map(str, ACCURACY_STEPS))
            + " steps):", ""]
  for r in results:
    lines.append(f"- {r['task']} seed {r['seed']}: " + "; ".join(
        f"{row['step']}: " + "/".join(harness.fmt(v) for v in row["ratio"].values())
        for row in r["rows"]))
  (out / f"{NAME}_estimate_accuracy.md").write_text("\n".join(lines) + "\n")


def tune_controller(mlp_task, metric_keys: dict, spec, thresholds, tuned: dict) -> list[dict]:
  """The controller settings of ``CONTROLLER_GRID`` on the tuning seeds: stability, steps and
  seconds to the threshold and estimates per run (the current defaults were chosen from this
  table), and the tuned riemod on the same seeds for scale."""
  rows = []
  for controller in CONTROLLER_GRID + ("tuned riemod",):
    for seed in TUNING_SEEDS:
      t = (mlp_task.trainer("riemod", tuned, seed) if controller == "tuned riemod" else
           certified_trainer(mlp_task, "riemod-certified", dict(metric_keys), seed,
                             controller=controller))
      r = _train(t, spec.num_steps, thresholds, None)
      hit = r["thresholds"].get(_key("digits-mlp"), {})
      rows.append({"controller": controller, "seed": seed, "raised": r.get("raised"),
                   "stable": (not r.get("raised") and not r["diverged"]
                              and not harness.regressed(r)),
                   "steps": hit.get("steps"), "seconds": hit.get("seconds"),
                   "estimates": r.get("controller", {}).get("estimates"),
                   "final": r["final"].get("train_loss")})
      _log(f"tuning {controller} seed {seed}: {rows[-1]}")
  return rows


def run_digits(task: str, quick: bool, seeds, adaptive: bool = False) -> dict:
  module, spec, mlp_task = _digits_task(task, quick)
  tuned = tuned_config(task, module)
  metric_keys = {k: tuned.get(k) for k in ("output_metric", "curvature_batch")}
  thresholds = {THRESHOLD[task][0]: [THRESHOLD[task][1]]}
  machine = harness.machine_info()
  runs = []
  for seed in seeds:
    trainers = [mlp_task.trainer("riemod", tuned, seed),
                certified_trainer(mlp_task, "riemod-certified", dict(metric_keys), seed)]
    if adaptive:
      trainers.append(certified_trainer(mlp_task, "riemod-certified-adaptive",
                                        dict(metric_keys, mass_policy="adaptive"), seed))
    # The certified aliases' previous default geometry, riemod.Geometry() (constant mass 1e-2).
    trainers.append(certified_trainer(mlp_task, "riemod-certified-constant",
                                      dict(metric_keys, mass_policy="constant"), seed))
    trainers[0].name = "riemod-tuned"
    for t in trainers:
      r = _train(t, spec.num_steps, thresholds, TIME_BUDGET_S.get(task, spec.time_budget_s))
      r["seed"] = seed
      hit = r["thresholds"].get(_key(task), {})
      _log(f"{task} {t.name} seed {seed}: final {r['final'].get(THRESHOLD[task][0])}, "
           f"to threshold {hit.get('steps')} steps / {hit.get('seconds')} s, "
           f"controller {r.get('controller')}")
      runs.append(r)
  replays = []
  for seed in seeds:
    hits = {r["optimizer"]: r["thresholds"].get(_key(task), {}).get("steps") for r in runs
            if r["seed"] == seed}
    if hits.get("riemod-tuned") and hits.get("riemod-certified"):
      pair = {"riemod-tuned": (mlp_task.trainer("riemod", tuned, seed), hits["riemod-tuned"]),
              "riemod-certified": (certified_trainer(mlp_task, "riemod-certified",
                                                     dict(metric_keys), seed),
                                   hits["riemod-certified"])}
      # The refusal policy's share: the same certified steps with "skip" (the checks, no host
      # callback) and "ignore" (no checks), the tuned run's setting.
      for policy in POLICIES:
        pair[f"riemod-certified ({policy})"] = (certified_trainer(
            mlp_task, "riemod-certified", dict(metric_keys), seed,
            controller={"on_nonfinite": policy}), hits["riemod-certified"])
      replays.append({"seed": seed, "steps": {k: v[1] for k, v in pair.items()},
                      "seconds": replay(pair, REPLAYS)})
      _log(f"{task} replay seed {seed}: " + ", ".join(
          f"{k} {statistics.median(v):.3f} s" for k, v in replays[-1]["seconds"].items()))
  # Controller overhead: from seed 0's trained certified state, the step with and without an
  # estimate against the same inner step at the controller's final fixed learning rate.
  overhead = {}
  for name in ("riemod-certified", "riemod-certified-constant", "riemod-certified-adaptive"):
    run = next((r for r in runs if r["optimizer"] == name and r["seed"] == seeds[0]
                and "_state" in r), None)
    if run is None or not run.get("controller"):
      continue
    hyper = run["hyperparameters"]
    twin = certified_trainer(mlp_task, name + " (fixed lr)", hyper, seeds[0],
                             fixed_lr=run["controller"]["learning_rate"])
    mine = certified_trainer(mlp_task, name, hyper, seeds[0])
    cost = estimate_cost(twin, mine, run["_state"], 5 if quick else OVERHEAD_ROUNDS)
    mine_runs = [r for r in runs if r["optimizer"] == name and r.get("controller")]
    counts = [r["controller"]["estimates"] for r in mine_runs]
    cost["estimates"] = counts
    # Over the steps each run took (a time budget can stop a run before num_steps).
    cost["steps"] = [r["controller"]["count"] for r in mine_runs]
    cost["whole_run"] = [whole_run_overhead(cost, c, n) for c, n in zip(counts, cost["steps"])]
    overhead[name] = cost
    _log(f"{task} {name}: estimate cost {cost['ratio_to_fixed']}, whole run {cost['whole_run']}")
  tuning = [] if quick or task != "digits-mlp" else tune_controller(mlp_task, metric_keys, spec,
                                                                     thresholds, tuned)
  for r in runs:
    r.pop("_state", None)
  return {"task": task, "threshold": THRESHOLD[task], "num_steps": spec.num_steps,
          "tuned": tuned, "controller": CONTROLLER, "runs": runs, "overhead": overhead,
          "controller_tuning": tuning, "replays": replays,
          "kfac": kfac_runs(task), "machine": machine, "loadavg_end": list(os.getloadavg())}


def replay(pair: dict, repeats: int) -> dict:
  """``{name: [seconds to the threshold per repeat]}``: the ``(trainer, steps)`` runs re-run from
  their starts for ``steps`` steps each, ``repeats`` times, in lockstep (step ``i`` of every run,
  then step ``i + 1``; the order rotated every step), so a change of the machine's speed during a
  repeat reaches every run alike. Every step is timed as the harness does (dispatch to
  ``block_until_ready``; no evaluation between); each program is compiled before timing."""
  names = list(pair)
  for trainer, _ in pair.values():
    jax.block_until_ready(trainer.step(trainer.init(), 0))
  times = {name: [] for name in names}
  for _ in range(repeats):
    states = {name: pair[name][0].init() for name in names}
    totals = dict.fromkeys(names, 0.0)
    for i in range(max(steps for _, steps in pair.values())):
      for name in names[i % len(names):] + names[:i % len(names)]:
        trainer, steps = pair[name]
        if i < steps:
          start = time.perf_counter()
          states[name], loss = trainer.step(states[name], i)
          jax.block_until_ready((states[name], loss))
          totals[name] += time.perf_counter() - start
    for name in names:
      times[name].append(totals[name])
  return times


def _key(task: str) -> str:
  metric, level = THRESHOLD[task]
  return f"{metric}<{level:g}" if task != "engd-poisson" else f"{metric}<={level:g}"


def kfac_runs(task: str) -> dict | None:
  """kfac-jax's adaptive-mode runs on this task from its own environment, if recorded."""
  path = RESULTS / f"kfac_{task}.json"
  if not path.exists():
    return None
  payload = json.loads(path.read_text())
  runs = [r for r in payload.get("runs", []) if r["optimizer"].startswith("kfac")
          and r.get("seed") in SEEDS]
  level = THRESHOLD[task]
  rows = []
  for r in runs:
    curve = r.get("curve", {})
    hit = next((j for j, v in enumerate(curve.get(level[0], []))
                if v is not None and float(v) < level[1]), None)
    rows.append({"seed": r.get("seed"), "hyperparameters": r.get("hyperparameters"),
                 "stable": harness.stable(r),
                 "steps": None if hit is None else curve["step"][hit],
                 "seconds": None if hit is None else curve["seconds"][hit],
                 "final": r.get("final", {}).get(level[0])})
  machine = payload.get("machine", {})
  return {"environment": payload.get("environment"), "time": machine.get("time"),
          "loadavg": machine.get("loadavg"), "runs": rows}


# --------------------------------------------------------------------------- PINN
def run_pinn(quick: bool, seeds, adaptive: bool = False) -> dict:
  from benchmarks import task_engd_poisson as engd
  from riemod.cli import _pinn

  assert jax.config.jax_enable_x64
  prob, cache = _pinn.problem(), {}
  iterations = 50 if quick else engd.ITERATIONS
  chosen = json.loads((RESULTS / "engd-poisson.json").read_text())["chosen"]
  tuned = dict(chosen["hyperparameters"])

  def certified(name, policy=None, guard=False, line_search=False, mass=None,
                gauss_newton=False, **options):
    # policy None: the certified aliases' default geometry (the Kronecker mass, which keeps the
    # constant 1e-2 on this plain function's parameters: they have no dense structure; mass=m
    # makes that m * 1e-2).
    geometry = (riemod.certify.certified_geometry("full", mass) if policy is None else
                riemod.Geometry(structure="full", mass_policy=policy))
    if gauss_newton:  # the least-squares recipe at its defaults
      tx = riemod.certify.certified_gauss_newton(mass, **options)
    else:
      tx = riemod.certify.certified_natural_gradient(geometry=geometry, **options)
    if line_search:  # ENGD's grid along the certified step (the certified rate is ~1 here)
      tx = optax.chain(tx, riemod.scale_by_grid_linesearch(**engd.LINE_SEARCH))
    if guard:
      tx = riemod.certify.guarded(tx, geometry)
    metric = riemod.metrics.identity()
    loss_of = lambda p: _pinn.half_mean_square(_pinn.residuals(p, prob.batch))

    @jax.jit
    def step(params, state):
      value, grads, curvature = riemod.value_grad_and_curvature(
          _pinn.residuals, prob.batch, _pinn.half_mean_square, metric, params=params)
      updates, state = tx.update(grads, state, params, curvature=curvature, value=value,
                                 apply_fn=lambda p: _pinn.residuals(p, prob.batch),
                                 loss_fn=_pinn.half_mean_square,
                                 **({"value_fn": loss_of}
                                    if guard or line_search or gauss_newton else {}))
      return optax.apply_updates(params, updates), state, value

    cache[name + "null"] = (tx, step)
    error = cache.setdefault("error", jax.jit(lambda p: _pinn.l2_error(p, prob)))
    loss = cache.setdefault("loss", jax.jit(lambda p: _pinn.loss(p, prob)))
    return harness.Trainer(name, {}, lambda: None,
                           lambda s, i: (lambda out: ((out[0], out[1]), out[2]))(step(*s)),
                           lambda s: {"l2": float(error(s[0])), "loss": float(loss(s[0]))})

  machine = harness.machine_info()
  tuned_trainer = engd.trainer("riemod", tuned, prob, cache)
  trainers = [tuned_trainer, certified("riemod-certified-gauss-newton", gauss_newton=True),
              # The tuned run's cut-off: directions the precision check does not accept.
              certified("riemod-certified-gauss-newton, cut-off 1e-14", gauss_newton=True,
                        cutoff=1e-14),
              certified("riemod-certified"),
              certified("riemod-certified+guard", guard=True),
              # The default momentum against none: Gauss-Newton steps at the certified lr ~ 1.
              certified("riemod-certified+guard, no momentum", guard=True, momentum=None),
              # ENGD's line search on the certified step, at the default mass and (not
              # tuning-free) at the mass 1e-6 (D = 1e-8 on these parameters); momentum off (on
              # the tuning seeds 100-102 momentum 0.8 reached 1e-5 later or not at all).
              certified("riemod-certified+line search, no momentum", line_search=True,
                        momentum=None),
              certified("riemod-certified+line search, no momentum, mass 1e-6",
                        line_search=True, momentum=None, mass=1e-6)]
  if adaptive:
    trainers.append(certified("riemod-certified-adaptive", riemod.masses.adaptive()))
  runs = []
  for seed in seeds:
    for t in trainers:
      try:
        r = engd.lockstep([t], seed, cache, iterations)[0]
      except Exception as error:  # noqa: BLE001 - recorded with its reason
        reason = _reason(error)
        _log(f"engd-poisson {t.name} seed {seed}: raised ({reason})")
        runs.append({"optimizer": t.name, "seed": seed, "raised": reason, "diverged": True,
                     "thresholds": {}, "final": {}, "curve": {}})
        continue
      r["optimizer"] = "riemod-tuned" if t is tuned_trainer else t.name
      r["controller"] = _controller_summary(r.pop("_state")[1])
      hit = r["thresholds"].get(_key("engd-poisson"), {})
      _log(f"engd-poisson {r['optimizer']} seed {seed}: l2 {r['final']['l2']:.3g}, to threshold "
           f"{hit.get('steps')} steps / {hit.get('seconds')} s, controller {r['controller']}")
      runs.append(r)
  # The recipe's starting mass against 100x below and above it (and the tuned setting), on the
  # tuning seeds: the default (mass = the cut-off) was picked here, not on the reported seeds.
  cut = riemod.composer.precision_cutoff()
  sweep = [(f"certified_gauss_newton(mass={k:g} x cut-off)",
            certified(f"riemod-certified-gauss-newton-mass{k:g}", gauss_newton=True,
                      mass=k * cut)) for k in (1e-2, 1.0, 1e2, 1e4)]
  sweep.append(("tuned riemod", tuned_trainer))
  tuning = []
  for seed in TUNING_SEEDS:
    for label, t in sweep:
      try:
        r = engd.lockstep([t], seed, cache, iterations)[0]
      except Exception as error:  # noqa: BLE001 - recorded as unstable, with its reason
        _log(f"engd-poisson tuning {label} seed {seed}: raised ({_reason(error)})")
        tuning.append({"controller": label, "seed": seed, "stable": False, "steps": None,
                       "seconds": None, "estimates": None, "final": None})
        continue
      c = _controller_summary(r.pop("_state")[1])
      hit = r["thresholds"].get(_key("engd-poisson"), {})
      tuning.append({"controller": label, "seed": seed, "stable": not r["diverged"],
                     "steps": hit.get("steps"), "seconds": hit.get("seconds"),
                     "estimates": c.get("estimates"), "final": r["final"]["l2"]})
      _log(f"engd-poisson tuning {label} seed {seed}: l2 {r['final']['l2']:.3g}, "
           f"{hit.get('steps')} steps")
  return {"task": "engd-poisson", "threshold": THRESHOLD["engd-poisson"],
          "num_steps": iterations, "tuned": dict(tuned, line_search=engd.LINE_SEARCH),
          "controller": CONTROLLER, "runs": runs, "overhead": {}, "kfac": None,
          "controller_tuning": tuning,
          "machine": machine, "loadavg_end": list(os.getloadavg())}


# --------------------------------------------------------------------------- char-LM
def run_char_lm(quick: bool, seeds) -> dict:
  """The character-level transformer LM (``benchmarks/task_char_lm.py``): its tuned riemod (the
  adaptive mass, a warm-up, a clip) against the certified alias at its defaults, under the task's
  step-time budget; validation loss evaluated every ``LM_EVAL_EVERY`` steps (not timed)."""
  from flax import nnx

  from benchmarks import task_char_lm as lm_task

  task = lm_task.CharLMTask(2000)
  chosen = json.loads((RESULTS / "char-lm.json").read_text())["chosen"]["riemod"]
  tuned = dict(chosen["hyperparameters"])
  lm, graphdef = task.lm, task.graphdef
  metric = riemod.metrics.sampled_softmax_fisher(1)
  tx = riemod.certify.certified_layerwise_natural_gradient()

  @jax.jit
  def step(params, opt_state, x, y, key):
    loss_fn = lambda logits: lm.cross_entropy(logits, y)
    loss, grads, curvature = riemod.value_grad_and_curvature(nnx.merge(graphdef, params), x,
                                                             loss_fn, metric, key=key)
    updates, opt_state = tx.update(grads, opt_state, params, curvature=curvature, value=loss,
                                   apply_fn=lambda p: nnx.merge(graphdef, p)(x), loss_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  def certified_trainer_lm(seed):
    starts = lm.batch_starts(len(task.train), task.num_steps, task.batch, task.context, seed)
    _, params0 = nnx.split(task._model(seed))

    def one_step(state, i):
      x, y = map(jnp.asarray, lm.windows(task.train, starts[i % len(starts)], task.context))
      params, opt_state, loss = step(state[0], state[1], x, y,
                                     jax.random.fold_in(jax.random.key(seed), i))
      return (params, opt_state), loss

    return harness.Trainer("riemod-certified", {}, lambda: (params0, tx.init(params0)), one_step,
                           lambda st: {"val_loss": float(task.validation(st[0]))})

  budget = 10.0 if quick else lm_task.BUDGET_S
  thresholds = {THRESHOLD["char-lm"][0]: [THRESHOLD["char-lm"][1]]}
  machine = harness.machine_info()
  runs = []
  for seed in seeds:
    tuned_trainer = task.trainer("riemod", tuned, seed)
    tuned_trainer.name = "riemod-tuned"
    for trainer in (tuned_trainer, certified_trainer_lm(seed)):
      r = _train(trainer, task.num_steps, thresholds, budget, eval_every=LM_EVAL_EVERY)
      r["seed"] = seed
      r.pop("_state", None)
      hit = r["thresholds"].get(_key("char-lm"), {})
      _log(f"char-lm {trainer.name} seed {seed}: final {r['final'].get('val_loss')}, to "
           f"threshold {hit.get('steps')} steps / {hit.get('seconds')} s, "
           f"controller {r.get('controller')}")
      runs.append(r)
  return {"task": "char-lm", "threshold": THRESHOLD["char-lm"], "num_steps": task.num_steps,
          "time_budget_s": budget, "tuned": tuned, "controller": CONTROLLER, "runs": runs,
          "overhead": {}, "kfac": None, "machine": machine, "loadavg_end": list(os.getloadavg())}


# --------------------------------------------------------------------------- report
def _median(values):
  return harness.median_or_none(values)


def summarise(payload: dict) -> dict:
  """Per optimizer: stable seeds, medians, and the targets against the tuned run."""
  key = _key(payload["task"])
  out = {}
  names = list(dict.fromkeys(r["optimizer"] for r in payload["runs"]))
  for name in names:
    rs = [r for r in payload["runs"] if r["optimizer"] == name]
    stable = [not r.get("raised") and not r["diverged"] and not harness.regressed(r) for r in rs]
    out[name] = {
        "stable": f"{sum(stable)}/{len(rs)}",
        "steps": _median([r["thresholds"].get(key, {}).get("steps") for r in rs]),
        "seconds": _median([r["thresholds"].get(key, {}).get("seconds") for r in rs]),
        "per_seed_seconds": [r["thresholds"].get(key, {}).get("seconds") for r in rs],
        "final": _median([r["final"].get(payload["threshold"][0]) for r in rs]),
        "per_seed_steps": [r["thresholds"].get(key, {}).get("steps") for r in rs],
        "median_step_ms": _median([1e3 * r["median_step_seconds"] for r in rs
                                   if r.get("median_step_seconds") is not None]),
        "learning_rate": [r.get("controller", {}).get("learning_rate") for r in rs],
        "raised": [r.get("raised") for r in rs if r.get("raised")],
    }
  tuned = out.get("riemod-tuned", {}).get("seconds")
  for name, row in out.items():
    row["time_ratio_to_tuned"] = (None if tuned is None or row["seconds"] is None
                                  else row["seconds"] / tuned)
  replays = payload.get("replays") or []
  replayed = {}
  for name in (replays[0]["seconds"] if replays else ()):
    per_seed = [statistics.median(r["seconds"][name]) for r in replays]
    replayed[name] = {"per_seed": per_seed, "seconds": _median(per_seed)}
  if "riemod-certified" in replayed:
    out["riemod-certified"]["replayed_ratio_to_tuned"] = (
        replayed["riemod-certified"]["seconds"] / replayed["riemod-tuned"]["seconds"])
  kfac = payload.get("kfac")
  if kfac and kfac["runs"]:
    rs = kfac["runs"]
    out["kfac-jax (adaptive)"] = {
        "stable": f"{sum(r['stable'] for r in rs)}/{len(rs)}",
        "steps": _median([r["steps"] for r in rs]), "seconds": _median([r["seconds"] for r in rs]),
        "per_seed_steps": [r["steps"] for r in rs],
        "per_seed_seconds": [r["seconds"] for r in rs],
        "final": _median([r["final"] for r in rs]), "median_step_ms": None,
        "time_ratio_to_tuned": None, "learning_rate": [], "raised": [],
        "note": f"{kfac['environment']}, run {kfac['time']}, load {kfac['loadavg']}"}
  # The recipe per problem class: the PINN (full-batch least squares) with
  # riemod.certify.certified_gauss_newton at its defaults.
  met = out.get("riemod-certified-gauss-newton" if payload["task"] == "engd-poisson" else
                "riemod-certified")
  target = None
  if met is not None:
    ratio = met.get("replayed_ratio_to_tuned", met["time_ratio_to_tuned"])
    target = {"stable_3_of_3": met["stable"] == f"{len(SEEDS)}/{len(SEEDS)}",
              "within_1.5x": ratio is not None and ratio <= 1.5}
  return {"rows": out, "target": target, "replayed": replayed}


def write_markdown(out: Path) -> None:
  """``tuning_free.md`` from every ``tuning_free_<task>.json`` present."""
  lines = ["# tuning-free: the certified step-size controller at riemod's defaults", "",
           "Median over seeds 0, 1, 2. Seconds count step time only (evaluation excluded), "
           "to the threshold named per task. `riemod-tuned`: the task's tuned riemod; "
           "`riemod-certified`: `riemod.certify.certified_(layerwise_)natural_gradient` with "
           "no learning rate and every default: SPRING momentum 0.8, the default geometry "
           "`riemod.certify.certified_geometry()` (the Kronecker mass at mass 1; `1e-2 I` on "
           "modules without dense structure), no clip, no line search; the task's output metric "
           "and curvature batch; `-constant`: the same with `riemod.Geometry()` (constant mass "
           "1e-2, the default before the Kronecker mass); `-adaptive`: the same with "
           "`riemod.masses.adaptive()`; `riemod-certified-gauss-newton` (the PINN's recipe, "
           "the row its target is judged on): `riemod.certify.certified_gauss_newton()` at its "
           "defaults. Controller: "
           f"`{CONTROLLER}`. kfac-jax rows: its adaptive mode, from "
           "`benchmarks/results/kfac_<task>.json` (an earlier run in its own environment, not "
           "re-run here; its step times are not comparable across loads).", ""]
  for task in TASKS:
    path = out / f"{NAME}_{task}.json"
    if not path.exists():
      continue
    payload = json.loads(path.read_text())
    summary = summarise(payload)
    metric, level = payload["threshold"]
    load = payload["machine"]["loadavg"] + payload["loadavg_end"]
    loaded = max(load) > 3
    lines += [f"## {task} (threshold {metric} {'<=' if task == 'engd-poisson' else '<'} {level:g}"
              f", {payload['num_steps']} steps)", "",
              "| optimizer | stable seeds | steps to threshold | s to threshold | time / tuned "
              "| per seed: steps / s | "
              f"final {metric} | median step ms | final certified lr (per seed) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary["rows"].items():
      lrs = ", ".join(harness.fmt(v) for v in row["learning_rate"] if v is not None) or "-"
      per_seed = ", ".join(f"{harness.fmt(a)} / {harness.fmt(b)}" for a, b in zip(
          row.get("per_seed_steps", []), row.get("per_seed_seconds", []))) or "-"
      lines.append("| " + " | ".join([
          name, row["stable"], harness.fmt(row["steps"]), harness.fmt(row["seconds"]),
          harness.fmt(row["time_ratio_to_tuned"]), per_seed, harness.fmt(row["final"]),
          harness.fmt(row["median_step_ms"]), lrs]) + " |")
    lines.append("")
    for name, row in summary["rows"].items():
      if row.get("raised"):
        lines.append(f"- {name} raised: {row['raised'][0]}")
      if row.get("note"):
        lines.append(f"- {name}: {row['note']}")
    for name, o in payload.get("overhead", {}).items():
      r, spread = o["ratio_to_fixed"], o["ratio_spread"]
      lines.append(
          f"- controller overhead ({name}): from seed {SEEDS[0]}'s trained state, {o['rounds']} "
          f"interleaved rounds, a step with no estimate due takes "
          f"{harness.fmt(r['controlled, no estimate'])}x the same inner step at a fixed lr "
          f"(spread {harness.fmt(spread['controlled, no estimate'][0])}-"
          f"{harness.fmt(spread['controlled, no estimate'][1])}) and a step with an estimate "
          f"{harness.fmt(r['controlled, estimate'])}x (spread "
          f"{harness.fmt(spread['controlled, estimate'][0])}-"
          f"{harness.fmt(spread['controlled, estimate'][1])}). With {o['estimates']} estimates "
          f"(warm-up, schedule and rechecks) in {o.get('steps', payload['num_steps'])} steps "
          "the controller adds "
          + ", ".join(f"{harness.fmt(100 * w)}%" for w in o["whole_run"])
          + " to a run (per seed; target 10%).")
    tuning = payload.get("controller_tuning") or []
    if tuning:
      lines += ["", f"{'Settings' if task == 'engd-poisson' else 'Controller settings'} on "
                f"the tuning seeds {list(TUNING_SEEDS)} (other settings at their defaults):", "",
                "| controller | seed | stable | steps to threshold | s to threshold | estimates "
                "| final |", "|---|---|---|---|---|---|---|"]
      for row in tuning:
        lines.append(f"| `{row['controller']}` | {row['seed']} | {row['stable']} | "
                     f"{harness.fmt(row['steps'])} | {harness.fmt(row.get('seconds'))} | "
                     f"{harness.fmt(row['estimates'])} | {harness.fmt(row['final'])} |")
      lines.append("")
    replayed = summary["replayed"]
    if replayed:
      certified = summary["rows"]["riemod-certified"]
      lines.append(
          f"- replayed to the threshold ({REPLAYS} repeats per seed, the runs in lockstep; "
          "median over repeats, per seed): riemod-tuned "
          + ", ".join(harness.fmt(v) for v in replayed["riemod-tuned"]["per_seed"])
          + " s, riemod-certified "
          + ", ".join(harness.fmt(v) for v in replayed["riemod-certified"]["per_seed"])
          + f" s; medians {harness.fmt(replayed['riemod-tuned']['seconds'])} and "
          f"{harness.fmt(replayed['riemod-certified']['seconds'])} s: **time / tuned "
          f"(replayed) {harness.fmt(certified['replayed_ratio_to_tuned'])}** "
          f"(the single run above: {harness.fmt(certified['time_ratio_to_tuned'])}).")
      base = replayed["riemod-tuned"]["seconds"]
      others = [(k, v) for k, v in replayed.items()
                if k not in ("riemod-tuned", "riemod-certified")]
      if others:
        lines.append("- the same certified steps replayed with another refusal policy (median "
                     "per seed; time / tuned): " + "; ".join(
                         f"{k} " + ", ".join(harness.fmt(x) for x in v["per_seed"])
                         + f" s, {harness.fmt(v['seconds'] / base)}" for k, v in others) + ".")
    t = summary["target"]
    if t is not None:
      lines.append(f"- target: stable 3/3 {'met' if t['stable_3_of_3'] else 'NOT met'}; time to "
                   f"threshold within 1.5x of tuned {'met' if t['within_1.5x'] else 'NOT met'}.")
    lines.append(f"- tuned riemod: `{payload['tuned']}`")
    lines.append(f"- load averages (start 1/5/15 min, end): {[round(v, 1) for v in load]}"
                 + (" -- LOADED (> 3): timings are noisy" if loaded else ""))
    lines.append("")
  lines.append("Reproduce: `python -m benchmarks.task_tuning_free` (2-core CPU; the PINN in its "
               "own process).")
  (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
  parser.add_argument("--quick", action="store_true", help="seed 0 only, shorter runs")
  parser.add_argument("--adaptive", action="store_true",
                      help="also the certified step with riemod.masses.adaptive()")
  parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
  parser.add_argument("--estimate-accuracy", action="store_true",
                      help="instead: warm-started estimates with 1, 2, 3, 5 Lanczos steps against "
                      "a 30-step reference along a default run (digits-mlp 200 steps, digits-cnn "
                      "70 steps, tuning seed 100)")
  args = parser.parse_args(argv)
  if args.estimate_accuracy:
    args.out.mkdir(parents=True, exist_ok=True)
    write_accuracy([estimate_accuracy("digits-mlp", TUNING_SEEDS[0], 200),
                    estimate_accuracy("digits-cnn", TUNING_SEEDS[0], 70)], args.out)
    return
  seeds = (0,) if args.quick else SEEDS
  for task in args.tasks:
    if task == "engd-poisson" and not jax.config.jax_enable_x64:
      # float64 everywhere: its own process (the digits tasks run in float32).
      cmd = [sys.executable, "-c", "import jax; jax.config.update('jax_enable_x64', True); "
             "from benchmarks import task_tuning_free as t; t.main()", "--tasks", task,
             "--out", str(args.out)] + (["--quick"] if args.quick else []) + (
                 ["--adaptive"] if args.adaptive else [])
      subprocess.run(cmd, check=True)
      continue
    _log(f"{task}: start")
    if task == "engd-poisson":
      payload = run_pinn(args.quick, seeds, args.adaptive)
    elif task == "char-lm":
      payload = run_char_lm(args.quick, seeds)
    else:
      payload = run_digits(task, args.quick, seeds, args.adaptive)
    payload["summary"] = summarise(payload)
    harness.write_json(args.out / f"{NAME}_{task}.json", payload)
    write_markdown(args.out)
    _log(f"{task}: {payload['summary']['target']}")


if __name__ == "__main__":
  main()

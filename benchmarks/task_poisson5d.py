"""poisson5d: a PINN where the batch is much smaller than the network (``d << n``): riemod's
sample-space Gauss-Newton step beside the dense parameter-space one and Adam.

Problem (the 5-D Poisson equation of Guzman-Cordero, Dangel, Goldshlager & Zeinhofer, NeurIPS 2025,
after Mueller & Zeinhofer, ICML 2023): ``-Lap u = f`` on ``[0, 1]^5`` with
``u* = sum_i sin(pi x_i)``, ``f = pi^2 u*`` and ``u = u*`` on the boundary; MLP 5-64-64-48-48-1 tanh
(``n = 10,065`` parameters; LeCun-normal kernels, zero biases); float64. Every step draws a fresh
batch of ``N_int`` interior points (uniform) and ``N_bd`` boundary points (uniform, then one random
coordinate set to 0 or 1) from the step index, so every method sees the same batches. Loss
``0.5 mean_int (Lap u + f)^2 + 0.5 mean_bd (u - u*)^2``, written as one scaled residual per point
(``sqrt(N / N_int)`` inside, ``sqrt(N / N_bd)`` on the boundary, ``N = N_int + N_bd = d``) so that it
is ``0.5 mean(r^2)``. Error: relative L2 of ``u`` on 20,000 fixed uniform points (not timed).

Methods (the same line search after each curvature step: the best of ``0.5**k, k < 12`` by the
batch loss):

* ``riemod``: ``riemod.natural_gradient(1.0, mass=mu, space="sample")``: the Woodbury solve with
  the ``d x d`` kernel ``J J^T / N``; ``O(d^2 n + d^3)``.
* ``riemod-nystrom``: the same step with the kernel replaced by a randomized rank-``r`` Nystrom
  sketch (``riemod.Geometry(space="nystrom", rank=r, oversampling=10)``, fresh test vectors every
  step): ``O((r + 10) d n)`` products and no ``d x d`` factorisation; its relative capacitance
  residual against the exact kernel is recorded per step.
* ``dense-gn``: ``(J^T J / N + mu I) s = J^T r / N`` with ``J`` from per-point ``jax.grad``
  (vmapped) and an ``n x n`` Cholesky; ``O(n^2 d + n^3)``. With the same ``mu`` it is the same step
  as riemod's (the Woodbury identity), so the two reach equal accuracy step for step; the task
  checks this on the first steps (iterates agree to round-off) and then times the dense step on a
  few steps only: its time to an error level is riemod's step count times its measured step time.
* ``adam``: optax Adam on the same batches, run for at least riemod's wall time.

Measured: interleaved step times (:func:`harness.time_interleaved`) of the three steps on the same
state and batch, riemod's and Adam's curves (rel. L2 vs step and step seconds), steps and seconds
to each level, and the multiply-add counts ``d^2 n + d^3/3`` and ``n^2 d + n^3/3``.

Targets (issue 14): riemod's step >= 10x faster than the dense step at equal accuracy; its time to
rel. L2 1e-4 <= 0.2x the dense method's.

Run: ``python -m benchmarks.task_poisson5d [--quick] [--interior 1000 --boundary 200] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import riemod  # noqa: E402
from benchmarks import harness  # noqa: E402

NAME = "poisson5d"
DIM = 5
SIZES = (DIM, 64, 64, 48, 48, 1)
LEVELS = [1e-2, 1e-3, 1e-4]
TARGET_LEVEL = 1e-4
NUM_TEST = 20_000
EVAL_EVERY = 10
LINE_SEARCH = dict(max_step=1.0, factor=0.5, num=12)
RIEMOD = dict(mass=1e-6, momentum=None)
NYSTROM = dict(rank=300, oversampling=10)  # rank: --nystrom-rank
ADAM = dict(learning_rate=1e-3)
DENSE_CHECK_STEPS = 3  # dense steps run in lockstep with riemod (agreement and step time)


# --------------------------------------------------------------------------- problem
def u_exact(x):
  return jnp.sum(jnp.sin(jnp.pi * x), -1)


def init_params(seed: int) -> list:
  key = jax.random.key(seed)
  params = []
  for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
    key, sub = jax.random.split(key)
    params.append({"w": jax.random.normal(sub, (n_in, n_out), jnp.float64) / np.sqrt(n_in),
                   "b": jnp.zeros(n_out, jnp.float64)})
  return params


def network(params, z):
  """``u(z)`` for one point ``z`` of shape (5,)."""
  h = z
  for layer in params[:-1]:
    h = jnp.tanh(h @ layer["w"] + layer["b"])
  return (h @ params[-1]["w"] + params[-1]["b"])[0]


def laplacian(params, z):
  """Trace of the input Hessian: one forward-over-reverse product per coordinate."""
  grad = jax.grad(lambda s: network(params, s))
  eye = jnp.eye(z.shape[0], dtype=z.dtype)
  return sum(jax.jvp(grad, (z,), (eye[i],))[1][i] for i in range(z.shape[0]))


def sample_batch(key, n_int: int, n_bd: int):
  """``(points (N, 5), interior flag, weight)`` for the residuals; fresh points per key."""
  k_int, k_bd, k_side, k_dim = jax.random.split(key, 4)
  inner = jax.random.uniform(k_int, (n_int, DIM), jnp.float64)
  bd = jax.random.uniform(k_bd, (n_bd, DIM), jnp.float64)
  side = jax.random.bernoulli(k_side, 0.5, (n_bd,)).astype(jnp.float64)
  coord = jax.random.randint(k_dim, (n_bd,), 0, DIM)
  bd = bd.at[jnp.arange(n_bd), coord].set(side)
  n = n_int + n_bd
  points = jnp.concatenate([inner, bd])
  flag = jnp.concatenate([jnp.ones(n_int), jnp.zeros(n_bd)])
  weight = jnp.where(flag > 0, jnp.sqrt(n / n_int), jnp.sqrt(n / n_bd))
  return points, flag, weight


def residuals(params, batch):
  points, flag, weight = batch

  def one(z, inside):
    return jnp.where(inside > 0, laplacian(params, z) + jnp.pi**2 * u_exact(z),
                     network(params, z) - u_exact(z))

  return (weight * jax.vmap(one)(points, flag))[:, None]


def half_mean_square(r):
  return 0.5 * jnp.mean(r**2)


def line_search(loss_of, params, direction):
  """The best of ``0.5**k`` (``k < 12``) along ``-direction`` by the batch loss."""
  flat, unravel = ravel_pytree(params)
  sizes = LINE_SEARCH["max_step"] * LINE_SEARCH["factor"] ** jnp.arange(LINE_SEARCH["num"])
  losses = jax.vmap(lambda a: loss_of(unravel(flat - a * direction)))(sizes)
  size = sizes[jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf))]
  return unravel(flat - size * direction)


# --------------------------------------------------------------------------- steps
def make_steps(n_int: int, n_bd: int, seed: int, nystrom_rank: int = NYSTROM["rank"]):
  """Jitted steps ``(params, state, i) -> (params, state, loss)`` per method (batch from ``i``)."""
  data_key = jax.random.key(10_000 + seed)
  batch_of = lambda i: sample_batch(jax.random.fold_in(data_key, i), n_int, n_bd)
  adam_tx = optax.adam(ADAM["learning_rate"])
  metric = riemod.metrics.identity()

  def curvature_step(geometry):
    tx = optax.chain(
        riemod.natural_gradient(1.0, geometry=geometry, momentum=RIEMOD["momentum"],
                                on_nonfinite="ignore"),
        riemod.scale_by_grid_linesearch(**LINE_SEARCH))

    @jax.jit
    def step(params, state, i):
      batch = batch_of(i)
      loss_of = lambda p: half_mean_square(residuals(p, batch))
      value, grads, curvature = riemod.value_grad_and_curvature(
          residuals, batch, half_mean_square, metric, params=params)
      updates, state = tx.update(grads, state, params, curvature=curvature, value=value,
                                 value_fn=loss_of)
      return optax.apply_updates(params, updates), state, value

    return step, tx

  riemod_step, riemod_tx = curvature_step(
      riemod.Geometry(mass=RIEMOD["mass"], structure="full", space="sample"))
  nystrom_step, nystrom_tx = curvature_step(riemod.Geometry(
      mass=RIEMOD["mass"], structure="full", space="nystrom", rank=nystrom_rank,
      oversampling=NYSTROM["oversampling"], seed=seed))

  @jax.jit
  def dense_step(params, state, i):
    batch = batch_of(i)
    loss_of = lambda p: half_mean_square(residuals(p, batch))
    flat, unravel = ravel_pytree(params)
    n = batch[0].shape[0]

    def r_one(theta, z, inside, w):
      return residuals(unravel(theta), (z[None], inside[None], w[None]))[0, 0]

    r = jax.vmap(r_one, (None, 0, 0, 0))(flat, *batch) / jnp.sqrt(n)
    jac = jax.vmap(jax.grad(r_one), (None, 0, 0, 0))(flat, *batch) / jnp.sqrt(n)
    gram = jac.T @ jac + RIEMOD["mass"] * jnp.eye(flat.size, dtype=flat.dtype)
    direction = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram, lower=True),
                                           jac.T @ r)
    return line_search(loss_of, params, direction), state, 0.5 * r @ r

  @jax.jit
  def adam_step(params, state, i):
    batch = batch_of(i)
    value, grads = jax.value_and_grad(lambda p: half_mean_square(residuals(p, batch)))(params)
    updates, state = adam_tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  return {"riemod": (riemod_step, riemod_tx), "riemod-nystrom": (nystrom_step, nystrom_tx),
          "dense-gn": (dense_step, None), "adam": (adam_step, adam_tx)}


def flops(d: int, n: int) -> dict:
  """Multiply-adds of the two solves' dominant terms (forming the Gram/kernel, Cholesky)."""
  return {"sample_space": d * d * n + d**3 / 3, "parameter_space": n * n * d + n**3 / 3,
          "ratio": (n * n * d + n**3 / 3) / (d * d * n + d**3 / 3)}


# --------------------------------------------------------------------------- runs
def _log(msg):
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(out: Path, n_int: int, n_bd: int, budget_s: float, max_steps: int, seed: int = 0,
        quick: bool = False, nystrom_rank: int = NYSTROM["rank"]) -> dict:
  started = time.perf_counter()
  machine = harness.machine_info()
  steps = make_steps(n_int, n_bd, seed, nystrom_rank)
  params0 = init_params(seed)
  n = sum(x.size for x in jax.tree.leaves(params0))
  d = n_int + n_bd
  test = jax.random.uniform(jax.random.key(777), (NUM_TEST, DIM), jnp.float64)
  u_test = u_exact(test)
  rel_l2 = jax.jit(lambda p: jnp.linalg.norm(jax.vmap(lambda z: network(p, z))(test) - u_test)
                   / jnp.linalg.norm(u_test))
  states = {name: (params0, tx.init(params0) if tx is not None else ())
            for name, (_, tx) in steps.items()}
  compile_s = {}
  for name, (step, _) in steps.items():
    t0 = time.perf_counter()
    jax.block_until_ready(step(*states[name], 0))
    compile_s[name] = time.perf_counter() - t0
    _log(f"compiled {name} in {compile_s[name]:.1f} s")

  # 1. Equal accuracy: dense and riemod from the same init, same batches, in lockstep.
  agree, dense_times, check_times = [], [], []
  p_r, s_r = states["riemod"]
  p_d, s_d = states["dense-gn"]
  for i in range(DENSE_CHECK_STEPS):
    t = time.perf_counter()
    p_r, s_r, _ = jax.block_until_ready(steps["riemod"][0](p_r, s_r, i))
    check_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    p_d, s_d, _ = jax.block_until_ready(steps["dense-gn"][0](p_d, s_d, i))
    dense_times.append(time.perf_counter() - t)
    a, b = ravel_pytree(p_r)[0], ravel_pytree(p_d)[0]
    agree.append({"step": i + 1, "param_rel_diff": float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)),
                  "rel_l2_riemod": float(rel_l2(p_r)), "rel_l2_dense": float(rel_l2(p_d))})
    _log(f"lockstep {agree[-1]}; riemod {check_times[-1]:.2f} s, dense {dense_times[-1]:.2f} s")

  # 2. Interleaved step times on the same state and batch.
  rounds, burst = (2, 1) if quick else (3, 2)
  timing = harness.time_interleaved(
      {name: (step, (*states[name], 1)) for name, (step, _) in steps.items()},
      rounds=rounds, burst=burst, reference="riemod")
  _log("interleaved: " + ", ".join(f"{k} {v['median_seconds']:.3f} s (x{v['ratio']:.1f})"
                                   for k, v in timing.items()))

  # 3. Curves: riemod (exact, then Nystrom) until the budget (or max_steps), Adam for at least
  # riemod's step time.
  runs = {}
  for name in ("riemod", "riemod-nystrom", "adam"):
    step = steps[name][0]
    params, state = states[name]
    curve = {"step": [0], "seconds": [0.0], "rel_l2": [float(rel_l2(params))], "loss": [math.nan]}
    times, i = [], 0
    curvature_method = name.startswith("riemod")
    limit = budget_s if curvature_method else max(budget_s, runs["riemod"]["total_step_seconds"])
    limit_steps = max_steps if curvature_method else 10**9
    while i < limit_steps and sum(times) < limit:
      t = time.perf_counter()
      params, state, value = step(params, state, i)
      jax.block_until_ready((params, value))
      times.append(time.perf_counter() - t)
      i += 1
      every = EVAL_EVERY if curvature_method else EVAL_EVERY * 20
      if i % every == 0:
        curve["step"].append(i)
        curve["seconds"].append(sum(times))
        curve["rel_l2"].append(float(rel_l2(params)))
        curve["loss"].append(float(value))
        if curvature_method and i % (5 * every) == 0:
          _log(f"{name} step {i}: rel L2 {curve['rel_l2'][-1]:.3g} ({sum(times):.0f} s)")
        if not math.isfinite(curve["rel_l2"][-1]):
          break
    if curve["step"][-1] != i:
      curve["step"].append(i)
      curve["seconds"].append(sum(times))
      curve["rel_l2"].append(float(rel_l2(params)))
      curve["loss"].append(float(value))
    runs[name] = {"optimizer": name, "seed": seed, "curve": curve, "steps_run": i,
                  "total_step_seconds": sum(times), "median_step_seconds": statistics.median(times),
                  "final": {"rel_l2": curve["rel_l2"][-1]},
                  "best_rel_l2": min(v for v in curve["rel_l2"] if math.isfinite(v)),
                  "compile_seconds": compile_s[name], "thresholds": {}}
    for level in LEVELS:
      hit = next((k for k, v in enumerate(curve["rel_l2"]) if v <= level), None)
      runs[name]["thresholds"][f"rel_l2<={level:g}"] = {
          "steps": None if hit is None else curve["step"][hit],
          "seconds": None if hit is None else curve["seconds"][hit]}
    _log(f"{name}: {i} steps, {sum(times):.0f} s, rel L2 {curve['rel_l2'][-1]:.3g} "
         f"(best {runs[name]['best_rel_l2']:.3g})")

  # The dense method's time to each level: riemod's steps (the same steps) x its interleaved step
  # time (the lockstep steps ran one after the other, so their times are not comparable).
  dense_step_s = timing["dense-gn"]["median_seconds"]
  riemod_step_s = timing["riemod"]["median_seconds"]
  dense = {"optimizer": "dense-gn", "steps_run": DENSE_CHECK_STEPS, "lockstep": agree,
           "lockstep_step_seconds": dense_times, "riemod_lockstep_step_seconds": check_times,
           "median_step_seconds": dense_step_s, "compile_seconds": compile_s["dense-gn"],
           "thresholds": {}}
  for key, hit in runs["riemod"]["thresholds"].items():
    steps_hit = hit["steps"]
    dense["thresholds"][key] = {"steps": steps_hit,
                                "seconds": None if steps_hit is None else steps_hit * dense_step_s}
  key = f"rel_l2<={TARGET_LEVEL:g}"
  riemod_hit = runs["riemod"]["thresholds"][key]["seconds"]
  # like-for-like: both from the interleaved step times (riemod's curve seconds include load spikes)
  riemod_hit_interleaved = (None if runs["riemod"]["thresholds"][key]["steps"] is None
                            else runs["riemod"]["thresholds"][key]["steps"] * riemod_step_s)
  payload = {
      "task": NAME, "dim": DIM, "sizes": SIZES, "parameters": n, "interior_points": n_int,
      "boundary_points": n_bd, "rows_d": d, "mass": RIEMOD["mass"], "line_search": LINE_SEARCH,
      "nystrom": NYSTROM | {"rank": nystrom_rank},
      "adam": ADAM, "seed": seed, "budget_s": budget_s, "max_steps": max_steps, "quick": quick,
      "flops": flops(d, n), "interleaved": timing, "compile_seconds": compile_s,
      "runs": [runs["riemod"], runs["riemod-nystrom"], runs["adam"]], "dense": dense,
      "step_ratio_dense_to_riemod": timing["dense-gn"]["ratio"],
      "time_to_target": {"level": TARGET_LEVEL, "riemod_curve_s": riemod_hit,
                         "riemod_interleaved_s": riemod_hit_interleaved,
                         "dense_s": dense["thresholds"][key]["seconds"]},
      "machine": machine, "loadavg_end": harness.machine_info()["loadavg"],
      "wall_seconds": time.perf_counter() - started}
  write(out, payload)
  return payload


def write(out: Path, payload: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  harness.write_json(out / f"{NAME}.json", payload)
  t, f = payload["interleaved"], payload["flops"]
  ratio = payload["step_ratio_dense_to_riemod"]
  tt = payload["time_to_target"]
  target_ratio = (tt["riemod_interleaved_s"] / tt["dense_s"]
                  if tt["riemod_interleaved_s"] and tt["dense_s"] else None)
  header = ["method", "steps run", "final rel. L2", "best rel. L2"] + [
      f"steps to {lv:g}" for lv in LEVELS] + [f"s to {lv:g}" for lv in LEVELS] + [
      "median step s", "compile s"]
  rows = []
  for r in payload["runs"] + [payload["dense"]]:
    rows.append([r["optimizer"], r["steps_run"], r.get("final", {}).get("rel_l2"),
                 r.get("best_rel_l2")]
                + [r["thresholds"][f"rel_l2<={lv:g}"]["steps"] for lv in LEVELS]
                + [r["thresholds"][f"rel_l2<={lv:g}"]["seconds"] for lv in LEVELS]
                + [r["median_step_seconds"], r["compile_seconds"]])
  m = payload["machine"]
  check = payload["dense"]["lockstep"]
  lines = [
      f"# {NAME}", "",
      f"5-D Poisson PINN, MLP {'-'.join(map(str, payload['sizes']))} tanh (n = "
      f"{payload['parameters']} parameters), float64, seed {payload['seed']}; per step a fresh batch "
      f"of {payload['interior_points']} interior + {payload['boundary_points']} boundary points "
      f"(d = {payload['rows_d']} rows); mass {payload['mass']:g}, line search "
      f"`{payload['line_search']}`; riemod-nystrom: the kernel sketched at rank "
      f"{payload['nystrom']['rank']} + {payload['nystrom']['oversampling']} test vectors; riemod "
      f"(each variant) run for {payload['budget_s']:g} s of step time (at most "
      f"{payload['max_steps']} steps), Adam (`{payload['adam']}`) for at least as long. "
      "Seconds are step time only (compilation and evaluation excluded).", "",
      harness.markdown_table(header, rows), "",
      f"dense-gn row: {payload['dense']['steps_run']} steps run in lockstep with riemod (same "
      "batches, same mass; the Woodbury identity makes them the same step): relative parameter "
      "difference after each " + ", ".join(f"{c['param_rel_diff']:.1e}" for c in check)
      + " (round-off, amplified from step to step), rel. L2 "
      + ", ".join(f"{c['rel_l2_riemod']:.4g} vs {c['rel_l2_dense']:.4g}" for c in check)
      + ". Its steps to each level are riemod's and its seconds those steps times its interleaved "
      "step time: an estimate, not a run to the level (a dense step costs minutes of this "
      "machine). Its median step s is the interleaved one.", "",
      "Interleaved step times on one state and batch (median seconds; ratio to riemod, spread): "
      + ", ".join(f"{k} {v['median_seconds']:.3f} s (x{v['ratio']:.2f}, "
                  f"{v['ratio_spread'][0]:.2f}-{v['ratio_spread'][1]:.2f})" for k, v in t.items())
      + ".", "",
      f"- step: dense / riemod = **{ratio:.1f}x** (target >= 10x: "
      f"{'met' if ratio >= 10 else 'NOT met'}); multiply-adds d^2 n + d^3/3 = "
      f"{f['sample_space']:.2e} vs n^2 d + n^3/3 = {f['parameter_space']:.2e} "
      f"({f['ratio']:.1f}x).",
      f"- time to rel. L2 {tt['level']:g}: riemod {harness.fmt(tt['riemod_interleaved_s'])} s "
      f"(steps x interleaved step time; {harness.fmt(tt['riemod_curve_s'])} s on its curve), "
      f"dense {harness.fmt(tt['dense_s'])} s: ratio {harness.fmt(target_ratio)} (target <= 0.2: "
      + ("not reached" if target_ratio is None else ("met" if target_ratio <= 0.2 else "NOT met"))
      + ").", "",
      f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, load {m['loadavg']} -> "
      f"{payload['loadavg_end']}, git {m.get('git')}, versions {m['versions']}.", ""]
  (out / f"{NAME}.md").write_text("\n".join(lines))
  plot(out / f"{NAME}_rel_l2.png", payload)


def plot(path: Path, payload: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for k, r in enumerate(payload["runs"]):
    c = r["curve"]
    axes[0].semilogy(c["step"], c["rel_l2"], color=f"C{k}", label=r["optimizer"])
    axes[1].semilogy(c["seconds"], c["rel_l2"], color=f"C{k}", label=r["optimizer"])
  riemod_curve = payload["runs"][0]["curve"]
  dense_s = payload["dense"]["median_step_seconds"]
  axes[1].semilogy([s * dense_s for s in riemod_curve["step"]], riemod_curve["rel_l2"], color="C3",
                   ls="--", label="dense-gn (riemod's iterates x its step time)")
  for ax, x in zip(axes, ("step", "seconds (step time only)")):
    ax.axhline(TARGET_LEVEL, color="gray", lw=0.8, ls=":")
    ax.set_xlabel(x)
    ax.legend(fontsize=8)
  axes[1].set_xscale("log")
  axes[0].set_ylabel("relative L2 error")
  fig.suptitle(f"{NAME}: n = {payload['parameters']} parameters, d = {payload['rows_d']} rows per step")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--interior", type=int, default=1000,
                      help="interior points per step (default: %(default)s)")
  parser.add_argument("--boundary", type=int, default=200,
                      help="boundary points per step (default: %(default)s)")
  parser.add_argument("--budget", type=float, default=600.0,
                      help="riemod's step-time budget in s; Adam gets as long (default: %(default)s)")
  parser.add_argument("--max-steps", type=int, default=2000,
                      help="riemod's step cap (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0, help="init and batch seed (default: %(default)s)")
  parser.add_argument("--nystrom-rank", type=int, default=NYSTROM["rank"],
                      help="rank of riemod-nystrom's kernel sketch (default: %(default)s)")
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run: 200 + 50 points, 20 s budget")
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS,
                      help="results folder (default: %(default)s)")
  args = parser.parse_args(argv)
  if args.quick:
    args.interior, args.boundary, args.budget, args.max_steps = 200, 50, 20.0, 200
    args.nystrom_rank = min(args.nystrom_rank, 60)
  payload = run(args.out, args.interior, args.boundary, args.budget, args.max_steps, args.seed,
                args.quick, args.nystrom_rank)
  print(json.dumps({k: payload[k] for k in ("step_ratio_dense_to_riemod", "time_to_target")}))


if __name__ == "__main__":
  main()

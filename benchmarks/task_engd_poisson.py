"""engd-poisson: the energy natural gradient paper's 2-D Poisson problem, riemod beside the authors'
method, both jitted, run in lockstep on the same machine.

Problem (:mod:`riemod.cli._pinn`, exactly the paper's): ``u* = sin(pi x) sin(pi y)`` on the unit
square, MLP 2-32-1 tanh (129 parameters, init ``0.1 N(0, 1)``), the 28 x 28 interior grid (784
points) and 4 x 29 boundary points, loss ``mean_int (Lap u + f)^2 + 4 mean_bd u^2``, absolute L2
error on the 198 x 198 interior grid, float64, 200 iterations.

Methods:

* ``engd-authors``: the authors' algorithm (Mueller & Zeinhofer, ICML 2023) implemented faithfully
  and jitted as one step: the dense Gram matrix ``mean_int dLap u dLap u^T + 4 mean_bd du du^T`` of
  the full residual Jacobian (per-point ``jax.grad``, vmapped), the direction from
  ``jnp.linalg.lstsq`` (a pseudo-inverse with lstsq's default cut-off; a NaN direction becomes
  zero, as in their code), and their line search: the best of ``0.5**k, k = 0..30`` by the loss.
* ``riemod``: ``riemod.natural_gradient`` (tiny constant mass, optional SPRING momentum, optional
  truncated pseudo-inverse ``Geometry(cutoff=)``: directions whose eigenvalue of ``K^T K`` is below
  ``cutoff`` times the largest are dropped, the rest solved with the mass, by an SVD of ``K``)
  chained with ``riemod.scale_by_grid_linesearch`` over the same 31 step sizes; riemod's metric is
  the Gauss-Newton matrix of ``0.5 mean(r^2)``, twice the paper's Gram, so its grid starts at 2
  (``2 * 0.5**k`` is the authors' ``0.5**k`` step). Optionally wrapped in
  ``riemod.levenberg_marquardt`` (the headline): the mass moves between 1e-12 and 1e-8 by factors
  of 10 from the ratio of the searched step's decrease to the quadratic model's best decrease along
  it. Configurations in ``RIEMOD_GRID``, tuned on seeds 100..105 (score: the median final error),
  reported on seeds 0, 1, 2.

Both methods start from the same parameters for a seed (``jax.random.key(seed)`` in the paper's key
layout, today's default random stream); ``paper`` is seed 0 drawn with the random stream the paper
ran (``jax_threefry_partitionable`` off), reported beside. For every init the two methods step in
lockstep (iteration ``i`` of one, then of the other, each timed after ``block_until_ready``; the
error is evaluated every ``EVAL_EVERY`` iterations and not timed; compilation excluded), so a load
spike from another process hits both. Step-time ratios come from an interleaved re-timing
(:func:`harness.interleaved_step_times`, reference ``engd-authors``).

Target (issue 14): riemod reaches absolute L2 <= 1e-7 on 3 of 3 inits within 200 iterations, in
less wall time than the authors' method.

Run: ``python -m benchmarks.task_engd_poisson [--quick] [--out DIR]``.
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
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import riemod  # noqa: E402
from benchmarks import harness  # noqa: E402
from riemod.cli import _pinn  # noqa: E402

NAME = "engd-poisson"
ITERATIONS = 200
EVAL_EVERY = 5
TARGET = 1e-7
LEVELS = [1e-3, 1e-5, 1e-6, 1e-7]
TUNING_SEEDS = (100, 101, 102, 103, 104, 105)
REPORT_SEEDS = (0, 1, 2)
AUTHORS_STEPS = tuple(0.5**k for k in range(31))  # the paper's grid line search
# riemod's line search: the same 31 step sizes, doubled (riemod's metric is twice the paper's Gram).
LINE_SEARCH = {"max_step": 2.0, "factor": 0.5, "num": 31}

# riemod's configurations (first: the headline), scored on TUNING_SEEDS. Explored on seeds 100..113
# before this grid was fixed (final abs. L2 <= 1e-7 after 200 iterations, of 14 seeds):
# * cut-off 1e-14 with a constant mass 1e-12 (the previous headline): converges to 2e-8..1e-7 when
#   it leaves the u ~ 0 plateau, but stays on it from some inits (seeds 104, 105: 7.8e-3, 0.36);
#   a constant mass 1e-8 leaves the plateau from every init but creeps at 1e-6..1e-5 (the
#   line search picks 1/8 of the step, ratio ~0.13); smaller masses (1e-9..1e-10) or fixed
#   schedules from 1e-8 down stall (earlier runs of this file).
# * riemod.levenberg_marquardt around the cut-off solve, mass 1e-12 * [1, 1e4], factors 10 / 0.1,
#   ratio thresholds 0.01 / 0.5: 11/14 (the rest: 1.3e-7, 5.7e-7, 2.8e-6, still converging at
#   iteration 200); thresholds 0.05 / 0.5: 8/14; 0.01 / 0.75: 7/14; factors 4 / 0.25 with 0.05 /
#   0.5: 1/6; scale up to 1e5: 10/14; the same rule with a 16-point grid: 1/14 (the tiny steps
#   matter on the plateau); with SPRING momentum 0.3 / 0.45 / 0.6 / 0.8 / 0.9: 10 / 10 / 12 / 6 /
#   10 of 14 (which seeds fail changes from one setting to the next; 0.6 scores a worse median on
#   the tuning seeds than no momentum, 4.2e-8 against 2.9e-8, so it is not in the grid).
# * Rules that tie the mass to the loss instead (mass 1e-8 (l / l_0)^p, p = 0.5..1, or a switch
#   from 1e-8 to 1e-12 once l < 1e-6..1e-10 l_0) and a Fan-Yuan mix of both: 0/6..3/6 (the switch
#   to the Gauss-Newton step from where the damped iteration got to freezes at 1e-5..1e-3).
LM = dict(lower=0.01, upper=0.5, increase=10.0, decrease=0.1, min_scale=1.0, max_scale=1e4)
RIEMOD_GRID = [
    dict(mass=1e-12, momentum=None, cutoff=1e-14, lm=LM),
    dict(mass=1e-12, momentum=None, cutoff=1e-14),
    dict(mass=1e-8, momentum=None),
    dict(mass=1e-12, momentum=None, cutoff=1e-14, lm=dict(LM, lower=0.05)),
]


# --------------------------------------------------------------------------- the two methods
def authors_step(prob: _pinn.Problem):
  """The authors' ENGD iteration as one jitted function ``(params, ()) -> (params, (), loss)``."""
  steps = jnp.asarray(AUTHORS_STEPS)
  n_int, n_bd = prob.interior.shape[0], prob.boundary.shape[0]

  @jax.jit
  def step(params, state):
    flat, unravel = ravel_pytree(params)
    loss_of = lambda theta: _pinn.loss(unravel(theta), prob)
    d_lap = jax.vmap(jax.grad(lambda theta, z: _pinn.laplacian(unravel(theta), z)), (None, 0))
    d_u = jax.vmap(jax.grad(lambda theta, z: _pinn.network(unravel(theta), z)), (None, 0))
    j_int, j_bd = d_lap(flat, prob.interior), d_u(flat, prob.boundary)
    gram = j_int.T @ j_int / n_int + _pinn.BOUNDARY_WEIGHT * (j_bd.T @ j_bd) / n_bd
    value, grad = jax.value_and_grad(loss_of)(flat)
    direction = jnp.linalg.lstsq(gram, grad)[0]  # default cut-off: eps * max(shape) * s_max
    direction = jnp.where(jnp.isnan(direction[0]), jnp.zeros_like(direction), direction)
    losses = jax.vmap(lambda a: loss_of(flat - a * direction))(steps)
    size = steps[jnp.argmin(losses)]
    return unravel(flat - size * direction), state, value

  return step


def riemod_transform(config: dict):
  """riemod's ENGD: Gauss-Newton step (unchecked, as the authors' step) + the 31-point search,
  wrapped in :func:`riemod.levenberg_marquardt` when the configuration has an ``lm`` entry."""
  geometry = riemod.Geometry(mass=config["mass"], structure="full",
                             space=config.get("space", "auto"), cutoff=config.get("cutoff"))
  tx = optax.chain(
      riemod.natural_gradient(1.0, geometry=geometry, momentum=config.get("momentum"),
                              on_nonfinite="ignore"),
      riemod.scale_by_grid_linesearch(**LINE_SEARCH))
  if config.get("lm") is not None:
    tx = riemod.levenberg_marquardt(tx, geometry, **config["lm"])
  return tx


def initial_params(seed):
  """Seed ``"paper"``: seed 0 from the random stream the paper ran on."""
  if seed == "paper":
    with jax.threefry_partitionable(False):
      return _pinn.init_params(0)
  return _pinn.init_params(seed)


def trainer(method: str, config: dict | None, prob: _pinn.Problem, cache: dict) -> harness.Trainer:
  key = method + json.dumps(config, sort_keys=True)
  if key not in cache:
    if method == "engd-authors":
      cache[key] = (None, authors_step(prob))
    else:
      tx = riemod_transform(config)
      cache[key] = (tx, _pinn.riemod_step(tx, prob))
  tx, step = cache[key]
  error = cache.setdefault("error", jax.jit(lambda p: _pinn.l2_error(p, prob)))
  loss = cache.setdefault("loss", jax.jit(lambda p: _pinn.loss(p, prob)))

  def one_step(state, i):
    params, opt_state, value = step(*state)
    return (params, opt_state), value

  def evaluate(s):
    out = {"l2": float(error(s[0])), "loss": float(loss(s[0]))}
    if method == "riemod":  # the search's step size, the LM ratio and mass scale, when present
      search = riemod.find_state(s[1], riemod.GridLinesearchState)
      lm = riemod.find_state(s[1], riemod.LevenbergMarquardtState)
      out["step_size"] = float(search.step_size)
      out["mass"] = config["mass"] * float(
          riemod.find_state(s[1], riemod.MetricState).geometry.mass_scale)
      if lm is not None:
        out["lm_ratio"] = float(lm.ratio)
    return out

  return harness.Trainer(method, config or {}, lambda: None, one_step, evaluate)


def fresh_state(t: harness.Trainer, seed, cache: dict):
  params = initial_params(seed)
  tx = cache[t.name + json.dumps(t.hyper or None, sort_keys=True)][0] if t.name != "engd-authors" \
      else None
  return params, (tx.init(params) if tx is not None else ())


# --------------------------------------------------------------------------- where the time goes
def profile_components(prob: _pinn.Problem, config: dict, seed=0, rounds: int = 7,
                       repeats: int = 10) -> dict:
  """Milliseconds of each part of both steps, each part jitted alone, timed in interleaved rounds
  (every round times every part ``repeats`` times; median and range over rounds). Parts of one
  step do not add up to the whole step exactly (XLA fuses across parts in the whole step)."""
  params = initial_params(seed)
  flat, unravel = ravel_pytree(params)
  loss_flat = lambda theta: _pinn.loss(unravel(theta), prob)
  steps = jnp.asarray(AUTHORS_STEPS)

  @jax.jit
  def gram_of(theta):
    d_lap = jax.vmap(jax.grad(lambda th, z: _pinn.laplacian(unravel(th), z)), (None, 0))
    d_u = jax.vmap(jax.grad(lambda th, z: _pinn.network(unravel(th), z)), (None, 0))
    j_int, j_bd = d_lap(theta, prob.interior), d_u(theta, prob.boundary)
    return (j_int.T @ j_int / prob.interior.shape[0]
            + _pinn.BOUNDARY_WEIGHT * (j_bd.T @ j_bd) / prob.boundary.shape[0])

  value_and_grad = jax.jit(jax.value_and_grad(loss_flat))
  lstsq = jax.jit(lambda gram, g: jnp.linalg.lstsq(gram, g)[0])
  search = jax.jit(lambda theta, d: jax.vmap(lambda a: loss_flat(theta - a * d))(steps))
  gram, (_, g) = gram_of(flat), value_and_grad(flat)
  curvature_of = jax.jit(lambda p: riemod.value_grad_and_curvature(
      _pinn.residuals, prob.batch, _pinn.half_mean_square, riemod.metrics.identity(), params=p))
  value, grads, curvature = curvature_of(params)
  geometry = riemod.Geometry(mass=config["mass"], structure="full", cutoff=config.get("cutoff"))
  solve = riemod.natural_gradient(1.0, geometry=geometry, on_nonfinite="ignore")
  solve_state = solve.init(params)
  # Arguments, not closed-over constants: XLA would fold the K^T K product at compile time.
  solve_update = jax.jit(lambda g, s, p, c: solve.update(g, s, p, curvature=c))
  solve_step = lambda: solve_update(grads, solve_state, params, curvature)
  plain = riemod_transform({k: v for k, v in config.items() if k != "lm"})
  with_lm = riemod_transform(config)
  plain_step, lm_step = _pinn.riemod_step(plain, prob), _pinn.riemod_step(with_lm, prob)
  plain_state, lm_state = plain.init(params), with_lm.init(params)
  parts = {
      "authors: whole step": lambda: authors_step_cache(prob)(params, ()),
      "authors: Jacobian rows + Gram": lambda: gram_of(flat),
      "authors: value_and_grad": lambda: value_and_grad(flat),
      "authors: lstsq (129 x 129)": lambda: lstsq(gram, g),
      "authors / riemod: 31-point search (paper's loss)": lambda: search(flat, g),
      "riemod: whole step (with levenberg_marquardt)": lambda: lm_step(params, lm_state),
      "riemod: whole step (without)": lambda: plain_step(params, plain_state),
      "riemod: value_grad_and_curvature": lambda: curvature_of(params),
      "riemod: natural_gradient (rows, K^T K, eigh 129 x 129, step)": solve_step,
  }
  for f in parts.values():
    jax.block_until_ready(f())
  times = {k: [] for k in parts}
  for _ in range(rounds):
    for name, f in parts.items():
      start = time.perf_counter()
      for _ in range(repeats):
        jax.block_until_ready(f())
      times[name].append(1e3 * (time.perf_counter() - start) / repeats)
  return {name: {"median_ms": statistics.median(t), "range_ms": [min(t), max(t)]}
          for name, t in times.items()}


_AUTHORS_STEPS: dict = {}


def authors_step_cache(prob: _pinn.Problem):
  """One compiled authors' step per problem (the profile's whole step)."""
  return _AUTHORS_STEPS.setdefault(id(prob), authors_step(prob))


# --------------------------------------------------------------------------- lockstep runs
def lockstep(trainers: list[harness.Trainer], seed, cache: dict, iterations: int) -> list[dict]:
  """Runs the trainers from the same init in lockstep; one result dict per trainer."""
  states, out = [], []
  for t in trainers:
    t0 = time.perf_counter()  # compile: one step on a throw-away state
    jax.block_until_ready(t.step(fresh_state(t, seed, cache), 0))
    states.append(fresh_state(t, seed, cache))
    first = t.evaluate(states[-1])
    out.append({"optimizer": t.name, "hyperparameters": t.hyper, "seed": seed,
                "compile_seconds": time.perf_counter() - t0, "times": [],
                "curve": {"step": [0], "seconds": [0.0]} | {k: [v] for k, v in first.items()}})
  for i in range(iterations):
    for j, t in enumerate(trainers):
      start = time.perf_counter()
      states[j], value = t.step(states[j], i)
      jax.block_until_ready((states[j], value))
      out[j]["times"].append(time.perf_counter() - start)
    if (i + 1) % EVAL_EVERY == 0 or i + 1 == iterations:
      for j, t in enumerate(trainers):
        metrics = t.evaluate(states[j])
        curve = out[j]["curve"]
        curve["step"].append(i + 1)
        curve["seconds"].append(sum(out[j]["times"]))
        for k, v in metrics.items():
          curve[k].append(v)
  for r, state in zip(out, states):
    times = r.pop("times")
    curve = r["curve"]
    r["final"] = {k: curve[k][-1] for k in ("l2", "loss")}
    r["best_l2"] = min(v for v in curve["l2"] if math.isfinite(v))
    r["total_step_seconds"] = sum(times)
    r["median_step_seconds"] = statistics.median(times)
    r["thresholds"] = {}
    for level in LEVELS:
      hit = next((k for k, v in enumerate(curve["l2"]) if v <= level), None)
      r["thresholds"][f"l2<={level:g}"] = {
          "steps": None if hit is None else curve["step"][hit],
          "seconds": None if hit is None else curve["seconds"][hit]}
    r["diverged"] = not math.isfinite(r["final"]["l2"])
    r["_state"] = state
  return out


def tune(prob, cache, grid, iterations) -> dict:
  """riemod's configuration with the best median final error on the tuning seeds."""
  if len(grid) == 1:
    return {"hyperparameters": grid[0], "scores": "single setting (not tuned)"}
  results = []
  for config in grid:
    for seed in TUNING_SEEDS:
      r = lockstep([trainer("riemod", config, prob, cache)], seed, cache, iterations)[0]
      r.pop("_state")
      results.append(r)
      _log(f"tune riemod {config} seed {seed}: final l2 {r['final']['l2']:.3g}")
  pick = harness.pick_best(results, lambda r: r["final"]["l2"])
  pick["runs"] = [{k: r[k] for k in ("hyperparameters", "seed", "final", "total_step_seconds")}
                  for r in results]
  return pick


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- report
def run(out: Path, quick: bool = False) -> dict:
  started = time.perf_counter()
  machine = harness.machine_info()
  prob, cache = _pinn.problem(), {}
  grid = RIEMOD_GRID[:1] if quick else RIEMOD_GRID
  chosen = tune(prob, cache, grid, ITERATIONS)
  config = chosen["hyperparameters"]
  _log(f"riemod configuration: {config}")
  methods = [trainer("engd-authors", None, prob, cache), trainer("riemod", config, prob, cache)]
  seeds = (0,) if quick else REPORT_SEEDS + ("paper",)
  runs = []
  for seed in seeds:
    pair = lockstep(methods, seed, cache, ITERATIONS)
    for r in pair:
      _log(f"{r['optimizer']} seed {seed}: l2 {r['final']['l2']:.3g} (best {r['best_l2']:.3g}), "
           f"{r['total_step_seconds']:.2f} s for {ITERATIONS} iterations")
    runs += pair
  finals = [r.pop("_state") for r in runs if r["seed"] == seeds[0]]
  rounds, burst = (3, 5) if quick else (7, 10)
  timing = harness.interleaved_step_times(methods, finals, rounds=rounds, burst=burst,
                                          reference="engd-authors")
  for entry in timing["optimizers"].values():  # the harness names every ratio "to adam"
    entry["ratio_to_authors"] = entry.pop("ratio_to_adam", None)
  for r in runs:
    r.pop("_state", None)
  _log("profiling the parts of both steps")
  profile = profile_components(prob, config, rounds=3 if quick else 7)
  payload = {"task": NAME, "iterations": ITERATIONS, "target_l2": TARGET, "levels": LEVELS,
             "quick": quick, "tuning_seeds": list(TUNING_SEEDS), "report_seeds": list(seeds),
             "riemod_grid": grid, "line_search": LINE_SEARCH, "chosen": chosen, "runs": runs,
             "interleaved_timing": timing, "profile_ms": profile, "verdict": verdict(runs, seeds), "machine": machine,
             "loadavg_end": harness.machine_info()["loadavg"],
             "wall_seconds": time.perf_counter() - started}
  write(out, payload)
  return payload


def verdict(runs, seeds) -> dict:
  """The issue's two conditions on the reported (numbered) seeds."""
  numbered = [s for s in seeds if s != "paper"]
  by = {(r["optimizer"], r["seed"]): r for r in runs}
  hits = [by[("riemod", s)]["final"]["l2"] <= TARGET for s in numbered]
  faster = [by[("riemod", s)]["total_step_seconds"] < by[("engd-authors", s)]["total_step_seconds"]
            for s in numbered]
  return {"riemod_inits_at_target": f"{sum(hits)}/{len(hits)}",
          "riemod_faster_inits": f"{sum(faster)}/{len(faster)}",
          "met": all(hits) and all(faster)}


def write(out: Path, payload: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  harness.write_json(out / f"{NAME}.json", payload)
  timing = payload["interleaved_timing"]["optimizers"]
  header = ["init", "method", "final abs. L2", "best abs. L2"] + [
      f"it. to {lv:g}" for lv in LEVELS[-2:]] + [f"s to {lv:g}" for lv in LEVELS[-2:]] + [
      f"s for {payload['iterations']} it.", "median step ms"]
  rows = []
  for r in payload["runs"]:
    th = r["thresholds"]
    rows.append([str(r["seed"]), r["optimizer"], r["final"]["l2"], r["best_l2"]]
                + [th[f"l2<={lv:g}"]["steps"] for lv in LEVELS[-2:]]
                + [th[f"l2<={lv:g}"]["seconds"] for lv in LEVELS[-2:]]
                + [r["total_step_seconds"], 1e3 * r["median_step_seconds"]])
  v, m = payload["verdict"], payload["machine"]
  ratio = timing["riemod"]["ratio_to_authors"]
  spread = timing["riemod"].get("ratio_spread")
  lines = [
      f"# {NAME}", "",
      "The ENGD paper's 2-D Poisson problem (2-32-1 tanh, 784 + 116 points, float64), "
      f"{payload['iterations']} iterations, both methods from the same init and stepped in "
      "lockstep. Seconds count step time only (compilation and error evaluation excluded). "
      "Init `paper` = seed 0 from the random stream the paper ran on (not part of the target).",
      "", harness.markdown_table(header, rows), "",
      f"Interleaved step-time ratio riemod / engd-authors: {harness.fmt(ratio)} "
      f"(spread over rounds {spread}); medians "
      + ", ".join(f"{n} {1e3 * t['median_step_seconds']:.2f} ms" for n, t in timing.items()) + ".",
      "",
      f"Target (<= {TARGET:g} on every numbered init, less wall time than the authors'): "
      f"riemod at target on {v['riemod_inits_at_target']} inits, faster on "
      f"{v['riemod_faster_inits']}: **{'met' if v['met'] else 'NOT met'}**.", "",
      f"riemod configuration (tuned on seeds {payload['tuning_seeds']}, median final error): "
      f"`{payload['chosen']['hyperparameters']}` + grid line search `{payload['line_search']}`."]
  scores = payload["chosen"].get("scores")
  if isinstance(scores, dict):
    lines += ["", "Tuning scores (median final abs. L2 on the tuning seeds):", ""]
    lines += [f"- `{h}`: {harness.fmt(s)}" for h, s in scores.items()]
  profile = payload.get("profile_ms")
  if profile:
    lines += ["", "Where the step time goes (each part jitted alone, init 0, interleaved rounds; "
              "median and range over rounds, ms; parts do not add up to the whole step exactly, "
              "XLA fuses across them):", "",
              harness.markdown_table(["part", "median ms", "range ms"], [
                  [k, v["median_ms"], f"{v['range_ms'][0]:.2f}-{v['range_ms'][1]:.2f}"]
                  for k, v in profile.items()])]
  lines += ["", f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, load {m['loadavg']} -> "
            f"{payload['loadavg_end']}, BLAS env {m['blas_env']}, git {m.get('git')}, versions "
            f"{m['versions']}.", ""]
  (out / f"{NAME}.md").write_text("\n".join(lines))
  plot(out / f"{NAME}_l2.png", payload["runs"])


def plot(path: Path, runs: list[dict]) -> None:
  """Error against iterations and against step seconds; colour per method, line style per init."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  colours, styles = {}, {}
  for r in runs:
    colour = colours.setdefault(r["optimizer"], f"C{len(colours)}")
    style = styles.setdefault(str(r["seed"]), ["-", "--", ":", "-."][len(styles) % 4])
    for ax, x in zip(axes, ("step", "seconds")):
      ax.semilogy(r["curve"][x], r["curve"]["l2"], color=colour, ls=style, lw=1.2,
                  label=f"{r['optimizer']} init {r['seed']}" if x == "step" else None)
  for ax, x in zip(axes, ("iteration", "seconds (step time only)")):
    ax.axhline(TARGET, color="gray", lw=0.8, ls=":")
    ax.set_xlabel(x)
  axes[0].set_ylabel("absolute L2 error")
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle(f"{NAME}: the ENGD paper's Poisson problem, riemod vs the authors' method")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="no tuning (first riemod setting), seed 0 only, shorter re-timing")
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS,
                      help="results folder (default: %(default)s)")
  args = parser.parse_args(argv)
  payload = run(args.out, args.quick)
  print(Path(args.out) / f"{NAME}.md", "written;", json.dumps(payload["verdict"]))


if __name__ == "__main__":
  main()

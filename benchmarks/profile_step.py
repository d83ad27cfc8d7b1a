"""Where riemod's step time goes: cumulative sub-parts of one step, each jitted and timed.

``python -m benchmarks.profile_step --task digits-mlp|digits-autoencoder|char-lm|poisson-pinn
[--config JSON] [--out DIR]``. For the issue-13 tasks the parts are nested prefixes of one
training step of the task's tuned riemod configuration (the better riemod row of the committed
results: the Kronecker-mass rows of ``digits-mlp_kronecker.md`` and
``digits-autoencoder_kronecker.md``; the char-LM's chosen setting in ``char-lm.md``), on one batch
of the task, so the differences between consecutive rows are the cost of each stage:

1. ``grad``: loss and gradient only (``jax.value_and_grad``, what Adam pays);
2. ``+ taps``: :func:`riemod.value_grad_and_curvature` (tapped forward, gradient VJP, the factor
   rows' VJPs, recorded inputs);
3. ``+ mass state``: :meth:`riemod.Geometry.advance` and the policy's ``rescale`` (the Kronecker
   mass: moving averages, Cholesky factors of ``A`` and ``S`` and their inverses, whitened
   features and cotangents; the adaptive mass: Adam's second moment);
4. ``+ kernels``: every block's matrix (``I + K D^{-1} K^T``, Gram-Hadamard, in sample space);
5. ``+ cholesky``: :meth:`riemod.Geometry.compose` (the kernels again and their Cholesky with the
   jitter check);
6. ``+ solve``: ``solve_with_residuals`` of the gradient (``K v``, triangular solves, ``K^T t``);
7. ``full riemod step``: the task's own jitted training step (clip, the transform's update with
   momentum and diagnostics, ``apply_updates``), exactly what the benchmark times;
8. the anchor's step (Adam, or the char-LM's AdamW), for scale.

For the char-LM the same step with every module in one block (``structure="full"``: one
``d x d`` kernel, the sum of the modules' kernels, one Cholesky) is timed beside it, which bounds
what the per-block work costs; the blocks, their ``d`` and parameter counts are listed.

Each part also gets XLA's operation count of its compiled program (``cost_analysis()["flops"]``;
XLA does not count the LAPACK calls, so the Cholesky's ``d^3 / 3`` per block and the triangular
solves' ``d^2`` per right-hand side are added analytically) and XLA's memory plan (arguments +
temporaries, not RSS), so a time can be checked against the arithmetic it does.

Each part runs in interleaved bursts (``rounds`` x ``burst`` calls, order rotated), timed after
``block_until_ready``; medians and the per-round ratio to the anchor are reported with
``os.getloadavg()`` (the machine is shared: ratios are the robust number).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import riemod
from benchmarks import harness, problems, riemod_config

TASKS = ("digits-mlp", "digits-autoencoder", "char-lm", "poisson-pinn")


class Problem(NamedTuple):
  """One task's step, split into the pieces the prefixes call."""

  config: dict  # recorded verbatim
  params: Any
  model: Callable  # params -> the model (callable on ``inputs``)
  inputs: Any
  loss_fn: Callable  # model outputs -> the batch loss
  metric: Any
  geometry: riemod.Geometry
  vgc_kwargs: dict
  full_step: tuple  # (jitted step of the benchmark, its arguments)
  anchor: tuple  # (name, jitted step, its arguments)
  one_block: tuple | None  # (geometry, jitted full step) with every module in one block


def _kronecker_row(grid):
  """The first Kronecker-mass configuration of a task's grid (the better committed riemod row)."""
  return next(c for c in grid if str(c.get("mass_policy", "")).startswith("kronecker"))


def digits_problem(task_name: str, config: dict | None = None) -> Problem:
  """digits-mlp / digits-autoencoder: batch 0 of seed 0, the task's own jitted steps."""
  from benchmarks import task_digits_autoencoder, task_digits_mlp
  module = task_digits_mlp if task_name == "digits-mlp" else task_digits_autoencoder
  # The committed results' better rows: riemod's Kronecker mass (28 steps to 0.05, 3/3 stable, in
  # digits-mlp_kronecker.md; 111 steps to 0.5 and final 0.245 in digits-autoencoder_kronecker.md),
  # Adam at its chosen rate (0.03 / 0.01: digits-mlp.md, digits-autoencoder.md).
  config = config or _kronecker_row(module.RIEMOD_GRID)
  adam_hyper = {"learning_rate": 0.03 if task_name == "digits-mlp" else 0.01}
  task = module.spec().make_trainer.__self__  # the task's MLPTask (data, model, compiled steps)
  tx, step = task._compiled("riemod", config)
  adam_tx, adam_step = task._compiled("adam", adam_hyper)
  _, metric, vgc_kwargs = riemod_config.build(config)
  _, params = nnx.split(task.model(0))
  idx = jnp.asarray(problems.batch_table(0, task.x_train.shape[0], task.batch_size, 1)[0])
  x, t = task.batch(idx)
  i, seed = jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.uint32)
  return Problem(
      config, params, lambda p: nnx.merge(task.graphdef, p), x, lambda out: task.loss(out, t),
      metric, riemod_config.geometry(config), dict(vgc_kwargs, key=jax.random.key(0)),
      (step, (params, tx.init(params), idx, i, seed)),
      ("adam step", adam_step, (params, adam_tx.init(params), idx, i, seed)), None)


def char_lm_problem(config: dict | None = None) -> Problem:
  """char-lm: the chosen riemod setting of char-lm.md (GRIDS' first entry) and AdamW's."""
  from benchmarks import task_char_lm as L
  task = L.CharLMTask(num_steps=1)
  hyper = config or L.GRIDS["riemod"][0]
  tx, step = task.compiled("riemod", hyper)
  adam_tx, adam_step = task.compiled("adam", L.GRIDS["adam"][0])
  _, params = nnx.split(task._model(0))
  starts = task.lm.batch_starts(len(task.train), 1, task.batch, task.context, 0)[0]
  x, y = map(jnp.asarray, task.lm.windows(task.train, starts, task.context))
  key = jax.random.key(0)
  # The metric and geometry of examples/transformer_lm.riemod_transform / riemod_step.
  geometry = riemod.Geometry(mass=hyper["mass"], mass_policy=riemod.masses.adaptive(0.99))
  one = riemod.Geometry(mass=hyper["mass"], mass_policy=riemod.masses.adaptive(0.99),
                        structure="full")
  schedule = optax.linear_schedule(0.0, hyper["learning_rate"], hyper["warmup"])
  one_tx = optax.chain(optax.clip_by_global_norm(hyper["clip"]), riemod.natural_gradient(
      schedule, geometry=one, momentum=hyper["momentum"], on_nonfinite="skip"))
  one_step = task.lm.riemod_step(task.graphdef, one_tx)
  return Problem(
      dict(hyper, structure="layerwise", output_metric="sampled_softmax_fisher:1",
           mass_policy="adaptive:0.99", batch=task.batch, context=task.context),
      params, lambda p: nnx.merge(task.graphdef, p), x,
      lambda logits: task.lm.cross_entropy(logits, y), riemod.metrics.sampled_softmax_fisher(1),
      geometry, {"key": key}, (step, (params, tx.init(params), x, y, key)),
      ("adamw step", adam_step, (params, adam_tx.init(params), x, y, key)),
      (one, (one_step, (params, one_tx.init(params), x, y, key))))


def _block_matrices(geometry: riemod.Geometry, curvature, state) -> list[jax.Array]:
  """The matrices :meth:`riemod.Geometry.compose` factors (one per block), without factoring."""
  from riemod.composer import metric as _metric, woodbury
  scaled, _ = geometry.mass_policy.rescale(curvature, state.moments, state.count)
  dtype = _metric._dtype_of(scaled)
  mass = jnp.asarray(geometry.mass_at(state), dtype) * state.mass_scale.astype(dtype)
  inverse = [_metric._inverse_masses(m, mass, dtype) for m in scaled.modules]
  solvable = [i for i, m in enumerate(scaled.modules)
              if m.kind == "riemannian" and m.factor is not None]
  groups = [(i,) for i in solvable] if geometry.structure == "layerwise" else [tuple(solvable)]
  out = []
  for members in groups:
    build, _ = woodbury._block_plan([scaled.modules[i].factor for i in members],
                                    [inverse[i] for i in members], geometry.space)
    out.append(build(0.0))
  return out


def parts(pb: Problem) -> list[tuple[str, Callable, tuple, str | None]]:
  """``(name, jitted function, arguments, name of the part it extends or None)`` per part."""
  g0 = pb.geometry.init(pb.params)

  def grad_only(p):
    return jax.value_and_grad(lambda q: pb.loss_fn(pb.model(q)(pb.inputs)))(p)

  def curvature(p):
    return riemod.value_grad_and_curvature(pb.model(p), pb.inputs, pb.loss_fn, pb.metric,
                                           **pb.vgc_kwargs)

  def mass_state(p, g, geometry=pb.geometry):
    loss, grads, curv = curvature(p)
    g = geometry.advance(g, grads, curv)
    scaled, _ = geometry.mass_policy.rescale(curv, g.moments, g.count)
    return loss, grads, curv, g, scaled

  def kernels(p, g):
    loss, grads, curv, g, _ = mass_state(p, g)
    return loss, grads, _block_matrices(pb.geometry, curv, g)

  def composed(p, g, geometry=pb.geometry):
    loss, grads, curv, g, _ = mass_state(p, g, geometry)
    return grads, geometry.compose(curv, g)

  def cholesky(p, g, geometry=pb.geometry):
    grads, metric = composed(p, g, geometry)
    return grads, [b.chol for b in metric.blocks]

  def solve(p, g):
    grads, metric = composed(p, g)
    return metric.solve_with_residuals(grads)

  def jit(fn):
    # Each prefix returns one scalar (the sum of every floating leaf it produced): every product
    # is computed (nothing is dead code) but none is copied out, so prefixes differ by their work.
    def touched(*args):
      leaves = [x for x in jax.tree.leaves(fn(*args)) if jnp.issubdtype(x.dtype, jnp.inexact)]
      return sum(jnp.sum(x) for x in leaves)
    return jax.jit(touched)

  out = [("grad", jit(grad_only), (pb.params,), None),
         ("+ taps (value_grad_and_curvature)", jit(curvature), (pb.params,), "grad"),
         ("+ mass state (advance, rescale)", jit(mass_state), (pb.params, g0),
          "+ taps (value_grad_and_curvature)"),
         ("+ kernels (block matrices)", jit(kernels), (pb.params, g0),
          "+ mass state (advance, rescale)"),
         ("+ cholesky (Geometry.compose)", jit(cholesky), (pb.params, g0),
          "+ kernels (block matrices)"),
         ("+ solve (solve_with_residuals)", jit(solve), (pb.params, g0),
          "+ cholesky (Geometry.compose)"),
         ("full riemod step (the task's jitted step)", pb.full_step[0], pb.full_step[1],
          "+ solve (solve_with_residuals)"),
         (pb.anchor[0], pb.anchor[1], pb.anchor[2], None)]
  policy = pb.geometry.mass_policy
  if isinstance(policy, riemod.masses.KroneckerMass):
    # The same prefix on a step between refactorisations (update_every > 1, count not due): the
    # moving averages and the whitening stay, the Choleskys and inverses of A and S do not.
    between = dataclasses.replace(pb.geometry,
                                  mass_policy=dataclasses.replace(policy, update_every=10))
    g_between = between.init(pb.params)._replace(count=jnp.asarray(1, jnp.int32))
    out.append(("+ mass state between refactorisations (update_every=10)",
                jit(lambda p, g: mass_state(p, g, between)), (pb.params, g_between),
                "+ taps (value_grad_and_curvature)"))
  if pb.one_block is not None:
    one, (one_step, one_args) = pb.one_block
    g1 = one.init(pb.params)
    out += [("one block: + cholesky (Geometry.compose)",
             jit(lambda p, g: cholesky(p, g, one)), (pb.params, g1),
             "+ mass state (advance, rescale)"),
            ("one block: full riemod step", one_step, one_args, "+ solve (solve_with_residuals)")]
  return out


def blocks(pb: Problem, geometry: riemod.Geometry | None = None) -> list[dict]:
  """Per block: its modules, factor rows ``d``, parameters, solve space and the size it factors."""
  geometry = geometry or pb.geometry

  def compose(p):
    loss, grads, curv = riemod.value_grad_and_curvature(pb.model(p), pb.inputs, pb.loss_fn,
                                                        pb.metric, **pb.vgc_kwargs)
    g = geometry.advance(geometry.init(p), grads, curv)
    return curv, geometry.compose(curv, g)

  curv, metric = jax.jit(compose)(pb.params)
  rows = []
  for members, block in zip(metric.block_modules, metric.blocks):
    rows.append({
        "modules": [curv.modules[i].name for i in members],
        "factors": sorted({type(curv.modules[i].factor).__name__ for i in members}),
        "d": block.factors[0].num_rows,
        "parameters": int(sum(f.num_params for f in block.factors)),
        "space": block.space, "factored_size": int(block.chol.shape[0])})
  unblocked = [{"module": m.name, "kind": m.kind, "parameters": int(sum(
      int(np.prod(curv.leaf_shapes[j])) for j in m.leaf_indices))}
      for i, m in enumerate(curv.modules)
      if not any(i in members for members in metric.block_modules)]
  return rows, unblocked


def _cost(fn, args) -> dict:
  """XLA's operation count and memory plan of the compiled part (LAPACK calls not counted)."""
  compiled = fn.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", -1.0)) if cost else -1.0
  memory = compiled.memory_analysis()
  return compiled, {"xla_flops": flops if flops >= 0 else None,
                    "argument_bytes": memory.argument_size_in_bytes,
                    "temp_bytes": memory.temp_size_in_bytes}


def lapack_flops(block_rows: list[dict], geometry_state_shapes: list[tuple[int, int]]) -> dict:
  """Analytic counts of the LAPACK calls XLA does not count: the Cholesky of every block's
  ``m x m`` matrix (``m^3 / 3``) and, for the Kronecker mass, the Cholesky and the triangular
  inverse of every module's ``A`` and ``S`` (``n^3 / 3 + n^3``)."""
  chol = sum(r["factored_size"] ** 3 / 3 for r in block_rows)
  kron = sum(n ** 3 / 3 + n ** 3 for pair in geometry_state_shapes for n in pair)
  return {"block_cholesky": chol, "kronecker_refactor": kron}


def _kronecker_sizes(pb: Problem) -> list[tuple[int, int]]:
  moments = pb.geometry.init(pb.params).moments
  if not isinstance(moments, dict):
    return []
  return [(m.inputs.shape[0], m.outputs.shape[0]) for m in moments.values()
          if hasattr(m, "inputs_root")]


def run_task(task_name: str, config: dict | None = None, rounds: int = 7, burst: int = 10) -> dict:
  pb = char_lm_problem(config) if task_name == "char-lm" else digits_problem(task_name, config)
  fns = parts(pb)
  # Compiled once: the executables timed are those whose cost and memory are reported.
  compiled = {name: _cost(fn, args) for name, fn, args, _ in fns}
  costs = {name: c for name, (_, c) in compiled.items()}
  load_start = list(os.getloadavg())
  anchor = pb.anchor[0]
  timed = harness.time_interleaved({name: (compiled[name][0], args) for name, _, args, _ in fns},
                                   rounds=rounds, burst=burst, reference=anchor)
  med = {k: v["median_seconds"] for k, v in timed.items()}
  rows = []
  for name, _, _, base in fns:
    c = costs[name]
    base_flops = costs[base]["xla_flops"] if base else 0.0
    rows.append({
        "part": name, "extends": base, "median_ms": 1e3 * med[name],
        "increment_ms": 1e3 * (med[name] - (med[base] if base else 0.0)),
        "ratio_to_anchor": timed[name]["ratio"], "ratio_spread": timed[name]["ratio_spread"],
        "xla_flops": c["xla_flops"],
        "increment_xla_flops": (None if c["xla_flops"] is None or base_flops is None
                                else c["xla_flops"] - base_flops),
        "argument_bytes": c["argument_bytes"], "temp_bytes": c["temp_bytes"]})
  block_rows, unblocked = blocks(pb)
  result = {"task": task_name, "config": pb.config, "anchor": anchor, "rows": rows,
            "blocks": block_rows, "unblocked_modules": unblocked,
            "lapack_flops": lapack_flops(block_rows, _kronecker_sizes(pb)),
            "rounds": rounds, "burst": burst, "machine": harness.machine_info(),
            "loadavg_start": load_start}
  if pb.one_block is not None:
    one_rows, _ = blocks(pb, pb.one_block[0])
    result["one_block"] = {"blocks": one_rows, "lapack_flops": lapack_flops(one_rows, [])}
  return result


def _mflop(x):
  return None if x is None else x / 1e6


def markdown(result: dict) -> str:
  """The readable table of :func:`run_task`'s result."""
  table = harness.markdown_table(
      ["part (cumulative)", "median ms", "increment ms", f"x {result['anchor']} (spread)",
       "XLA MFLOP", "increment MFLOP", "temp MB"],
      [[r["part"] + (f" (on {r['extends']})" if r["extends"] and r["extends"] != prev["part"]
                     else ""),
        r["median_ms"], r["increment_ms"] if r["extends"] else None,
        f"{r['ratio_to_anchor']:.2f} ({r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f})",
        _mflop(r["xla_flops"]), _mflop(r["increment_xla_flops"]) if r["extends"] else None,
        r["temp_bytes"] / 2**20] for prev, r in zip([{"part": None}] + result["rows"],
                                                    result["rows"])])
  lap = result["lapack_flops"]
  blocks_table = harness.markdown_table(
      ["block", "modules", "factor", "d", "parameters", "space", "factored m", "m^3/3 MFLOP"],
      [[i, ", ".join(b["modules"]), ", ".join(b["factors"]), b["d"], b["parameters"], b["space"],
        b["factored_size"], b["factored_size"] ** 3 / 3e6]
       for i, b in enumerate(result["blocks"])])
  text = [f"# riemod step profile ({result['task']})", "",
          f"Configuration `{result['config']}`. Cumulative jitted prefixes of one step on one "
          f"batch, interleaved ({result['rounds']} rounds x {result['burst']} calls, order "
          f"rotated), medians; `x {result['anchor']}`: median over rounds of the part's burst "
          "median over the anchor's in the same round (min-max over rounds). XLA MFLOP: "
          "`cost_analysis()` of the compiled part, which leaves out LAPACK calls (Cholesky, "
          "triangular solves); temp MB: XLA's temporaries, not RSS. Command: "
          f"`OPENBLAS_NUM_THREADS=1 nice -n 5 python -m benchmarks.profile_step --task "
          f"{result['task']}`.", "", table, "",
          f"Analytic LAPACK work per step: block Choleskys {lap['block_cholesky'] / 1e6:.3g} "
          f"MFLOP (m^3/3 per block), Kronecker refactorisation {lap['kronecker_refactor'] / 1e6:.3g}"
          " MFLOP (Cholesky n^3/3 and triangular inverse n^3 of every A and S).", "",
          f"{len(result['blocks'])} blocks:", "", blocks_table, ""]
  if result["unblocked_modules"]:
    text += ["Modules outside every block (their own diagonal step): " + ", ".join(
        f"{m['module']} ({m['kind']}, {m['parameters']} parameters)"
        for m in result["unblocked_modules"]) + ".", ""]
  if "one_block" in result:
    b = result["one_block"]["blocks"][0]
    text += [f"One block (`structure=\"full\"`): d = {b['d']}, {b['parameters']} parameters, "
             f"factored m = {b['factored_size']} ({b['space']} space), Cholesky "
             f"{result['one_block']['lapack_flops']['block_cholesky'] / 1e6:.3g} MFLOP.", ""]
  text += [f"Machine: {result['machine']['cpu_model']}, {result['machine']['cpu_count']} cores "
           f"(shared); load {[round(x, 2) for x in result['loadavg_start']]} -> "
           f"{[round(x, 2) for x in result['machine']['loadavg']]}; git "
           f"{result['machine'].get('git')}.", ""]
  return "\n".join(text)

def pinn_parts(config: dict):
  """The same cumulative prefixes for poisson-pinn (float64), beside the dense GN anchor's parts."""
  from jax.flatten_util import ravel_pytree

  from benchmarks import task_poisson_pinn as P

  tx, metric, vgc_kwargs = riemod_config.build(config)
  geometry = riemod_config.geometry(config)
  points, flag, weights, _ = P.collocation()
  batch = (jnp.asarray(points), jnp.asarray(flag), jnp.asarray(weights))
  params = [{"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
            for w, b in problems.mlp_init([2, 32, 32, 1], 0, "float64")]
  opt_state = tx.init(params)
  n_pts = points.shape[0]

  def grad_only(p):
    return jax.value_and_grad(lambda q: P.half_mean_square(P.residual_fn(q, batch)))(p)

  def curvature(p):
    return riemod.value_grad_and_curvature(P.residual_fn, batch, P.half_mean_square, metric,
                                           params=p, **vgc_kwargs)

  def cholesky(p):
    loss, grads, curv = curvature(p)
    composed = geometry.compose(curv, geometry.init(p))
    return [b.chol for b in composed.blocks]

  def full(p, s):
    loss, grads, curv = curvature(p)
    # value_fn: the loss on the batch, for a configuration with a line search (ENGD's grid).
    updates, s = tx.update(grads, s, p, curvature=curv, value=loss,
                           value_fn=lambda q: P.half_mean_square(P.residual_fn(q, batch)))
    return optax.apply_updates(p, updates), s

  def jacobian(p):
    flat, unravel = ravel_pytree(p)

    def r_one(theta, point, f, w):
      return P.residual_fn(unravel(theta), (point[None], f[None], w[None]))[0, 0]
    return jax.vmap(jax.grad(r_one), (None, 0, 0, 0))(flat, *batch) / jnp.sqrt(n_pts)

  def gram_chol(p):
    jac = jacobian(p)
    gram = jac.T @ jac + 1e-8 * jnp.eye(jac.shape[1], dtype=jac.dtype)
    return jax.scipy.linalg.cho_factor(gram, lower=True)[0]

  return {
      "grad": (jax.jit(grad_only), (params,)),
      "+ rows (value_grad_and_curvature, generic path)": (jax.jit(curvature), (params,)),
      "+ kernel and cholesky (Geometry.compose)": (jax.jit(cholesky), (params,)),
      "full riemod step (transform update + apply)": (jax.jit(full), (params, opt_state)),
      "dense GN: jacobian (vmap grad per point)": (jax.jit(jacobian), (params,)),
      "dense GN: + J^T J and cholesky": (jax.jit(gram_chol), (params,)),
  }



def run_pinn(config: dict, rounds: int = 5, burst: int = 3) -> dict:
  fns = pinn_parts(config)
  load_start = list(os.getloadavg())
  timed = harness.time_interleaved(fns, rounds=rounds, burst=burst)
  med = {k: v["median_seconds"] for k, v in timed.items()}
  rows, prev = [], 0.0
  for name in fns:
    standalone = name.startswith("dense GN: jacobian")
    rows.append({"part": name, "median_ms": 1e3 * med[name],
                 "increment_ms": 1e3 * (med[name] - (0.0 if standalone else prev))})
    prev = med[name]
  return {"config": config, "rows": rows, "rounds": rounds, "burst": burst,
          "machine": harness.machine_info(), "loadavg_start": load_start}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--task", default="digits-mlp", choices=TASKS)
  parser.add_argument("--config", type=json.loads, default=None,
                      help="riemod configuration as JSON (default: the task's tuned one)")
  parser.add_argument("--rounds", type=int, default=None,
                      help="interleaved rounds (None: 7; char-lm and poisson-pinn 5)")
  parser.add_argument("--burst", type=int, default=None,
                      help="calls per part and round (None: 20; char-lm and poisson-pinn 3)")
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS,
                      help="folder for profile_<task>.{json,md}; created if missing")
  args = parser.parse_args(argv)
  stem = "profile_" + args.task.replace("-", "_")
  args.out.mkdir(parents=True, exist_ok=True)
  if args.task == "poisson-pinn":
    jax.config.update("jax_enable_x64", True)
    from benchmarks import task_poisson_pinn
    config = args.config or task_poisson_pinn.RIEMOD_GRID[0]
    result = run_pinn(config, rounds=args.rounds or 5, burst=args.burst or 3)
    table = harness.markdown_table(
        ["part (cumulative)", "median ms", "increment ms"],
        [[r["part"], r["median_ms"], r["increment_ms"]] for r in result["rows"]])
    text = (f"# riemod step profile ({args.task})\n\nConfiguration `{config}`. Cumulative "
            f"jitted prefixes of one step, interleaved, medians.\n\n{table}\n\nLoad "
            f"{result['loadavg_start']} -> {result['machine']['loadavg']}.\n")
  else:
    slow = args.task == "char-lm"
    result = run_task(args.task, args.config, rounds=args.rounds or (5 if slow else 7),
                      burst=args.burst or (3 if slow else 20))
    text = markdown(result)
  harness.write_json(args.out / f"{stem}.json", result)
  (args.out / f"{stem}.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()

"""Where riemod's step time goes on digits-mlp: cumulative sub-parts, each jitted and timed.

``python -m benchmarks.profile_step [--config JSON] [--out DIR]``. The parts are nested prefixes of
one training step (batch 128, MLP 64-128-128-10, riemod's headline digits-mlp configuration), so the
differences between consecutive rows are the cost of each stage:

1. ``grad``: loss and gradient only (``jax.value_and_grad``, what Adam pays);
2. ``+ taps``: :func:`riemod.value_grad_and_curvature` (tapped forward, gradient VJP, vmapped tap
   VJPs for the factor rows, recorded inputs);
3. ``+ kernels``: every module's ``K D^{-1} K^T`` (Gram-Hadamard);
4. ``+ cholesky``: :meth:`riemod.Geometry.compose` (kernels, capacitance, Cholesky with jitter
   check);
5. ``+ solve``: ``solve_with_residuals`` of the gradient (``K v``, triangular solves, ``K^T t``);
6. ``full update``: the optax transform's ``update`` (adds momentum solve, diagnostics) and
   ``apply_updates``;
7. ``adam step``: a full Adam step, for scale.

Each part runs in interleaved bursts (``rounds`` x ``burst`` steps, order rotated), timed after
``block_until_ready``; medians are reported with ``os.getloadavg()``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import riemod
from benchmarks import harness, mlp, problems, riemod_config, task_digits_mlp


def parts(config: dict, task: mlp.MLPTask, seed: int = 0):
  tx, metric, vgc_kwargs = riemod_config.build(config)
  mass = config["mass"]
  geometry = riemod_config.geometry(config)
  _, params = nnx.split(mlp.build_model(task.sizes, task.activations, seed))
  idx = jnp.asarray(problems.batch_table(seed, 1500, 128, 1)[0])
  key = jax.random.key(0)
  opt_state = tx.init(params)
  adam = optax.adam(1e-2)
  adam_state = adam.init(params)

  def data():
    return task.batch(idx)

  def grad_only(p):
    x, t = data()
    return jax.value_and_grad(lambda q: task.loss(task.apply(q, x), t))(p)

  def curvature(p):
    x, t = data()
    return riemod.value_grad_and_curvature(nnx.merge(task.graphdef, p), x,
                                           lambda out: task.loss(out, t), metric, key=key,
                                           **vgc_kwargs)

  def kernels(p):
    loss, grads, curv = curvature(p)
    grams = [m.factor.gram({n: jnp.asarray(1.0 / mass) for n in m.leaf_names})
             for m in curv.modules if m.factor is not None]
    return loss, grads, grams

  def cholesky(p):
    loss, grads, curv = curvature(p)
    composed = geometry.compose(curv, geometry.init(p))
    return loss, grads, [b.chol for b in composed.blocks]

  def solve(p):
    loss, grads, curv = curvature(p)
    composed = geometry.compose(curv, geometry.init(p))
    return composed.solve_with_residuals(grads)

  def full(p, s):
    loss, grads, curv = curvature(p)
    updates, s = tx.update(grads, s, p, curvature=curv, value=loss)
    return optax.apply_updates(p, updates), s

  def adam_step(p, s):
    loss, grads = grad_only(p)
    updates, s = adam.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  return {
      "grad": (jax.jit(grad_only), (params,)),
      "+ taps (value_grad_and_curvature)": (jax.jit(curvature), (params,)),
      "+ kernels (Gram-Hadamard)": (jax.jit(kernels), (params,)),
      "+ cholesky (Geometry.compose)": (jax.jit(cholesky), (params,)),
      "+ solve (solve_with_residuals)": (jax.jit(solve), (params,)),
      "full riemod step (transform update + apply)": (jax.jit(full), (params, opt_state)),
      "adam step": (jax.jit(adam_step), (params, adam_state)),
  }


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
    updates, s = tx.update(grads, s, p, curvature=curv, value=loss)
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


def run(config: dict, rounds: int = 7, burst: int = 20, task_name: str = "digits-mlp") -> dict:
  if task_name == "poisson-pinn":
    fns = pinn_parts(config)
  else:
    task = mlp.MLPTask([64, 128, 128, 10], ["tanh", "tanh", None], mlp.cross_entropy, "labels",
                       128, 1, task_digits_mlp._evaluate)
    fns = parts(config, task)
  load_start = list(os.getloadavg())
  timed = harness.time_interleaved(fns, rounds=rounds, burst=burst)
  med = {k: v["median_seconds"] for k, v in timed.items()}
  rows, prev = [], 0.0
  for name in fns:
    standalone = name == "adam step" or name.startswith("dense GN: jacobian")
    rows.append({"part": name, "median_ms": 1e3 * med[name],
                 "increment_ms": None if name == "adam step" else 1e3 * (
                     med[name] - (0.0 if standalone else prev))})
    if name != "adam step":
      prev = med[name]
  return {"config": config, "rows": rows, "rounds": rounds, "burst": burst,
          "machine": harness.machine_info(), "loadavg_start": load_start}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", type=json.loads, default=None)
  parser.add_argument("--task", default="digits-mlp", choices=["digits-mlp", "poisson-pinn"])
  parser.add_argument("--out", type=Path, default=harness.DEFAULT_RESULTS)
  args = parser.parse_args(argv)
  if args.task == "poisson-pinn":
    jax.config.update("jax_enable_x64", True)
    from benchmarks import task_poisson_pinn
    config = args.config or task_poisson_pinn.RIEMOD_GRID[0]
    result = run(config, rounds=5, burst=3, task_name=args.task)
  else:
    config = args.config or task_digits_mlp.RIEMOD_GRID[0]
    result = run(config)
  stem = "profile_" + args.task.replace("-", "_")
  args.out.mkdir(parents=True, exist_ok=True)
  harness.write_json(args.out / f"{stem}.json", result)
  table = harness.markdown_table(
      ["part (cumulative)", "median ms", "increment ms"],
      [[r["part"], r["median_ms"], r["increment_ms"]] for r in result["rows"]])
  text = (f"# riemod step profile ({args.task})\n\nConfiguration `{config}`. Cumulative "
          f"jitted prefixes of one step, interleaved, medians.\n\n{table}\n\nLoad "
          f"{result['loadavg_start']} -> {result['machine']['loadavg']}.\n")
  (args.out / f"{stem}.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()

"""``certify``: everything riemod promises about a training step, measured at one batch.

See :mod:`riemod.certify` for the parts; this module runs them together on the optimizer's own
geometry and builds the :class:`~riemod.certify.CertificateReport`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from riemod._util import all_finite
from riemod.certify.action import action_terms
from riemod.certify.bound import stability_bound
from riemod.certify.contraction import (composed_rate, contraction_of, coupling_norm,
                                        gauss_newton_spectrum, spectrum)
from riemod.certify.lanczos import generalized_lanczos
from riemod.certify.lipschitz import network_lipschitz, state_lipschitz
from riemod.certify.report import CertificateReport
from riemod.composer import Geometry, masses
from riemod.nn.adapter import frontend as model_frontend


_all_finite = jax.jit(all_finite)


def _check_finite(name: str, tree: Any) -> None:
  if not bool(_all_finite(jax.tree.leaves(tree))):
    raise FloatingPointError(f"certify: {name} contains NaN or inf; certificates need finite "
                             f"values (check the data and the parameters).")


def _module_masks(curvature, unravel, size, dtype) -> list[np.ndarray]:
  """Static flat 0/1 masks of each module's parameters, in ``ravel_pytree`` order."""
  masks = []
  positions = np.arange(len(curvature.leaf_shapes))
  for module in curvature.modules:
    marks = [np.full(shape, float(i in module.leaf_indices), np.float64)
             for i, shape in zip(positions, curvature.leaf_shapes)]
    flat = np.concatenate([m.ravel() for m in marks]) if marks else np.zeros((0,))
    masks.append(flat)
  return masks


def _measure(model_kind, model_static, loss_fn, output_metric, geometry, num_lanczos,
             num_power, params, rest, x, learning_rate, geometry_state, key):
  """The whole measurement as one traceable function (jitted by :func:`_measure_jit`)."""
  from riemod.curvature import value_grad_and_curvature

  if model_kind == "nnx":
    model = nnx.merge(model_static, params, rest)
    apply = lambda p, v: nnx.merge(model_static, p, rest)(v)
    loss, _, curvature = value_grad_and_curvature(model, x, loss_fn, output_metric, key=key)
  else:
    model = model_static
    apply = getattr(model_static, "apply", model_static)
    loss, _, curvature = value_grad_and_curvature(model_static, x, loss_fn, output_metric,
                                                  params=params, key=key)
  flat, unravel = ravel_pytree(params)
  dtype, size = flat.dtype, flat.shape[0]
  ravel = lambda tree: ravel_pytree(tree)[0]
  # The optimizer's own G (same geometry, same state), and its block-diagonal part per module.
  metric = geometry.compose(curvature, geometry_state)
  layerwise = metric if geometry.structure == "layerwise" else dataclasses.replace(
      geometry, structure="layerwise").compose(curvature, geometry_state)

  loss_of_flat = lambda f: loss_fn(apply(unravel(f), x))
  grad_of_flat = jax.grad(loss_of_flat)
  hvp = lambda v: jax.jvp(grad_of_flat, (flat,), (v,))[1]
  solve = lambda v: ravel(metric.solve(unravel(v)))
  matvec = lambda v: ravel(metric.matvec(unravel(v)))
  solve_lw = lambda v: ravel(layerwise.solve(unravel(v)))
  matvec_lw = lambda v: ravel(layerwise.matvec(unravel(v)))

  masks = _module_masks(curvature, unravel, size, dtype)
  active = [i for i, m in enumerate(curvature.modules) if m.kind != "frozen" and masks[i].sum()]
  pairs = [(a, b) for p, a in enumerate(active) for b in active[p + 1:]]
  # Every random start vector from one draw (each RNG call costs compile time, not run time).
  starts = jax.random.normal(jax.random.fold_in(key, 7), (1 + 2 * len(active) + len(pairs), size),
                             dtype)
  whole = spectrum(hvp, solve, matvec, starts[0], num_lanczos)
  # The Gauss-Newton part J^T (d^2 l/dy^2) J against the same G: its edge 2/lam_max is what tells
  # a diverging step from an edge-of-stability one (see contraction.classify). Its own start
  # vector (a separate draw keeps the other spectra's start vectors as they were).
  gauss_newton = gauss_newton_spectrum(
      lambda f: apply(unravel(f), x), flat, loss_fn, solve, matvec,
      jax.random.normal(jax.random.fold_in(key, 11), (size,), dtype), num_lanczos)
  blocks = conditions = None
  couplings = {}
  if active:
    # One vmapped Lanczos over all blocks: one copy of the HVP graph, not one per module.
    k = len(active)
    stack = jnp.asarray(np.stack([masks[i] for i in active]), dtype)
    steps = int(min(num_lanczos, min(masks[i].sum() for i in active)))
    blocks = jax.vmap(lambda m, v: spectrum(hvp, solve_lw, matvec_lw, v, steps, mask=m))(
        stack, starts[1:1 + k])
    # lam_max(G_a) by Lanczos on the pair (G_a, I); lam_min(G_a) >= the smallest mass.
    g_blocks = jax.vmap(lambda m, v: generalized_lanczos(
        lambda u: m * matvec_lw(m * u), lambda u: m * u, lambda u: m * u, m * v, steps))(
            stack, starts[1 + k:1 + 2 * k])
    # The smallest mass of each module, in the parameters' own coordinates (policy included;
    # lam_min(D_a), not the smallest entry of D 1: the Kronecker mass is not diagonal).
    smallest = layerwise.smallest_masses()
    min_mass = jnp.stack([smallest[i].astype(dtype) for i in active])
    conditions = (g_blocks.lam_max, min_mass)
    if pairs:
      pa = jnp.asarray(np.stack([masks[a] for a, _ in pairs]), dtype)
      pb = jnp.asarray(np.stack([masks[b] for _, b in pairs]), dtype)
      norms = jax.vmap(lambda ma, mb, v: coupling_norm(hvp, solve_lw, ma, mb, v, num_power))(
          pa, pb, starts[1 + 2 * k:])
      couplings = {pair: norms[j] for j, pair in enumerate(pairs)}

  lipschitz = network_lipschitz(model, x, params=None if model_kind == "nnx" else params,
                                num_iterations=num_power)
  outputs = apply(params, x)
  batch = outputs.shape[0]
  grad_out = lambda y: batch * jax.grad(loss_fn)(y)
  loss_grad_lipschitz = state_lipschitz(grad_out, outputs, num_iterations=num_power)
  loss_lipschitz = jnp.max(jnp.sqrt(jnp.sum(grad_out(outputs).reshape(batch, -1) ** 2, axis=1)))
  lip_meta = [(e.name, e.kind, e.num_params) for e in lipschitz.modules]
  lipschitz = lipschitz._replace(modules=tuple((e.state, e.param) for e in lipschitz.modules))
  return dict(loss=loss, whole=whole, gauss_newton=gauss_newton, blocks=blocks, conditions=conditions, couplings=couplings,
              lipschitz=lipschitz, loss_grad_lipschitz=loss_grad_lipschitz,
              loss_lipschitz=loss_lipschitz, active=active, num_rows=curvature.num_rows,
              names=[m.name for m in curvature.modules], lip_meta=lip_meta, finite=jnp.isfinite(loss))


_STATIC_INFO: dict = {}


@functools.partial(jax.jit, static_argnums=tuple(range(8)))
def _measure_jit(signature, *args):
  out = _measure(*args)
  # Module names and indices are trace-time constants; keep them beside the compiled function.
  _STATIC_INFO[(signature,) + args[:7]] = {k: out.pop(k) for k in ("active", "num_rows", "names",
                                                                    "lip_meta")}
  return out


def _check_loss_batch(apply, params, x, loss_fn) -> None:
  try:
    shapes = jax.eval_shape(lambda p: apply(p, x), params)
  except Exception as error:  # the model itself fails on x
    raise ValueError(f"certify: the model fails on x ({error}); check that x matches the model's "
                     "input shape.") from error
  try:
    value = jax.eval_shape(loss_fn, shapes)
  except Exception as error:
    raise ValueError(f"certify: loss_fn fails on model outputs of shape {shapes.shape} "
                     f"({type(error).__name__}: {error}). If loss_fn closes over labels, they must "
                     "belong to this batch x (same number of samples).") from error
  if value.shape != ():
    raise ValueError(f"certify: loss_fn must return a scalar (a mean over the batch); got shape "
                     f"{value.shape}. Are the labels the same batch as x?")


def certify(model: Any, x: Any, loss_fn: Callable[[jax.Array], jax.Array], output_metric: Any, *,
            learning_rate: float, geometry: Any = None, opt_state: Any = None,
            params: Any = None, key: jax.Array | None = None,
            num_lanczos: int = 20, dataset_size: int | None = None,
            num_power_iterations: int = 20) -> CertificateReport:
  """Certifies one Riemannian training step at the batch ``x``.

  Args:
    model: an ``nnx.Module`` (``riemod.nn.Sequential``/``Parallel`` are certified module by
      module), a Linen module/``apply`` or ``f(params, x)`` with ``params=``.
    x: a batch of inputs (leading sample axis).
    loss_fn: ``outputs -> scalar`` batch-mean loss (labels of this batch closed over).
    output_metric: the output metric of the optimizer (:mod:`riemod.metrics`).
    learning_rate: the step size to certify (> 0).
    opt_state: optional optimizer state (riemod transform, possibly in a chain or under
      :func:`guarded`): gives the action terms and the geometry's state (step count, mass
      scale, the mass policy's moments), so the certified ``G`` is the optimizer's own.
    geometry: the optimizer's :class:`~riemod.Geometry` (default ``riemod.Geometry()``). An
      adaptive mass policy needs ``opt_state`` (its moments are there).
    params: parameters for Linen and function models.
    key: PRNG key (start vectors, random output metrics).
    num_lanczos: Lanczos steps per spectrum.
    dataset_size: ``n`` in the stability bound (default: the batch size, noted in the report).
    num_power_iterations: power-iteration steps for Lipschitz and coupling norms.

  Returns:
    A :class:`CertificateReport`. Its ``network`` holds the spectrum of ``G^{-1} H`` and, under
    ``"gauss_newton"``, of ``G^{-1} H_GN`` (same ``G``, ``num_lanczos`` steps); the verdict
    judges the step size on the Gauss-Newton edge (see
    :func:`~riemod.certify.contraction.classify`).

  Example:
    >>> import jax, jax.numpy as jnp, riemod
    >>> f = lambda p, x: x @ p["w"]
    >>> params = {"w": jnp.zeros((3, 1))}
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> report = certify(f, x, lambda y: 0.5 * jnp.mean(y ** 2), riemod.metrics.identity(),
    ...                  learning_rate=1.0, params=params, geometry=riemod.Geometry(mass=1e-3))
    >>> report.max_stable_learning_rate > 1.0
    True
  """

  from riemod.metrics import OutputMetric
  from riemod.state import find_state
  from riemod.transforms import ActionState, MetricState, diagnostic_slots

  if not isinstance(output_metric, OutputMetric):
    raise TypeError(f"output_metric={output_metric!r}: pass one of riemod.metrics (identity(), "
                    "softmax_fisher(), ...).")
  if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate)
          and learning_rate > 0):
    raise ValueError(f"learning_rate={learning_rate!r}: pass the positive step size to certify.")
  geometry = Geometry() if geometry is None else geometry
  if not isinstance(geometry, Geometry):
    raise TypeError(f"geometry={geometry!r}: pass the optimizer's riemod.Geometry.")
  structure = geometry.structure
  if int(num_lanczos) < 1 or int(num_power_iterations) < 1:
    raise ValueError("num_lanczos and num_power_iterations must be >= 1.")
  key = jax.random.key(0) if key is None else key
  x = jax.tree.map(jnp.asarray, x)
  if not isinstance(x, jax.Array):
    raise TypeError("certify: x must be one array of inputs (leading sample axis).")

  adapted = model_frontend(model, params, None)  # the one model adapter (errors included)
  params = adapted.params
  apply = lambda p, v: adapted.apply(p, v, None)
  if isinstance(model, nnx.Module):
    kind, static, rest = "nnx", adapted.graphdef, adapted.rest
  else:
    kind, static, rest = "function", model, None
  _check_finite("x", x)
  _check_finite("the parameters", params)
  batch = x.shape[0]
  if dataset_size is not None and int(dataset_size) < batch:
    raise ValueError(f"dataset_size={dataset_size} is smaller than the batch ({batch}).")

  inner = None
  notes: list[str] = []
  geometry_state = geometry.init(params)
  if opt_state is not None:
    metric_state = find_state(opt_state, MetricState)
    if metric_state is None:
      raise ValueError("opt_state holds no riemod MetricState: pass the state of "
                       "riemod.layerwise_natural_gradient / natural_gradient (or a chain or guard "
                       "around it), or leave opt_state=None.")
    geometry_state = metric_state.geometry
    shapes = lambda tree: [np.shape(v) for v in jax.tree.leaves(tree)]
    own = shapes(params)
    # Parameter-shaped state: SPRING's momentum, and the adaptive mass's moments (the Kronecker
    # mass keeps per-module statistics instead: there the module count is what is compared).
    tracked = [shapes(metric_state.momentum)]
    kronecker = lambda node: isinstance(node, masses.KroneckerMoments)
    if not any(map(kronecker, jax.tree.leaves(geometry_state.moments, is_leaf=kronecker))):
      tracked.append(shapes(geometry_state.moments))
    slots = metric_state.report.condition.shape[0]
    if any(t and t != own for t in tracked) or slots != diagnostic_slots(params, structure):
      raise ValueError("opt_state does not belong to this model: it was initialised for other "
                       "parameters. Pass the state of the optimizer that trains this model.")
    inner = find_state(opt_state, ActionState)
  elif not isinstance(geometry.mass_policy, masses.ConstantMass):
    raise ValueError("certify: an adaptive mass needs the optimizer's moments: pass opt_state= "
                     "(the state of the optimizer built with this geometry).")
  mass_scale = float(geometry_state.mass_scale)
  mass = float(geometry.mass_at(geometry_state))

  args = (kind, static, loss_fn, output_metric, geometry, int(num_lanczos),
          int(num_power_iterations))
  dyn = (params, rest, x, jnp.asarray(learning_rate, jnp.result_type(float)), geometry_state,
         key)
  signature = (str(jax.tree.structure(params)),
               tuple((l.shape, str(l.dtype)) for l in jax.tree.leaves((params, rest, x))))
  if (signature,) + args not in _STATIC_INFO:
    # A compiled certificate for these functions and shapes means loss_fn already ran on them.
    _check_loss_batch(apply, params, x, loss_fn)
  out = jax.device_get(_measure_jit(signature, *args, *dyn))
  box = _STATIC_INFO[(signature,) + args]
  if not bool(out["finite"]):
    raise FloatingPointError("certify: the loss is NaN or inf at these parameters and batch.")
  return _build_report(out, box, learning_rate, mass, mass_scale, structure, batch, dataset_size,
                       inner, opt_state, num_lanczos, notes)


def _build_report(out, box, lr, mass, mass_scale, structure, batch, dataset_size, inner,
                  opt_state, num_lanczos, notes) -> CertificateReport:
  """Turns the measured arrays ``out`` (and the trace-time facts ``box``) into the report: the
  whole-network and per-module spectra, the composed rate, the action terms, the stability bound
  with each constant named, the settings and the verdict."""
  f = lambda v: float(np.asarray(v))
  names, active = box["names"], box["active"]
  whole = out["whole"]
  net = contraction_of(whole, lr)
  network = {"lam_min": f(net.lam_min), "lam_max": f(net.lam_max),
             "contraction_factor": f(net.factor),
             "max_stable_learning_rate": f(net.max_stable_learning_rate),
             "lanczos_steps": int(len(whole.eigenvalues)),
             "orthogonality": f(whole.orthogonality), "structure": structure}
  lip = out["lipschitz"]
  modules, block_of = [], {}
  for (name, kind, size), (state, param) in zip(box["lip_meta"], lip.modules):
    modules.append({"name": name, "kind": kind, "num_params": size,
                    "state_lipschitz": f(state), "param_lipschitz": f(param)})
  by_name = {m["name"]: m for m in modules}
  conds = []
  for j, i in enumerate(active):
    block = jax.tree.map(lambda v: v[j], out["blocks"])
    c = contraction_of(block, lr)
    lam_g, min_mass = out["conditions"][0][j], out["conditions"][1][j]
    cond = max(f(lam_g) / f(min_mass), 1.0)
    conds.append(cond)
    row = by_name.get(names[i])
    if row is None:
      row = {"name": names[i], "kind": "parametric", "num_params": None,
             "state_lipschitz": None, "param_lipschitz": None}
      modules.append(row)
      by_name[names[i]] = row
    row.update(lam_min=f(c.lam_min), lam_max=f(c.lam_max), contraction_factor=f(c.factor),
               max_stable_learning_rate=f(c.max_stable_learning_rate), condition_bound=cond,
               lanczos_steps=int(len(block.eigenvalues)))
    block_of[i] = j
  k = len(active)
  matrix = np.zeros((k, k))
  for j, i in enumerate(active):
    matrix[j, j] = by_name[names[i]]["contraction_factor"]
  for (a, b), value in out["couplings"].items():
    ja, jb = block_of[a], block_of[b]
    matrix[ja, jb] = matrix[jb, ja] = lr * f(value)
  rate = composed_rate(matrix) if k else 0.0
  composition = {
      "composed_rate": rate,
      "slowest_module_factor": float(np.max(np.diag(matrix))) if k else 0.0,
      "block_matrix": matrix.tolist(), "blocks": [names[i] for i in active],
      "composed_state_lipschitz": f(lip.composed_state),
      "measured_state_lipschitz": f(lip.measured_state),
      "composed_param_lipschitz": f(lip.composed_param),
      "measured_param_lipschitz": f(lip.measured_param),
      "rule": "rho(N), N_aa = module factor, N_ab = lr ||G_a^-1/2 H_ab G_b^-1/2|| (Perron weights)",
  }
  action = None
  if inner is not None:
    try:
      action = action_terms(opt_state, learning_rate=lr)._asdict()
    except ValueError as error:
      notes.append(str(error))
  else:
    notes.append("no opt_state: the action gap needs the optimizer state (value=loss tracked).")
  n = int(dataset_size) if dataset_size is not None else batch
  if dataset_size is None:
    notes.append(f"dataset_size not given: n = batch size {batch} in the stability bound.")
  cond = max(conds) if conds else 1.0
  mu = float(np.min(out["conditions"][1])) if k else mass * mass_scale
  bound = stability_bound(
      f(lip.composed_param), f(out["loss_grad_lipschitz"]), cond, mu, n, measured={
          "kappa": "composed parameter-Lipschitz bound sqrt(sum_a (prod_{b>a} ||A_b|| ||B_a||)^2)"
                   ", per-module power iteration on JVP/VJP, max over the batch",
          "L": "largest eigenvalue of the per-sample output Hessian of the loss (power "
               "iteration on B * grad loss_fn), max over the batch",
          "xi": "1 / max_a lam_max(G_a) / min mass_a; lam_max(G_a) by Lanczos on metric.matvec",
          "mu": "smallest mass times the guard's mass scale",
          "n": "dataset_size" if dataset_size is not None else "batch size (dataset_size unset)",
      }).to_dict()
  bound["loss_lipschitz"] = f(out["loss_lipschitz"])
  if k and rate >= 1.0 > network["contraction_factor"]:
    notes.append("the composed rate rho(N) >= 1 does not certify what the whole-network factor "
                 "does: the module couplings are too strong for the feedback rule.")
  settings = {"learning_rate": lr, "mass": mass, "mass_scale": mass_scale, "structure": structure,
              "batch_size": batch, "dataset_size": dataset_size, "loss": f(out["loss"]),
              "num_lanczos": num_lanczos, "num_rows": box["num_rows"]}
  verdict = str(CertificateReport.verdict_of(network, settings, action))
  report = CertificateReport(modules, network, composition, action, bound, settings, verdict, notes)
  # The Gauss-Newton spectrum refines the verdict (step size judged on its edge).
  return report.with_gauss_newton(out["gauss_newton"])

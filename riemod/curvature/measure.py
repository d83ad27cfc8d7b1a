"""``value_grad_and_curvature``: loss, gradients and every module's ``K_a`` from one backward pass.

The forward pass runs with a zero tap on every recognised layer output and records the layer
inputs. One VJP gives the loss gradient; the same VJP, vmapped over the ``k`` rows of the output
metric, pulls the factor rows back to every tap. Samples do not interact (no batch norm), so one
cotangent of shape ``(B, *out)`` carries the row of every sample at once: the pull-back costs ``k``
backward passes, not ``B * k``. Modules without dense structure take the generic path: their rows
of ``K_a`` are per-sample VJPs, materialised.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610),
secs. 1-2.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from riemod import _tape
from riemod.curvature import _mesh
from riemod.curvature.factors import RowsFactor, factor_from_structure
from riemod.curvature.types import Curvature, ModuleCurvature, leaf_paths
from riemod.metrics import OutputMetric, check_scale, from_loss
from riemod.nn.adapter import (Frontend, ModuleGroup, _FunctionFrontend, _LinenFrontend,
                               module_name)
from riemod.nn.adapter import frontend as make_frontend
from riemod.nn.structure import DenseStructure


def _check_inputs(x: Any, params: Any) -> int:
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError("x has no arrays: pass the batch of inputs (leading axis = samples).")
  batch = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if None in batch or len(batch) != 1:
    raise ValueError(f"Every array in x must have the same leading (sample) axis; got leading "
                     f"sizes {sorted(map(str, batch))}.")
  size = batch.pop()
  if size == 0:
    raise ValueError("x holds 0 samples: the metric and the loss are means over the batch; pass "
                     "at least one sample.")
  for leaf in jax.tree.leaves(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"A parameter has dtype {dtype}; riemod trains floating point parameters "
                      "only (float32 or float64).")
    if dtype not in (jnp.float32, jnp.float64):
      raise TypeError(
          f"A parameter has dtype {dtype}: riemod's solves (Cholesky, triangular solves) run in "
          "float32 or float64 only. Keep the parameters in float32 and compute in lower "
          "precision inside the model (e.g. nnx.Linear(..., dtype=jnp.bfloat16, "
          "param_dtype=jnp.float32)).")
  return size


# Generic-path rows formed at once (per chunk of samples): 4M entries, 16 MB in float32.
_GENERIC_CHUNK_ELEMENTS = 1 << 22


def _generic_rows(frontend: Frontend, params: Any, x: Any, rows: jax.Array,
                  groups: list[ModuleGroup]) -> dict[tuple, dict[str, jax.Array]]:
  """Per-sample VJPs for modules without dense structure: ``{path: {name: (k, B, *shape)}}``."""
  leaves, treedef = jax.tree.flatten(params)
  indices = [i for g in groups for i in g.leaf_indices]

  def one_sample(x_s, rows_s):
    x_s = jax.tree.map(lambda a: a[None], x_s)

    def output(sub):
      full = list(leaves)
      for i, leaf in zip(indices, sub):
        full[i] = leaf
      return frontend.apply(jax.tree.unflatten(treedef, full), x_s, None)[0]

    _, vjp = jax.vjp(output, [leaves[i] for i in indices])
    return jax.vmap(lambda r: vjp(r)[0])(rows_s)

  # Chunked over samples: at most _GENERIC_CHUNK_ELEMENTS row entries are formed per chunk.
  num_params = sum(int(np.prod(np.shape(leaves[i]))) for i in indices)
  chunk = max(1, _GENERIC_CHUNK_ELEMENTS // max(1, rows.shape[0] * num_params))
  per_sample = jax.lax.map(lambda args: one_sample(*args), (x, jnp.moveaxis(rows, 0, 1)),
                           batch_size=min(chunk, rows.shape[1]))  # list of (B, k, *shape)
  out, position = {}, 0
  for g in groups:
    out[g.path] = {name: jnp.moveaxis(per_sample[position + j], 0, 1)
                   for j, name in enumerate(g.leaf_names)}
    position += len(g.leaf_indices)
  return out


def _mass_leaves(group: ModuleGroup, leaves: list[jax.Array]) -> dict[str, jax.Array] | None:
  mass = group.declaration.mass
  if mass is None:
    return None
  dtype = leaves[group.leaf_indices[0]].dtype
  if isinstance(mass, float) or (not isinstance(mass, Mapping) and np.ndim(mass) == 0):
    return {name: jnp.asarray(mass, dtype) for name in group.leaf_names}
  if not isinstance(mass, Mapping):
    mass = {group.leaf_names[0]: mass} if len(group.leaf_names) == 1 else mass
  if not isinstance(mass, Mapping) or set(mass) != set(group.leaf_names):
    raise ValueError(f"The mass of module {module_name(group.path)!r} must be a float or a dict with "
                     f"keys {sorted(group.leaf_names)}.")
  out = {}
  for name, index in zip(group.leaf_names, group.leaf_indices):
    value = jnp.asarray(mass[name], dtype)
    if value.ndim and value.shape != leaves[index].shape:
      raise ValueError(f"The mass of {module_name(group.path)}/{name} has shape {value.shape}; it must "
                       f"be a scalar or match the parameter's shape {leaves[index].shape}.")
    out[name] = value
  return out


def _tapped_pass(frontend: Frontend, params: Any, x: Any, structured: dict[tuple, ModuleGroup]):
  """Forward pass with zero taps on the structured layers: ``(outputs, vjp, inputs, taps)``."""

  def shape_pass(p):
    tape = _tape.Tape(owners={})
    with _tape.recording(tape):
      frontend.apply(p, x, tape)
    found.update(shapes=dict(tape.output_shapes), structures=dict(tape.structures))
    return 0.0

  found: dict[str, Any] = {}
  jax.eval_shape(shape_pass, params)  # traces only: which tapped layers run, and their shapes
  for path, structure in found["structures"].items():
    if path in structured:
      structured[path].structure = structure
  taps = {path: [jnp.zeros(s.shape, s.dtype) for s in calls]
          for path, calls in found["shapes"].items()
          if path in structured and structured[path].structure is not None}
  # Inside shard_map, invariant taps would sum every device's cotangents into each device's.
  taps = _mesh.vary_like(taps, x, params)

  def forward(p, t):
    tape = _tape.Tape(owners={}, taps=t)
    with _tape.recording(tape):
      y = frontend.apply(p, x, tape)
    return y, {k: v for k, v in tape.inputs.items() if k in t}

  outputs, vjp, inputs = jax.vjp(forward, params, taps, has_aux=True)
  return outputs, vjp, inputs, taps


def _check_outputs(outputs: jax.Array, batch: int, loss_fn: Callable) -> None:
  if not isinstance(outputs, jax.Array):
    raise TypeError(
        f"The model returned a {type(outputs).__name__}; riemod needs one array of outputs with a "
        "leading sample axis, the array the loss is computed from. Wrap the model, e.g. "
        "f = lambda p, x: model(p, x)[0], and close the loss over any other outputs.")
  if outputs.ndim == 0:
    raise ValueError("The model output is a scalar; riemod needs one output per sample along "
                     "axis 0 (shape (batch, ...)). Return the per-sample outputs and reduce them "
                     "in loss_fn.")
  if not jnp.issubdtype(outputs.dtype, jnp.floating):
    raise TypeError(f"The model output has dtype {outputs.dtype}; it must be floating point.")
  if outputs.shape[0] != batch:
    raise ValueError(f"The model output has leading size {outputs.shape[0]} but x has {batch} "
                     "samples; riemod needs one output per sample along axis 0.")
  loss_shape = jax.eval_shape(loss_fn, outputs)
  if getattr(loss_shape, "shape", None) != ():
    raise ValueError(f"loss_fn must return a scalar (a mean over the batch); got "
                     f"{getattr(loss_shape, 'shape', loss_shape)}.")


def value_grad_and_curvature(
    model: Any,
    x: Any,
    loss_fn: Callable[[jax.Array], jax.Array],
    output_metric: OutputMetric | None = None,
    *,
    params: Any = None,
    key: jax.Array | None = None,
    declarations: Mapping[str, Any] | None = None,
    curvature_batch: int | None = None,
    axis_name: Any = None,
    check_metric: bool = True,
) -> tuple[jax.Array, Any, Curvature]:
  """Loss, gradient and curvature of ``loss_fn(model(x))`` in one forward and backward pass.

  Args:
    model: an ``nnx.Module``; a Linen module or its ``apply`` (then pass ``params``, the variables
      dict); or a plain function ``f(params, x) -> outputs`` (PINN residuals, least squares).
      Samples must not interact (no batch statistics).
    x: the batch: an array or pytree of arrays with a leading sample axis ``B``.
    loss_fn: ``outputs -> scalar``, a mean over the batch (the metric rows are scaled to match).
    output_metric: one of :mod:`riemod.metrics`; by default :func:`riemod.metrics.from_loss`, the
      Gauss-Newton factor of ``loss_fn`` itself (right for any reduction and any loss). It is
      resolved here because this is where ``loss_fn`` is known. A closed-form metric
      (``identity()``, ``softmax_fisher()``) skips its ``c`` Hessian products and eigendecompositions
      and is checked against the loss's scale (``check_metric``).
    params: the parameter pytree (Linen and plain functions only).
    key: PRNG key for random output metrics (sampled Fisher, sketches).
    declarations: ``{module name: MetricDeclaration or dict(mass=..., kind=...)}``; module names
      are parameter parent paths joined by ``/`` (e.g. ``"params/Dense_0"``). For NNX models they
      override the modules' own declarations.
    curvature_batch: compute the factor rows on the first ``m`` samples only (rows scaled by
      ``1/sqrt(m)``) while the loss and gradient use the whole batch. With the exact softmax
      Fisher, ``m = 16..32`` keeps the capacitance small (``d = k m``) at full gradient accuracy.
      With ``axis_name``, ``m`` samples per device.
    axis_name: inside ``jax.shard_map`` with the batch split over a mesh axis, that axis's name
      (or a tuple of names): the result is then the curvature of the whole global batch, the
      same on every device (factor rows gathered over the axis and scaled by the global batch
      size, loss and gradients averaged over it), equal to one device's result on the whole
      batch; each module also keeps this device's own rows (``shard``; drop them with
      :meth:`Curvature.replicated` to return the curvature from the ``shard_map``). The
      parameters must be replicated over the axis. ``None`` (default): one device,
      or ``jax.jit`` with sharded arrays. Without it, a call inside ``shard_map`` on a split
      batch is refused (see docs/multidevice.md).
    check_metric: when the output metric claims to be the loss's exact Gauss-Newton factor
      (``identity()``, ``softmax_fisher()``), compare its scale with the loss's Hessian along two
      probe directions and warn once (:class:`riemod.metrics.MetricScaleWarning`) when they differ
      by a constant factor (a ``.sum()`` loss: ``B``; an all-element mean: ``1/c``). One extra
      product with the loss Hessian; ``False`` removes it from the computation. With
      ``from_loss()`` the product tests instead that ``loss_fn`` does not couple samples (batch
      statistics), which every output metric assumes (:class:`riemod.metrics.SampleCouplingWarning`).

  Returns:
    ``(loss, grads, curvature)``: ``grads`` has the structure of the parameters (an ``nnx.State``
    for NNX models), ready for ``optimizer.update(model, grads, curvature=curvature)``.

  Example:
    >>> import jax, jax.numpy as jnp, riemod
    >>> params = {"w": jnp.ones((3, 2))}
    >>> f = lambda p, x: x @ p["w"]
    >>> loss, grads, curv = riemod.value_grad_and_curvature(
    ...     f, jnp.ones((4, 3)), lambda y: 0.5 * jnp.mean(jnp.sum(y**2, -1)),
    ...     riemod.metrics.identity(), params=params)
    >>> curv.num_rows
    8
  """
  if output_metric is None:
    output_metric = from_loss()
  if not isinstance(output_metric, OutputMetric):
    raise TypeError(f"output_metric={output_metric!r}: use one of riemod.metrics (from_loss(), "
                    "identity(), softmax_fisher(), ...), or riemod.metrics.custom(...).")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn={loss_fn!r}: pass the batch loss as a function of the model's "
                    "outputs, outputs -> scalar (e.g. lambda y: 0.5 * jnp.mean((y - t) ** 2)).")
  frontend = make_frontend(model, params, declarations)
  params = frontend.params
  batch = _check_inputs(x, params)
  axes = _mesh.resolve(axis_name, x, params)
  devices = _mesh.size(axes)
  # Per-device gradients (summed explicitly below), not JAX's implicit sum over the devices.
  params = _mesh.vary(params, axes)
  key = _mesh.fold_key(key, axes)
  leaves = jax.tree.leaves(params)
  structured = {g.path: g for g in frontend.groups
                if g.declaration.kind == "riemannian"
                and (g.structure is not None
                     or isinstance(frontend, (_LinenFrontend, _FunctionFrontend)))}

  if curvature_batch is not None:
    if not isinstance(curvature_batch, int) or not 0 < curvature_batch <= batch:
      raise ValueError(f"curvature_batch={curvature_batch!r}: use an int in [1, {batch}] (the "
                       "number of leading samples of the batch the curvature is computed on).")
  if curvature_batch is None or curvature_batch == batch:
    outputs, vjp, inputs, taps = _tapped_pass(frontend, params, x, structured)
    _check_outputs(outputs, batch, loss_fn)
    loss, loss_cotangent = jax.value_and_grad(loss_fn)(outputs)
    grads = vjp(loss_cotangent)[0]
    x_curv, outputs_curv, num_curv = x, outputs, batch
  else:
    # Gradient from every sample; factor rows from the leading samples only (a cheaper, still
    # unbiased estimate of the batch-mean metric).
    outputs = frontend.apply(params, x, None)
    _check_outputs(outputs, batch, loss_fn)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(frontend.apply(p, x, None)))(params)
    loss_cotangent = jax.grad(loss_fn)(outputs)
    x_curv = jax.tree.map(lambda a: a[:curvature_batch], x)
    outputs_curv, vjp, inputs, taps = _tapped_pass(frontend, params, x_curv, structured)
    num_curv = curvature_batch
  loss, grads = _mesh.mean((loss, grads), axes)

  # With axis_name: B (or m) samples per device, rows scaled by the global count.
  root = jnp.sqrt(jnp.asarray(num_curv * devices, outputs_curv.dtype))
  # from_loss(): bound to this loss (and, with check_metric, tested for coupled samples).
  output_metric = output_metric.bind(loss_fn, outputs, num_curv, check_metric)
  unscaled_rows = output_metric(outputs_curv, key)
  if check_metric:
    check_scale(output_metric, loss_fn, outputs, unscaled_rows)
  factor_rows = unscaled_rows / root
  rows = _mesh.vary_like(jnp.moveaxis(factor_rows, 1, 0), outputs_curv)  # (k, B, *out)
  num_rows = rows.shape[0] * num_curv * devices
  tap_cotangents = jax.vmap(lambda r: vjp(r)[1])(rows) if taps else {}

  generic = [g for g in frontend.groups
             if g.declaration.kind == "riemannian" and g.path not in taps]
  generic_rows = _generic_rows(frontend, params, x_curv, rows, generic) if generic else {}

  modules = []
  for group in frontend.groups:
    factor = None
    if group.path in taps:
      # Dense, embedding or elementwise structure: the structure forms its own factor.
      recorded = inputs[group.path]
      if isinstance(group.structure, DenseStructure):
        # flax computes a dense layer in the promoted dtype (integer or bfloat16 inputs with
        # float32 kernels give float32): its features are the inputs in that dtype too.
        recorded = [jnp.asarray(v).astype(c.dtype)
                    for v, c in zip(recorded, tap_cotangents[group.path])]
      factor = factor_from_structure(group.structure, recorded, tap_cotangents[group.path])
      _check_leaf_names(group, factor.leaf_names)
    elif group.path in generic_rows:
      factor = RowsFactor(generic_rows[group.path])
    # With axes, this device's factor is its shard; the factor of the whole batch has every
    # device's rows, in the order of the global batch (a gather XLA drops if nothing reads it).
    shard = factor if axes and factor is not None else None
    if shard is not None:
      factor = _mesh.gather_samples(shard, axes)
    modules.append(ModuleCurvature(
        factor=factor, mass=_mass_leaves(group, leaves), name=module_name(group.path),
        kind=group.declaration.kind, leaf_indices=tuple(group.leaf_indices),
        leaf_names=tuple(group.leaf_names), shard=shard))
  modules.sort(key=lambda m: m.leaf_indices[0])
  coordinates = None
  if output_metric.coordinates is not None:
    # K^T e = sum_s J_s^T L_s^T e_s / sqrt(m) must equal the curvature samples' gradient
    # sum_s J_s^T c_s, so e_s = sqrt(m) * (coordinates of c_s in the unscaled rows L_s).
    # With axis_name the global loss is the mean of the devices' losses: cotangent / devices.
    per_sample = output_metric.coordinates(
        outputs_curv, _mesh.scaled(loss_cotangent[:num_curv], devices))  # (m, k)
    per_sample = _mesh.gather(per_sample, axes, axis=0)
    coordinates = (root * jnp.moveaxis(per_sample, 1, 0)).reshape(-1)
  curvature = Curvature(tuple(modules), coordinates, tuple(tuple(np.shape(l)) for l in leaves),
                        num_rows, output_metric.name, leaf_paths=leaf_paths(params),
                        axis_name=axes, value=loss)
  return loss, grads, curvature


def _check_leaf_names(group: ModuleGroup, expected: tuple[str, ...]) -> None:
  if sorted(group.leaf_names) != sorted(expected):
    raise ValueError(f"Module {module_name(group.path)!r} has parameters {sorted(group.leaf_names)}; "
                     f"its dense structure expects {sorted(expected)}.")

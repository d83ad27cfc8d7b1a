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

import dataclasses
import math
from typing import Any, Callable, Hashable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from riemod import _tape
from riemod.composer.factors import DenseFactor, Factor, RowsFactor
from riemod.metrics import OutputMetric
from riemod.nn.declaration import KINDS, MetricDeclaration, validate_mass
from riemod.nn.structure import DenseStructure, linen_structure, structure_of


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModuleCurvature:
  """One module's share of the curvature.

  Attributes:
    factor: its ``K_a`` (``None`` for euclidean and frozen modules, which need none).
    mass: declared masses ``{leaf name: array}`` or ``None`` (the transform's default applies).
    name: the module's path, e.g. ``"layers/0"``.
    kind: ``"layerwise"``, ``"euclidean"`` or ``"frozen"``.
    leaf_indices: positions of its parameters in ``jax.tree.leaves(params)``.
    leaf_names: the parameters' names (``"kernel"``, ``"bias"``, ...), aligned with ``leaf_indices``.
  """

  factor: Factor | None
  mass: dict[str, jax.Array] | None
  name: str = dataclasses.field(metadata=dict(static=True))
  kind: str = dataclasses.field(metadata=dict(static=True))
  leaf_indices: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  leaf_names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Curvature:
  """What the optimizer needs besides the gradient: a pytree, safe under jit and optax.chain.

  Attributes:
    modules: one :class:`ModuleCurvature` per module, in parameter order.
    leaf_shapes: the shapes of ``jax.tree.leaves(params)``, to check the curvature matches.
    num_rows: ``d = k * B``, the number of factor rows.
    output_metric: the output metric's name.
  """

  modules: tuple[ModuleCurvature, ...]
  leaf_shapes: tuple[tuple[int, ...], ...] = dataclasses.field(metadata=dict(static=True))
  num_rows: int = dataclasses.field(metadata=dict(static=True))
  output_metric: str = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass
class _Group:
  """Parameters sharing a parent path: one module."""

  path: tuple[Hashable, ...]
  leaf_indices: list[int]
  leaf_names: list[str]
  declaration: MetricDeclaration
  structure: DenseStructure | None = None


def _path_entry(key) -> Hashable:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _groups(params: Any) -> list[_Group]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  groups: dict[tuple, _Group] = {}
  for index, (path, _) in enumerate(flat):
    entries = tuple(_path_entry(k) for k in path)
    parent, name = entries[:-1], str(entries[-1]) if entries else "param"
    group = groups.setdefault(parent, _Group(parent, [], [], MetricDeclaration()))
    group.leaf_indices.append(index)
    group.leaf_names.append(name)
  return list(groups.values())


def _name(path: tuple) -> str:
  return "/".join(map(str, path)) if path else "<root>"


def _apply_declarations(groups: list[_Group], declarations: Mapping[str, Any] | None) -> None:
  if not declarations:
    return
  by_name = {_name(g.path): g for g in groups}
  for name, declaration in declarations.items():
    if name not in by_name:
      raise KeyError(f"declarations names module {name!r}, which has no parameters here; the "
                     f"modules are {sorted(by_name)}.")
    if not isinstance(declaration, MetricDeclaration):
      declaration = MetricDeclaration(**declaration)
    by_name[name].declaration = declaration


# --------------------------------------------------------------------------- frontends
class _Frontend:
  """How to run one kind of model: NNX module, Linen apply function, or plain function."""

  params: Any
  groups: list[_Group]

  def apply(self, params: Any, x: Any, tape: _tape.Tape | None) -> jax.Array:
    raise NotImplementedError


_TAPPED_CLASSES: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
  """A subclass of a plain ``nnx.Linear``/``nnx.Conv`` whose call goes through the tape."""
  if cls not in _TAPPED_CLASSES:
    def __call__(self, x, *args, **kwargs):
      return _tape.tapped_call(self, None, x, lambda v: cls.__call__(self, v, *args, **kwargs))
    _TAPPED_CLASSES[cls] = type(f"Tapped{cls.__name__}", (cls,), {"__call__": __call__})
  return _TAPPED_CLASSES[cls]


class _NNXFrontend(_Frontend):

  def __init__(self, model: nnx.Module, declarations):
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.groups = _groups(nnx.as_pure(self.params))
    nodes = dict(nnx.iter_graph(model))
    for group in self.groups:
      node = nodes.get(group.path)
      if node is None:
        continue
      kind = getattr(node, "riemod_kind", "layerwise")
      mass = getattr(node, "riemod_mass", None)
      if isinstance(mass, Mapping):
        mass = dict(mass)
      group.declaration = MetricDeclaration(mass=mass, kind=kind)
      group.structure = structure_of(node)
    _apply_declarations(self.groups, declarations)
    self.structured_paths = {g.path for g in self.groups if g.structure is not None}

  def apply(self, params, x, tape):
    model = nnx.merge(self.graphdef, params, self.rest)
    if tape is not None:
      for path, node in nnx.iter_graph(model):
        if path in self.structured_paths:
          tape.owners[id(node)] = path
          if type(node) in (nnx.Linear, nnx.Conv):
            node.__class__ = _tapped_class(type(node))
    return model(x)


class _LinenFrontend(_Frontend):

  def __init__(self, apply_fn: Callable, params: Any, declarations):
    self.apply_fn, self.params = apply_fn, params
    self.groups = _groups(params)
    _apply_declarations(self.groups, declarations)

  def apply(self, params, x, tape):
    from flax import linen

    if tape is None:
      return self.apply_fn(params, x)

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__" or type(module) not in (linen.Dense, linen.Conv):
        return next_fun(*args, **kwargs)
      key = ("params",) + tuple(module.path)
      if tape.taps is None:  # shape pass: learn the structure of each layer
        structure = linen_structure(module, module.variables["params"]["kernel"].shape)
        if structure is None:
          return next_fun(*args, **kwargs)
        tape.structures[key] = structure
      elif key not in tape.taps:
        return next_fun(*args, **kwargs)
      return _tape.tapped_call(module, key, args[0],
                               lambda v: next_fun(v, *args[1:], **kwargs))

    with linen.intercept_methods(interceptor):
      return self.apply_fn(params, x)


class _FunctionFrontend(_Frontend):

  def __init__(self, fn: Callable, params: Any, declarations):
    self.fn, self.params = fn, params
    self.groups = _groups(params)
    _apply_declarations(self.groups, declarations)

  def apply(self, params, x, tape):
    return self.fn(params, x)


def _frontend(model, params, declarations) -> _Frontend:
  from flax import linen

  if isinstance(model, nnx.Module):
    if params is not None:
      raise ValueError("An NNX model carries its parameters: do not pass params=.")
    return _NNXFrontend(model, declarations)
  if isinstance(model, linen.Module):
    model = model.apply
  if not callable(model):
    raise TypeError(f"model={model!r} is neither an nnx.Module nor a callable f(params, x).")
  if params is None:
    raise ValueError("A Linen apply function or a plain function needs params=: the parameter "
                     "pytree it is applied to.")
  owner = getattr(model, "__self__", None)
  if isinstance(owner, linen.Module):
    return _LinenFrontend(model, params, declarations)
  return _FunctionFrontend(model, params, declarations)


# --------------------------------------------------------------------------- the computation
def _check_inputs(x: Any, params: Any) -> int:
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError("x has no arrays: pass the batch of inputs (leading axis = samples).")
  batch = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if None in batch or len(batch) != 1:
    raise ValueError(f"Every array in x must have the same leading (sample) axis; got leading "
                     f"sizes {sorted(map(str, batch))}.")
  for leaf in jax.tree.leaves(params):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(f"A parameter has dtype {jnp.result_type(leaf)}; riemod trains floating "
                      "point parameters only (float32 or float64).")
  return batch.pop()


def _generic_rows(frontend: _Frontend, params: Any, x: Any, rows: jax.Array,
                  groups: list[_Group]) -> dict[tuple, dict[str, jax.Array]]:
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

  per_sample = jax.vmap(one_sample)(x, jnp.moveaxis(rows, 0, 1))  # list of (B, k, *shape)
  out, position = {}, 0
  for g in groups:
    out[g.path] = {name: jnp.moveaxis(per_sample[position + j], 0, 1)
                   for j, name in enumerate(g.leaf_names)}
    position += len(g.leaf_indices)
  return out


def _mass_leaves(group: _Group, leaves: list[jax.Array]) -> dict[str, jax.Array] | None:
  mass = group.declaration.mass
  if mass is None:
    return None
  dtype = leaves[group.leaf_indices[0]].dtype
  if isinstance(mass, float):
    return {name: jnp.asarray(mass, dtype) for name in group.leaf_names}
  if not isinstance(mass, Mapping):
    mass = {group.leaf_names[0]: mass} if len(group.leaf_names) == 1 else mass
  if not isinstance(mass, Mapping) or set(mass) != set(group.leaf_names):
    raise ValueError(f"The mass of module {_name(group.path)!r} must be a float or a dict with "
                     f"keys {sorted(group.leaf_names)}.")
  out = {}
  for name, index in zip(group.leaf_names, group.leaf_indices):
    value = jnp.asarray(mass[name], dtype)
    if value.ndim and value.shape != leaves[index].shape:
      raise ValueError(f"The mass of {_name(group.path)}/{name} has shape {value.shape}; it must "
                       f"be a scalar or match the parameter's shape {leaves[index].shape}.")
    out[name] = value
  return out


def _tapped_pass(frontend: _Frontend, params: Any, x: Any, structured: dict[tuple, _Group]):
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

  def forward(p, t):
    tape = _tape.Tape(owners={}, taps=t)
    with _tape.recording(tape):
      y = frontend.apply(p, x, tape)
    return y, {k: v for k, v in tape.inputs.items() if k in t}

  outputs, vjp, inputs = jax.vjp(forward, params, taps, has_aux=True)
  return outputs, vjp, inputs, taps


def _check_outputs(outputs: jax.Array, batch: int, loss_fn: Callable) -> None:
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
    output_metric: OutputMetric,
    *,
    params: Any = None,
    key: jax.Array | None = None,
    declarations: Mapping[str, Any] | None = None,
    curvature_batch: int | None = None,
) -> tuple[jax.Array, Any, Curvature]:
  """Loss, gradient and curvature of ``loss_fn(model(x))`` in one forward and backward pass.

  Args:
    model: an ``nnx.Module``; a Linen module or its ``apply`` (then pass ``params``, the variables
      dict); or a plain function ``f(params, x) -> outputs`` (PINN residuals, least squares).
      Samples must not interact (no batch statistics).
    x: the batch: an array or pytree of arrays with a leading sample axis ``B``.
    loss_fn: ``outputs -> scalar``, a mean over the batch (the metric rows are scaled to match).
    output_metric: one of :mod:`riemod.metrics`.
    params: the parameter pytree (Linen and plain functions only).
    key: PRNG key for random output metrics (sampled Fisher, sketches).
    declarations: ``{module name: MetricDeclaration or dict(mass=..., kind=...)}``; module names
      are parameter parent paths joined by ``/`` (e.g. ``"params/Dense_0"``). For NNX models they
      override the modules' own declarations.
    curvature_batch: compute the factor rows on the first ``m`` samples only (rows scaled by
      ``1/sqrt(m)``) while the loss and gradient use the whole batch. With the exact softmax
      Fisher, ``m = 16..32`` keeps the capacitance small (``d = k m``) at full gradient accuracy.

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
  if not isinstance(output_metric, OutputMetric):
    raise TypeError(f"output_metric={output_metric!r}: use one of riemod.metrics (identity(), "
                    "softmax_fisher(), ...), or riemod.metrics.custom(...).")
  frontend = _frontend(model, params, declarations)
  params = frontend.params
  batch = _check_inputs(x, params)
  leaves = jax.tree.leaves(params)
  structured = {g.path: g for g in frontend.groups
                if g.declaration.kind == "layerwise"
                and (g.structure is not None or isinstance(frontend, _LinenFrontend))}

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
    x_curv = jax.tree.map(lambda a: a[:curvature_batch], x)
    outputs_curv, vjp, inputs, taps = _tapped_pass(frontend, params, x_curv, structured)
    num_curv = curvature_batch

  factor_rows = output_metric(outputs_curv, key) / jnp.sqrt(
      jnp.asarray(num_curv, outputs_curv.dtype))
  rows = jnp.moveaxis(factor_rows, 1, 0)  # (k, B, *out)
  num_rows = rows.shape[0] * num_curv
  tap_cotangents = jax.vmap(lambda r: vjp(r)[1])(rows) if taps else {}

  generic = [g for g in frontend.groups
             if g.declaration.kind == "layerwise" and g.path not in taps]
  generic_rows = _generic_rows(frontend, params, x_curv, rows, generic) if generic else {}

  modules = []
  for group in frontend.groups:
    factor = None
    if group.path in taps:
      s = group.structure
      features = jnp.concatenate([s.features(v) for v in inputs[group.path]], axis=1)
      cotangents = jnp.concatenate(
          [s.positions(c, batch_axes=1) for c in tap_cotangents[group.path]], axis=2)
      factor = DenseFactor(features, cotangents, s)
      _check_leaf_names(group, factor.leaf_names)
    elif group.path in generic_rows:
      factor = RowsFactor(generic_rows[group.path])
    modules.append(ModuleCurvature(
        factor=factor, mass=_mass_leaves(group, leaves), name=_name(group.path),
        kind=group.declaration.kind, leaf_indices=tuple(group.leaf_indices),
        leaf_names=tuple(group.leaf_names)))
  modules.sort(key=lambda m: m.leaf_indices[0])
  curvature = Curvature(tuple(modules), tuple(tuple(np.shape(l)) for l in leaves), num_rows,
                        output_metric.name)
  return loss, grads, curvature


def _check_leaf_names(group: _Group, expected: tuple[str, ...]) -> None:
  if sorted(group.leaf_names) != sorted(expected):
    raise ValueError(f"Module {_name(group.path)!r} has parameters {sorted(group.leaf_names)}; "
                     f"its dense structure expects {sorted(expected)}.")

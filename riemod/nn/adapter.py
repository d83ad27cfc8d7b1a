"""The one model adapter: NNX modules, Linen modules and plain functions ``f(params, x)``.

Everything in riemod that runs a model (the curvature measurement, the certificates) goes through a
:class:`Frontend`: it splits the model into a parameter pytree and an ``apply(params, x, tape)``
function, and groups the parameters into modules (parameters sharing a parent path) with their
metric declarations. With a recording tape active, recognised dense and conv layers record their
inputs and add a zero tap to their outputs (see ``riemod._tape``). Recognised by type: dense,
``LinearGeneral``/``DenseGeneral`` (attention projections), conv, embedding and norm layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Hashable, Mapping

import jax
from flax import nnx

from riemod import _tape
from riemod.nn.declaration import MetricDeclaration
from riemod.nn.structure import Structure, linen_structure, normalized_input, structure_of



@dataclasses.dataclass
class ModuleGroup:
  """Parameters sharing a parent path: one module."""

  path: tuple[Hashable, ...]
  leaf_indices: list[int]
  leaf_names: list[str]
  declaration: MetricDeclaration
  structure: Structure | None = None


def _path_entry(key) -> Hashable:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def parameter_groups(params: Any) -> list[ModuleGroup]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  groups: dict[tuple, ModuleGroup] = {}
  for index, (path, _) in enumerate(flat):
    entries = tuple(_path_entry(k) for k in path)
    parent, name = entries[:-1], str(entries[-1]) if entries else "param"
    group = groups.setdefault(parent, ModuleGroup(parent, [], [], MetricDeclaration()))
    group.leaf_indices.append(index)
    group.leaf_names.append(name)
  return list(groups.values())


def module_name(path: tuple) -> str:
  return "/".join(map(str, path)) if path else "<root>"


class UnknownModuleError(ValueError, KeyError):
  """A name in ``declarations`` that is not a module (a ``ValueError``, and a ``KeyError`` for
  code that looks it up as one)."""


def _apply_declarations(groups: list[ModuleGroup], declarations: Mapping[str, Any] | None) -> None:
  if not declarations:
    return
  by_name = {module_name(g.path): g for g in groups}
  for name, declaration in declarations.items():
    if name not in by_name:
      raise UnknownModuleError(f"declarations names module {name!r}, which has no parameters "
                               f"here; the modules are {sorted(by_name)}.")
    if not isinstance(declaration, MetricDeclaration):
      declaration = MetricDeclaration(**declaration)
    by_name[name].declaration = declaration


class Frontend:
  """How to run one kind of model: NNX module, Linen apply function, or plain function."""

  params: Any
  groups: list[ModuleGroup]

  def apply(self, params: Any, x: Any, tape: _tape.Tape | None) -> jax.Array:
    raise NotImplementedError


_TAPPED_CLASSES: dict[type, type] = {}
# The flax layers recognised by type (riemod's own Dense and Conv tap themselves).
_TAPPABLE = (nnx.Linear, nnx.Conv, nnx.LinearGeneral, nnx.Embed, nnx.LayerNorm, nnx.RMSNorm)


def _records(tape: _tape.Tape, key) -> bool:
  return key is not None and (tape.taps is None or key in tape.taps)


def _tapped_class(cls: type) -> type:
  """A subclass of a recognised flax layer whose call goes through the tape."""
  if cls not in _TAPPED_CLASSES:
    if cls in (nnx.LayerNorm, nnx.RMSNorm):
      def __call__(self, x, *args, **kwargs):
        # The tape records xhat (the output without scale and bias), what the rows are made of.
        tape = _tape.active_tape()
        recorded = x
        if tape is not None and _records(tape, tape.key_of(self)):
          recorded = normalized_input(self, x, *args, **kwargs)
        return _tape.tapped_call(self, None, recorded,
                                 lambda _: cls.__call__(self, x, *args, **kwargs))
    else:
      def __call__(self, x, *args, **kwargs):
        return _tape.tapped_call(self, None, x, lambda v: cls.__call__(self, v, *args, **kwargs))
    namespace = {"__call__": __call__}
    if cls is nnx.Embed:
      def attend(self, query, *args, **kwargs):
        # A table also used as an output layer (weight tying) is not an embedding alone: the
        # shape pass sends it to the generic path, whose rows see both uses.
        tape = _tape.active_tape()
        if tape is not None and tape.taps is None and tape.key_of(self) is not None:
          tape.structures[tape.key_of(self)] = None
        return cls.attend(self, query, *args, **kwargs)
      namespace["attend"] = attend
    _TAPPED_CLASSES[cls] = type(f"Tapped{cls.__name__}", (cls,), namespace)
  return _TAPPED_CLASSES[cls]


class _NNXFrontend(Frontend):

  def __init__(self, model: nnx.Module, declarations):
    for path, node in nnx.iter_graph(model):
      if (isinstance(node, nnx.Dropout) and node.rate > 0
          and not getattr(node, "deterministic", False)):
        raise ValueError(
            f"The model has an active nnx.Dropout at {'/'.join(map(str, path)) or '<root>'}: the "
            "curvature needs the same deterministic network for the gradient and every factor "
            "row. Call model.eval() (or pass deterministic=True) before "
            "value_grad_and_curvature, and model.train() for other uses.")
      if isinstance(node, nnx.BatchNorm) and not node.use_running_average:
        raise ValueError(
            f"The model has an nnx.BatchNorm in training mode at "
            f"{'/'.join(map(str, path)) or '<root>'}: its batch statistics couple the samples, "
            "which every output metric assumes they do not (and it would update its statistics "
            "inside riemod's traces). Call model.eval() (use_running_average=True) before "
            "value_grad_and_curvature.")
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.groups = parameter_groups(nnx.as_pure(self.params))
    nodes = dict(nnx.iter_graph(model))
    for group in self.groups:
      node = nodes.get(group.path)
      if node is None:
        continue
      kind = getattr(node, "riemod_kind", "riemannian")
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
          if type(node) in _TAPPABLE:
            node.__class__ = _tapped_class(type(node))
    return model(x)


@contextlib.contextmanager
def _linen_errors():
  """Flax's errors for stochastic and batch-statistics layers, said in riemod's terms."""
  from flax import errors

  try:
    yield
  except errors.InvalidRngError as error:
    raise ValueError(
        f"The Linen model needs a PRNG stream ({error}): a stochastic layer such as Dropout is "
        "active. The curvature needs the same deterministic network for the gradient and every "
        "factor row: build the model with deterministic=True (e.g. linen.Dropout(rate, "
        "deterministic=True), or a train flag set to False) for value_grad_and_curvature."
    ) from error
  except errors.ModifyScopeVariableError as error:
    raise ValueError(
        f"The Linen model updates a variable collection during apply ({error}): batch "
        "statistics (BatchNorm with use_running_average=False) couple the samples, which every "
        "output metric assumes they do not. Use use_running_average=True (evaluation mode) for "
        "value_grad_and_curvature.") from error


class _LinenFrontend(Frontend):

  def __init__(self, apply_fn: Callable, params: Any, declarations):
    if isinstance(params, Mapping) and "params" not in params:
      raise ValueError(
          "A Linen model needs params= the whole variables dict (variables = model.init(...), "
          "with its 'params' collection), not variables['params']: Linen's apply looks the "
          "parameters up under 'params'.")
    self.apply_fn, self.params = apply_fn, params
    self.groups = parameter_groups(params)
    _apply_declarations(self.groups, declarations)

  def apply(self, params, x, tape):
    from flax import linen

    if tape is None:
      with _linen_errors():
        return self.apply_fn(params, x)

    tappable = (linen.Dense, linen.Conv, linen.DenseGeneral, linen.Embed, linen.LayerNorm,
                linen.RMSNorm)
    inside = []  # set while a norm layer's xhat is computed (its own calls are not tapped)

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if inside or type(module) not in tappable or context.method_name not in ("__call__",
                                                                             "attend"):
        return next_fun(*args, **kwargs)
      key = ("params",) + tuple(module.path)
      if context.method_name == "attend":  # a tied embedding: the generic path sees both uses
        if tape.taps is None:
          tape.structures[key] = None
        return next_fun(*args, **kwargs)
      if tape.taps is None:  # shape pass: learn the structure of each layer
        if tape.structures.get(key, 0) is None:
          return next_fun(*args, **kwargs)
        shapes = {name: value.shape for name, value in module.variables["params"].items()}
        structure = linen_structure(module, shapes)
        if structure is None:
          return next_fun(*args, **kwargs)
        tape.structures[key] = structure
      elif key not in tape.taps:
        return next_fun(*args, **kwargs)
      recorded = args[0]
      if type(module) in (linen.LayerNorm, linen.RMSNorm):
        bare = module.clone(parent=None, use_scale=False,
                            **({"use_bias": False} if type(module) is linen.LayerNorm else {}))
        inside.append(True)
        try:
          recorded = bare.apply({}, *args, **kwargs)
        finally:
          inside.pop()
        return _tape.tapped_call(module, key, recorded, lambda _: next_fun(*args, **kwargs))
      return _tape.tapped_call(module, key, recorded,
                               lambda v: next_fun(v, *args[1:], **kwargs))

    with linen.intercept_methods(interceptor), _linen_errors():
      return self.apply_fn(params, x)


class _FunctionFrontend(Frontend):

  def __init__(self, fn: Callable, params: Any, declarations):
    self.fn, self.params = fn, params
    self.groups = parameter_groups(params)
    _apply_declarations(self.groups, declarations)

  def apply(self, params, x, tape):
    if tape is not None:
      # riemod.nn.dense, embed and the norms find their module by the identity of a parameter.
      leaves = jax.tree.leaves(params)
      for group in self.groups:
        for index in group.leaf_indices:
          tape.owners[id(leaves[index])] = group.path
    return self.fn(params, x)


def frontend(model, params, declarations) -> Frontend:
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



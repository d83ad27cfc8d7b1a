"""Reparametrisations ``phi`` such that a model factors as ``g(theta, x) = f(phi(theta), x)``.

A conservation law of gradient flows is a function ``h`` whose gradient is orthogonal to every
``grad phi_j`` (Marcotte, Gribonval & Peyre, *Abide by the Law and Follow the Flow*, NeurIPS 2023,
arXiv 2307.00144). This module builds ``phi`` for the architectures of that paper, together with
their known laws, and wraps any user JAX function ``phi(theta)`` on a flat or pytree parameter.

Parameter conventions: dense kernels are ``(fan_in, fan_out)`` (Flax ``x @ W``), so a linear network
with widths ``dims = (d0, ..., dq)`` computes ``x @ W1 @ ... @ Wq`` and its ``phi`` is that product.

Example:
  >>> from riemod.conservation import relu_network
  >>> rep = relu_network((3, 4, 2))
  >>> rep.num_parameters, rep.known_laws(rep.sample(0)).shape
  (20, (4,))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Reparametrization",
    "as_reparametrization",
    "factorization",
    "homogeneous_neuron",
    "linear_network",
    "relu_network",
    "residual_block",
    "two_layer_relu",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Reparametrization:
  """A map ``phi`` from parameters to the quantities the model really depends on.

  Attributes:
    name: short human-readable description.
    phi: ``phi(params) -> array or pytree`` (differentiable JAX function).
    template: pytree of ``jax.ShapeDtypeStruct`` describing ``params``.
    variable_names: one readable name per flat parameter coordinate (``ravel_pytree`` order).
    known_laws: optional ``params -> (K,)`` array of quantities known to be conserved by gradient
      flow (``None`` for user functions).
    positive: draw random points with positive entries (needed by mirror/NMF flows).
    polynomial: optional ``() -> (out, mono, coef, num_outputs)``, ``phi`` as an exact sparse
      polynomial of the flat parameters: term ``t`` adds ``coef[t] * prod theta[mono[t]]`` to output
      ``out[t]`` (``mono`` rows padded with ``D``). When present, ``count_laws`` brackets the fields
      exactly (``riemod.conservation.polyfields``); ``None`` for user functions.
  """

  name: str
  phi: Callable[[PyTree], Any]
  template: PyTree
  variable_names: tuple[str, ...]
  known_laws: Optional[Callable[[PyTree], jax.Array]] = None
  positive: bool = False
  polynomial: Optional[Callable[[], tuple]] = None

  @property
  def num_parameters(self) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(self.template))

  def unravel(self, flat: jax.Array) -> PyTree:
    """Flat vector (``ravel_pytree`` order) -> parameter pytree, keeping ``flat``'s dtype."""
    leaves, treedef = jax.tree_util.tree_flatten(self.template)
    out, start = [], 0
    for leaf in leaves:
      size = math.prod(leaf.shape)
      out.append(jnp.reshape(flat[start:start + size], leaf.shape))
      start += size
    return jax.tree_util.tree_unflatten(treedef, out)

  def ravel(self, params: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]) if leaves else jnp.zeros((0,))

  def flat_phi(self, flat: jax.Array) -> jax.Array:
    """``phi`` on a flat parameter vector, with a flat output."""
    out = self.phi(self.unravel(flat))
    leaves = jax.tree_util.tree_leaves(out)
    return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])

  def sample(self, key, dtype=None) -> PyTree:
    """A random (generic) parameter point: standard normal entries, absolute values if positive."""
    if isinstance(key, int):
      key = jax.random.PRNGKey(key)
    dtype = dtype or jnp.result_type(float)
    flat = jax.random.normal(key, (self.num_parameters,), dtype)
    if self.positive:
      flat = jnp.abs(flat) + 0.1
    return self.unravel(flat)


def _names_for(template: PyTree) -> tuple[str, ...]:
  names = []
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(template)[0]
  single = len(paths_and_leaves) == 1
  for path, leaf in paths_and_leaves:
    prefix = "x" if single else jax.tree_util.keystr(path)
    if single and len(leaf.shape) == 1:
      names.extend(f"x{i + 1}" for i in range(leaf.shape[0]))
      continue
    for index in np.ndindex(*leaf.shape):
      names.append(prefix + ("[" + ",".join(map(str, index)) + "]" if index else ""))
  return tuple(names)


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, (int, np.integer)) for i in x)


def _to_template(theta_or_shapes) -> tuple[PyTree, Optional[PyTree]]:
  """Returns (template of ShapeDtypeStruct, the point if actual arrays were given)."""
  if isinstance(theta_or_shapes, (int, np.integer)):
    if theta_or_shapes < 1:
      raise ValueError(f"theta_or_shapes={theta_or_shapes}: the number of parameters must be >= 1.")
    return jax.ShapeDtypeStruct((int(theta_or_shapes),), jnp.float32), None
  leaves = jax.tree_util.tree_leaves(theta_or_shapes, is_leaf=_is_shape)
  if not leaves:
    raise ValueError("theta_or_shapes is empty: pass a parameter pytree, a pytree of shape tuples or "
                     "an int (flat parameter size).")
  if all(_is_shape(leaf) or isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
    template = jax.tree_util.tree_map(
        lambda s: s if isinstance(s, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(s, jnp.float32),
        theta_or_shapes, is_leaf=_is_shape)
    return template, None
  try:
    point = jax.tree_util.tree_map(jnp.asarray, theta_or_shapes)
  except TypeError as err:
    raise TypeError("theta_or_shapes must be a pytree of arrays, a pytree of shape tuples or an int; "
                    f"got {type(theta_or_shapes).__name__}.") from err
  for leaf in jax.tree_util.tree_leaves(point):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"theta_or_shapes has a leaf of dtype {leaf.dtype}; parameters must be floating "
                      "point (use .astype(jnp.float32)).")
  template = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), point)
  return template, point


def as_reparametrization(phi, theta_or_shapes=None, *, name: str = "user phi",
                         variable_names: Optional[Sequence[str]] = None,
                         positive: bool = False) -> tuple[Reparametrization, Optional[PyTree]]:
  """Normalises ``phi`` (a ``Reparametrization`` or a JAX function) and its parameter description.

  Args:
    phi: a ``Reparametrization`` or a function ``phi(theta)`` returning an array or pytree.
    theta_or_shapes: a parameter pytree (its values become the first evaluation point), a pytree of
      shape tuples, or an int ``D`` for a flat vector. Optional when ``phi`` is a ``Reparametrization``.
    name: description used in reports.
    variable_names: readable names of the flat coordinates (default ``x1..xD`` or pytree paths).
    positive: sample random points with positive entries.

  Returns:
    ``(reparametrization, point_or_None)``.

  Raises:
    TypeError / ValueError: with the offending argument named, when ``phi`` is not callable, does not
      accept the given shapes, or does not return floating-point values.

  Example:
    >>> import jax.numpy as jnp
    >>> rep, _ = as_reparametrization(lambda x: jnp.prod(x), 3)
    >>> rep.variable_names
    ('x1', 'x2', 'x3')
  """
  if isinstance(phi, Reparametrization):
    if theta_or_shapes is None:
      return phi, None
    template, point = _to_template(theta_or_shapes)
    got = jax.tree_util.tree_structure(template), [l.shape for l in jax.tree_util.tree_leaves(template)]
    want = (jax.tree_util.tree_structure(phi.template),
            [l.shape for l in jax.tree_util.tree_leaves(phi.template)])
    if got != want:
      raise ValueError(f"theta_or_shapes has shapes {got[1]} but the reparametrization '{phi.name}' "
                       f"expects {want[1]}; pass None to use its own shapes.")
    return phi, point
  if not callable(phi):
    raise TypeError(f"phi must be a Reparametrization or a callable phi(theta); got {type(phi).__name__}.")
  if theta_or_shapes is None:
    raise ValueError("theta_or_shapes is required when phi is a plain function: pass the parameters, "
                     "their shapes, or the flat size D.")
  template, point = _to_template(theta_or_shapes)
  try:
    out = jax.eval_shape(phi, template)
  except Exception as err:  # pylint: disable=broad-except
    shapes = [l.shape for l in jax.tree_util.tree_leaves(template)]
    raise ValueError(f"phi could not be evaluated on parameters of shapes {shapes} given by "
                     f"theta_or_shapes ({type(err).__name__}: {err}). Check that the shapes match what "
                     "phi expects.") from err
  for leaf in jax.tree_util.tree_leaves(out):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"phi returns dtype {leaf.dtype}; a reparametrization must be a differentiable "
                      "function with floating-point outputs (integer/boolean outputs have no gradient).")
  names = tuple(variable_names) if variable_names is not None else _names_for(template)
  rep = Reparametrization(name=name, phi=phi, template=template, variable_names=names,
                          positive=positive)
  if len(names) != rep.num_parameters:
    raise ValueError(f"variable_names has {len(names)} entries but there are {rep.num_parameters} "
                     "parameters.")
  return rep, point


def _check_dims(dims: Sequence[int], what: str) -> tuple[int, ...]:
  dims = tuple(int(d) for d in dims)
  if len(dims) < 2 or any(d < 1 for d in dims):
    raise ValueError(f"{what}: dims={dims} must list at least two positive layer widths, input first "
                     "(e.g. (3, 4, 2)).")
  return dims


def _layer_template(dims, bias, dtype=jnp.float32):
  layers = []
  for fan_in, fan_out in zip(dims[:-1], dims[1:]):
    layer = {"W": jax.ShapeDtypeStruct((fan_in, fan_out), dtype)}
    if bias:
      layer["b"] = jax.ShapeDtypeStruct((fan_out,), dtype)
    layers.append(layer)
  return layers


def _layer_names(dims, bias):
  names = []
  for index, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
    # ravel_pytree orders dict keys alphabetically: "W" before "b".
    names += [f"W{index}[{i},{j}]" for i in range(fan_in) for j in range(fan_out)]
    if bias:
      names += [f"b{index}[{j}]" for j in range(fan_out)]
  return tuple(names)


def _layer_offsets(dims, bias):
  """Flat offsets of each layer's kernel and bias (``ravel_pytree`` order: "W" before "b")."""
  offsets, start = [], 0
  for fan_in, fan_out in zip(dims[:-1], dims[1:]):
    kernel = start
    start += fan_in * fan_out
    offsets.append((kernel, start if bias else None))
    if bias:
      start += fan_out
  return offsets, start


def _path_monomials(dims, offsets, first_layer):
  """Monomials (rows of flat kernel indices) of all paths through layers ``first_layer..q``.

  Paths are enumerated in C order of ``(i_first, ..., i_q)``, the order of ``_path_lifting``.
  """
  widths = dims[first_layer:]
  grid = np.indices(widths).reshape(len(widths), -1)
  columns = []
  for step in range(len(widths) - 1):
    layer = first_layer + step
    kernel = offsets[layer][0]
    columns.append(kernel + grid[step] * dims[layer + 1] + grid[step + 1])
  return grid, (np.stack(columns, axis=1) if columns else np.zeros((grid.shape[1], 0), np.int64))


def _linear_polynomial(dims):
  offsets, size = _layer_offsets(dims, False)

  def polynomial():
    grid, mono = _path_monomials(dims, offsets, 0)
    out = grid[0] * dims[-1] + grid[-1]
    return out, mono, np.ones(out.size), dims[0] * dims[-1]

  return polynomial


def _relu_polynomial(dims, bias):
  offsets, size = _layer_offsets(dims, bias)

  def polynomial():
    outs, monos, start = [], [], 0
    grid, mono = _path_monomials(dims, offsets, 0)
    outs.append(np.arange(mono.shape[0]))
    monos.append(mono)
    start = mono.shape[0]
    if bias:
      for level in range(1, len(dims)):
        grid, mono = _path_monomials(dims, offsets, level)
        bias_index = offsets[level - 1][1] + grid[0]
        mono = np.concatenate([bias_index[:, None], mono], axis=1)
        outs.append(start + np.arange(mono.shape[0]))
        width = len(dims) - 1
        monos.append(np.pad(mono, ((0, 0), (0, width - mono.shape[1])), constant_values=size))
        start += mono.shape[0]
    out = np.concatenate(outs)
    return out, np.concatenate(monos), np.ones(out.size), start

  return polynomial


def linear_network(dims: Sequence[int]) -> Reparametrization:
  """Linear network ``x -> x W1 ... Wq``; ``phi`` = the entries of the product.

  Known laws (balancedness): ``W_l^T W_l - W_{l+1} W_{l+1}^T`` for each hidden layer (upper triangle).

  Example:
    >>> rep = linear_network((3, 4, 2))
    >>> rep.num_parameters
    20
  """
  dims = _check_dims(dims, "linear_network")

  def phi(params):
    out = params[0]["W"]
    for layer in params[1:]:
      out = out @ layer["W"]
    return out

  def laws(params):
    values = []
    for left, right in zip(params[:-1], params[1:]):
      gram = left["W"].T @ left["W"] - right["W"] @ right["W"].T
      rows, cols = np.triu_indices(gram.shape[0])
      values.append(gram[rows, cols])
    return jnp.concatenate(values) if values else jnp.zeros((0,))

  return Reparametrization(name=f"linear network {dims}", phi=phi, template=_layer_template(dims, False),
                           variable_names=_layer_names(dims, False), known_laws=laws,
                           polynomial=_linear_polynomial(dims))


def factorization(n: int, m: int, r: int, *, positive: bool = False) -> Reparametrization:
  """Two-layer factorisation ``U V^T`` with ``U: n x r``, ``V: m x r`` (params ``{"U", "V"}``).

  Known laws: the entries of ``U^T U - V^T V`` (upper triangle: ``r(r+1)/2`` values). With
  ``positive=True`` random points are entrywise positive (non-negative matrix factorisation).

  Example:
    >>> rep = factorization(3, 2, 2)
    >>> rep.known_laws(rep.sample(0)).shape
    (3,)
  """
  for value, label in ((n, "n"), (m, "m"), (r, "r")):
    if int(value) < 1:
      raise ValueError(f"factorization: {label}={value} must be a positive integer.")
  template = {"U": jax.ShapeDtypeStruct((n, r), jnp.float32), "V": jax.ShapeDtypeStruct((m, r), jnp.float32)}
  names = tuple(f"U[{i},{k}]" for i in range(n) for k in range(r)) + tuple(
      f"V[{j},{k}]" for j in range(m) for k in range(r))

  def phi(params):
    return params["U"] @ params["V"].T

  def laws(params):
    gram = params["U"].T @ params["U"] - params["V"].T @ params["V"]
    rows, cols = np.triu_indices(r)
    return gram[rows, cols]

  def polynomial():
    i, j, k = (a.ravel() for a in np.indices((n, m, r)))
    mono = np.stack([i * r + k, n * r + j * r + k], axis=1)
    return i * m + j, mono, np.ones(i.size), n * m

  return Reparametrization(name=f"factorization U V^T (n={n}, m={m}, r={r})", phi=phi, template=template,
                           variable_names=names, known_laws=laws, positive=positive, polynomial=polynomial)


def _path_lifting(params, bias: bool) -> jax.Array:
  # Products of weights along every input-to-output path; with biases, every bias times every
  # downstream path (each hidden bias acts as an extra input neuron of its layer).
  weights = [layer["W"] for layer in params]
  pieces = []
  starts = range(len(weights) + 1) if bias else [0]
  for start in starts:
    if start == 0:
      paths = weights[0]
      rest = weights[1:]
    else:
      paths = params[start - 1]["b"]
      rest = weights[start:]
    for weight in rest:
      paths = paths[..., :, None] * weight
    pieces.append(jnp.ravel(paths))
  return jnp.concatenate(pieces)


def relu_network(dims: Sequence[int], *, bias: bool = False) -> Reparametrization:
  """ReLU network on a region of fixed activation pattern (all units active); ``phi`` = path-lifting.

  The path-lifting lists, for every input-to-output path, the product of its weights and, with biases,
  every bias times every path from its neuron to the output. Known laws: one per hidden neuron,
  ``||incoming weights||^2 (+ bias^2) - ||outgoing weights||^2``.

  Example:
    >>> rep = relu_network((2, 3, 2), bias=True)
    >>> rep.known_laws(rep.sample(0)).shape
    (3,)
  """
  dims = _check_dims(dims, "relu_network")

  def phi(params):
    return _path_lifting(params, bias)

  def laws(params):
    values = []
    for left, right in zip(params[:-1], params[1:]):
      incoming = jnp.sum(left["W"] ** 2, axis=0)
      if bias:
        incoming = incoming + left["b"] ** 2
      values.append(incoming - jnp.sum(right["W"] ** 2, axis=1))
    return jnp.concatenate(values) if values else jnp.zeros((0,))

  kind = "with" if bias else "without"
  return Reparametrization(name=f"ReLU network {dims} {kind} biases", phi=phi,
                           template=_layer_template(dims, bias), variable_names=_layer_names(dims, bias),
                           known_laws=laws, polynomial=_relu_polynomial(dims, bias))


def two_layer_relu(n_in: int, hidden: int, n_out: int) -> Reparametrization:
  """Two-layer ReLU network ``x -> relu(x U) V^T``: ``phi = (u_k v_k^T)_k``; ``r = hidden`` laws.

  Example:
    >>> two_layer_relu(3, 2, 2).num_parameters
    10
  """
  rep = relu_network((n_in, hidden, n_out))
  return dataclasses.replace(rep, name=f"two-layer ReLU (in={n_in}, hidden={hidden}, out={n_out})")


def residual_block(width: int, hidden: int, *, bias: bool = False) -> Reparametrization:
  """Attention-free residual block ``x + relu(x W1 + b1) W2 + b2`` (fixed activation pattern).

  The skip connection adds a parameter-free term, so ``phi`` is the path-lifting of the branch and the
  laws are those of a two-layer ReLU network: one per hidden neuron.

  Example:
    >>> residual_block(3, 4).num_parameters
    24
  """
  rep = relu_network((width, hidden, width), bias=bias)
  return dataclasses.replace(rep, name=f"residual block (width={width}, hidden={hidden}, bias={bias})")


def homogeneous_neuron(k: float = 1.0) -> Reparametrization:
  """Single neuron ``u sigma(v x)`` with ``sigma`` positively ``k``-homogeneous, on ``v x > 0``.

  There ``g = u v^k sigma(x)``, so ``phi = u v^k`` and ``u^2 - v^2 / k`` is conserved.

  Example:
    >>> rep = homogeneous_neuron(2.0)
    >>> rep.num_parameters
    2
  """
  if k <= 0:
    raise ValueError(f"homogeneous_neuron: k={k} must be positive.")
  template = {"u": jax.ShapeDtypeStruct((), jnp.float32), "v": jax.ShapeDtypeStruct((), jnp.float32)}

  def phi(params):
    # |v|^k keeps phi real for non-integer k; on v > 0 it is v^k.
    return jnp.reshape(params["u"] * jnp.abs(params["v"]) ** k, (1,))

  def laws(params):
    return jnp.reshape(params["u"] ** 2 - params["v"] ** 2 / k, (1,))

  polynomial = None
  if float(k).is_integer():
    # On v > 0, u |v|^k = u v^k: one monomial of degree k + 1.
    degree = int(k)
    polynomial = lambda: (np.zeros(1, np.int64), np.asarray([[0] + [1] * degree]), np.ones(1), 1)
  return Reparametrization(name=f"{k}-homogeneous neuron", phi=phi, template=template,
                           variable_names=("u", "v"), known_laws=laws, positive=True,
                           polynomial=polynomial)

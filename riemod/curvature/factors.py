"""Factor operators ``K_a``: the output-metric rows pulled back to one module's parameters.

Rows are indexed by (factor row ``r``, sample ``s``), ``d = R * B`` in all, ``r``-major. A module's
parameters are a dict ``{leaf name: array}``. Every factor offers the four products the composer
needs: ``gram`` (``K D^{-1} K^T``), ``matvec`` (``K v``), ``rmatvec`` (``K^T t``) and ``rows``
(``K`` itself, for parameter-space solves and tests).

``DenseFactor`` keeps ``K`` implicit. For a dense layer the row of ``(r, s)`` is
``(x_s outer c_rs, c_rs)``, so ``(K K^T)[(r,s),(r',s')] = (c_rs . c_r's') (x_s . x_s' / m_W + 1 / m_b)``:
a Hadamard product of two small Gram matrices (see docs/method.md). Convolutions have the same
structure summed over output positions.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from riemod.nn.structure import DenseStructure, ElementwiseStructure, EmbedStructure

Leaves = Mapping[str, jax.Array]


def _scalar(inv_mass) -> bool:
  return jnp.ndim(inv_mass) == 0


def _take(array: jax.Array, samples: tuple | None, axis: int) -> jax.Array:
  """The samples ``start .. start + size - 1`` of ``array`` along ``axis`` (all for ``None``;
  ``start`` may be traced, ``size`` is static)."""
  if samples is None:
    return array
  start, size = samples
  return jax.lax.dynamic_slice_in_dim(array, start, size, axis)


# Formed rows may hold at most this many times a dense factor's own elements (see
# DenseFactor.for_products): the char-LM's per-token layers (in x out = 128 x 512, 64 positions,
# one row per sequence) hold 1.6x.
_MATERIALISE_RATIO = 4


def _row_slab(rows: Leaves, num_samples: int, samples: tuple | None) -> Leaves:
  """Materialised rows ``{name: (R * B, ...)}`` (r-major) restricted to ``samples``."""
  if samples is None:
    return rows
  out = {}
  for name, k in rows.items():
    k = k.reshape((-1, num_samples) + k.shape[1:])
    out[name] = _take(k, samples, 1).reshape((-1,) + k.shape[2:])
  return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseFactor:
  """Implicit ``K`` of a dense-structured layer (dense or 2-D conv).

  Attributes:
    features: layer inputs as ``(B, P, fan_in)`` (patches for convolutions).
    cotangents: factor rows pulled back to the layer output, ``(R, B, P, fan_out)``.
    structure: the layer's static :class:`~riemod.nn.DenseStructure`.
    bias_weight: a scalar on the bias rows (``None``: 1); a mass policy's change of variables
      may scale the bias differently from the kernel.
  """

  features: jax.Array
  cotangents: jax.Array
  structure: DenseStructure = dataclasses.field(metadata=dict(static=True))
  bias_weight: jax.Array | None = None

  @property
  def num_rows(self) -> int:
    return self.cotangents.shape[0] * self.cotangents.shape[1]

  @property
  def num_samples(self) -> int:
    return self.cotangents.shape[1]

  @property
  def leaf_names(self) -> tuple[str, ...]:
    return ("bias", "kernel") if self.structure.has_bias else ("kernel",)

  @property
  def num_params(self) -> int:
    return math.prod(self.structure.kernel_shape) + (
        self.structure.fan_out if self.structure.has_bias else 0)

  def _bias_rows(self) -> jax.Array:
    rows = self.cotangents.sum(axis=2)  # (R, B, out)
    return rows if self.bias_weight is None else rows * self.bias_weight

  def gram(self, inv_mass: Leaves, samples: tuple | None = None) -> jax.Array:
    """``K D^{-1} K^T`` as ``(d, d)``; Gram-Hadamard when the masses are scalars per leaf.

    ``samples=(start, size)``: only the rows of those samples (for every factor row ``r``)
    against all rows, ``(R * size, d)`` r-major, at ``size / B`` of the cost: one device's slab
    of the kernel (``start`` may be traced).
    """
    if not all(_scalar(inv_mass[name]) for name in self.leaf_names):
      rows = self.rows()
      return _gram_of_rows(rows, inv_mass, _row_slab(rows, self.num_samples, samples))
    x, c = self.features, self.cotangents
    r, b, p, _ = c.shape
    x_left, c_left = _take(x, samples, 0), _take(c, samples, 1)
    s = c_left.shape[1]
    if p == 1:
      # Two plain matmuls; rows are (r, b) r-major, so the sample weight tiles R x R times.
      flat_c = c.reshape(r * b, -1)
      weight = (x_left[:, 0] @ x[:, 0].T) * inv_mass["kernel"]
      if self.structure.has_bias:
        weight = weight + inv_mass["bias"] * (1.0 if self.bias_weight is None
                                              else self.bias_weight ** 2)
      return (c_left.reshape(r * s, -1) @ flat_c.T) * jnp.tile(weight, (r, r))
    else:
      fan_in, fan_out = self.structure.fan_in, self.structure.fan_out
      # For d' of the d rows (d' = d for the whole kernel): position-summed Hadamard costs
      # d' d P^2 (in + out); materialised rows cost d P in out to form (all of them: the right
      # operand) and d' d in out to multiply.
      if r * s * p * p * (fan_in + fan_out) <= (p + r * s) * fan_in * fan_out:
        kernel = inv_mass["kernel"] * jnp.einsum("bpi,cqi,rbpf,ucqf->rbuc", x_left, x, c_left,
                                                 c, optimize=True)
      else:
        flat = jnp.einsum("bpi,rbpf->rbif", x, c)
        left = _take(flat, samples, 1).reshape(r * s, -1)
        kernel = (inv_mass["kernel"] * (left @ flat.reshape(r * b, -1).T)).reshape(r, s, r, b)
      if self.structure.has_bias:
        cb = self._bias_rows()
        kernel = kernel + inv_mass["bias"] * jnp.einsum("rbf,qcf->rbqc", _take(cb, samples, 1),
                                                        cb)
    return kernel.reshape(r * s, r * b)

  @property
  def leaf_shapes(self) -> dict[str, tuple[int, ...]]:
    shapes = {"kernel": self.structure.kernel_shape}
    if self.structure.has_bias:
      shapes["bias"] = self.structure.bias_shape
    return shapes

  def matvec(self, v: Leaves) -> jax.Array:
    """``K v`` for a parameter dict ``v``: ``(..., d)``."""
    w = self.structure.kernel_to_flat(v["kernel"])
    # (x W) first, then the cotangents: never the (d, in, out) rows of K.
    hidden = jnp.einsum("bpi,...if->...bpf", self.features, w)
    out = jnp.einsum("...bpf,rbpf->...rb", hidden, self.cotangents)
    if self.structure.has_bias:
      out = out + jnp.einsum("...f,rbf->...rb", self.structure.bias_to_flat(v["bias"]),
                             self._bias_rows())
    return out.reshape(out.shape[:-2] + (-1,))

  def rmatvec(self, t: jax.Array) -> dict[str, jax.Array]:
    """``K^T t`` for ``t`` of shape ``(..., d)``, as a parameter dict."""
    r, b = self.cotangents.shape[:2]
    t = t.reshape(t.shape[:-1] + (r, b))
    weighted = jnp.einsum("...rb,rbpf->...bpf", t, self.cotangents)
    w = jnp.einsum("bpi,...bpf->...if", self.features, weighted)
    out = {"kernel": self.structure.flat_to_kernel(w)}
    if self.structure.has_bias:
      out["bias"] = self.structure.flat_to_bias(jnp.einsum("...rb,rbf->...f", t, self._bias_rows()))
    return out

  def for_products(self) -> "DenseFactor | RowsFactor":
    """The form a block keeps for its repeated products: the rows formed once where that is
    cheaper and small.

    A product with the implicit form runs the layer's contraction over every position,
    ``B P in out`` per vector; formed rows cost ``R B P in out`` once and ``R B in out`` per
    vector. A step applies ``K`` or ``K^T`` at least four times (range split, remainder,
    momentum, the batched back-product), so the rows win once ``P > 2 R``; they are kept only
    while they hold at most ``_MATERIALISE_RATIO`` times the implicit form's own elements
    (``in out <= 4 P (in / R + out)`` for ``R`` rows; that also keeps their ``d^2 in out`` Gram
    within a few times the position-summed one). Dense layers (``P = 1``) stay implicit.

    Example:
      >>> import jax.numpy as jnp
      >>> from riemod.nn.structure import DenseStructure
      >>> s = DenseStructure(kernel_shape=(3, 2), has_bias=True)
      >>> f = DenseFactor(jnp.ones((4, 16, 3)), jnp.ones((1, 4, 16, 2)), s)   # 16 positions
      >>> type(f.for_products()).__name__
      'RowsFactor'
    """
    r, b, p, fan_out = self.cotangents.shape
    fan_in = self.structure.fan_in
    implicit = b * p * fan_in + r * b * p * fan_out
    if p <= 2 * r or r * b * fan_in * fan_out > _MATERIALISE_RATIO * implicit:
      return self
    return RowsFactor({name: rows.reshape((r, b) + rows.shape[1:])
                       for name, rows in self.rows().items()})

  def map_samples(self, fn) -> "DenseFactor":
    """The factor with ``fn(array, sample axis)`` applied to every per-sample array (features
    and cotangents; the bias weight is the same for every sample). Gathering and slicing the
    samples of any factor go through this, so they cannot miss an array.

    Example:
      >>> import jax.numpy as jnp
      >>> from riemod.nn.structure import DenseStructure
      >>> f = DenseFactor(jnp.ones((4, 1, 3)), jnp.ones((2, 4, 1, 5)),
      ...                 DenseStructure(kernel_shape=(3, 5), has_bias=False))
      >>> f.map_samples(lambda a, axis: a[(slice(None),) * axis + (slice(0, 1),)]).num_rows
      2
    """
    return dataclasses.replace(self, features=fn(self.features, 0),
                               cotangents=fn(self.cotangents, 1))

  def rows(self) -> dict[str, jax.Array]:
    """``K`` materialised, ``{name: (d, *leaf shape)}`` (for tests and small blocks)."""
    r, b = self.cotangents.shape[:2]
    w = jnp.einsum("bpi,rbpf->rbif", self.features, self.cotangents)
    out = {"kernel": self.structure.flat_to_kernel(w).reshape(
        (r * b,) + self.structure.kernel_shape)}
    if self.structure.has_bias:
      out["bias"] = self._bias_rows().reshape((r * b,) + self.structure.bias_shape)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowsFactor:
  """Materialised ``K`` of a module on the generic path: ``{name: (R, B, *leaf shape)}``."""

  leaf_rows: dict[str, jax.Array]

  @property
  def num_rows(self) -> int:
    first = next(iter(self.leaf_rows.values()))
    return first.shape[0] * first.shape[1]

  @property
  def num_samples(self) -> int:
    return next(iter(self.leaf_rows.values())).shape[1]

  @property
  def leaf_names(self) -> tuple[str, ...]:
    return tuple(sorted(self.leaf_rows))

  @property
  def num_params(self) -> int:
    return sum(math.prod(v.shape[2:]) for v in self.leaf_rows.values())

  def rows(self) -> dict[str, jax.Array]:
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in self.leaf_rows.items()}

  def for_products(self) -> "RowsFactor":
    """Already formed (see :meth:`DenseFactor.for_products`)."""
    return self

  def map_samples(self, fn) -> "RowsFactor":
    """``fn(rows, 1)`` on every leaf's ``(R, B, ...)`` rows (see :meth:`DenseFactor.map_samples`)."""
    return RowsFactor({name: fn(rows, 1) for name, rows in self.leaf_rows.items()})

  def gram(self, inv_mass: Leaves, samples: tuple | None = None) -> jax.Array:
    """``K D^{-1} K^T``; with ``samples``, those samples' rows only (see :meth:`DenseFactor.gram`)."""
    rows = self.rows()
    return _gram_of_rows(rows, inv_mass, _row_slab(rows, self.num_samples, samples))

  @property
  def leaf_shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: v.shape[2:] for k, v in self.leaf_rows.items()}

  def matvec(self, v: Leaves) -> jax.Array:
    d = self.num_rows
    total = 0.0
    for name, rows in self.leaf_rows.items():
      leaf_ndim = rows.ndim - 2
      x = v[name].reshape(v[name].shape[:v[name].ndim - leaf_ndim] + (-1,))
      total = total + jnp.einsum("dn,...n->...d", rows.reshape(d, -1), x)
    return total

  def rmatvec(self, t: jax.Array) -> dict[str, jax.Array]:
    return {name: jnp.tensordot(t, rows, axes=[[t.ndim - 1], [0]])
            for name, rows in self.rows().items()}


def _gram_of_rows(rows: Leaves, inv_mass: Leaves, left: Leaves | None = None) -> jax.Array:
  """``left D^{-1} rows^T`` (``left``: some of the rows, default all)."""
  total = None
  for name, k in rows.items():
    flat = k.reshape(k.shape[0], -1)
    own = flat if left is None else left[name].reshape(left[name].shape[0], -1)
    scaled = own * jnp.reshape(inv_mass[name], (1, -1)) if not _scalar(inv_mass[name]) else (
        own * inv_mass[name])
    term = scaled @ flat.T
    total = term if total is None else total + term
  return total


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EmbedFactor:
  """Implicit ``K`` of an embedding ``y[p] = E[id_p]``: a dense layer with one-hot features.

  The row of (factor row ``r``, sample ``s``) is ``sum_p onehot(id_sp) ⊗ c_rsp``: nonzero in at
  most ``P`` rows of ``E``. The token ids are kept, never one-hot features, so
  ``(K D^{-1} K^T)[(r,s),(r',s')] = sum_{p,q} [id_sp = id_s'q] (c_rsp · c_r's'q) / m``.

  Attributes:
    cotangents: factor rows pulled back to the embedding output, ``(R, B, P, features)``
      (the first leaf: the factor's floating dtype is read off it).
    ids: token ids ``(B, P)``.
    structure: the layer's static :class:`~riemod.nn.structure.EmbedStructure`.
  """

  cotangents: jax.Array
  ids: jax.Array
  structure: EmbedStructure = dataclasses.field(metadata=dict(static=True))

  @property
  def num_rows(self) -> int:
    return self.cotangents.shape[0] * self.cotangents.shape[1]

  @property
  def num_samples(self) -> int:
    return self.cotangents.shape[1]

  @property
  def leaf_names(self) -> tuple[str, ...]:
    return ("embedding",)

  @property
  def num_params(self) -> int:
    return self.structure.num_embeddings * self.structure.features

  @property
  def leaf_shapes(self) -> dict[str, tuple[int, ...]]:
    return {"embedding": (self.structure.num_embeddings, self.structure.features)}

  def for_products(self) -> "EmbedFactor":
    """Kept implicit: a row of the table would be vocabulary-sized."""
    return self

  def map_samples(self, fn) -> "EmbedFactor":
    """``fn`` on the cotangents (sample axis 1) and the ids (axis 0); see
    :meth:`DenseFactor.map_samples`."""
    return dataclasses.replace(self, cotangents=fn(self.cotangents, 1), ids=fn(self.ids, 0))

  def scaled(self, scale: jax.Array) -> "EmbedFactor":
    """The factor of ``K S`` for a per-entry scale ``S`` of the table, ``(V, features)``."""
    return EmbedFactor(self.cotangents * scale[self.ids], self.ids, self.structure)

  def gram(self, inv_mass: Leaves, samples: tuple | None = None) -> jax.Array:
    """``K D^{-1} K^T`` as ``(d, d)``; with ``samples``, those samples' rows only (see
    :meth:`DenseFactor.gram`)."""
    inv = inv_mass["embedding"]
    c = self.cotangents
    r, b, p, f = c.shape
    left = c * inv if _scalar(inv) else c * inv[self.ids]
    slots = min(self.structure.num_embeddings, b * p)
    if slots <= p * p:
      # Rows over the ids present in the batch (at most B P of them, never the vocabulary when
      # it is larger): d^2 slots f instead of the pairwise d^2 P^2 f.
      if slots == self.structure.num_embeddings:
        index = self.ids
      else:
        present = jnp.unique(self.ids, size=slots, fill_value=self.structure.num_embeddings)
        index = jnp.searchsorted(present, self.ids)
      sample = jnp.arange(b)[:, None]
      compact = lambda v: jnp.zeros((r, b, slots, f), v.dtype).at[:, sample, index].add(v)
      kernel = jnp.einsum("rbuf,scuf->rbsc", _take(compact(left), samples, 1), compact(c))
    else:
      same = (_take(self.ids, samples, 0)[:, :, None, None] == self.ids[None, None]).astype(
          c.dtype)
      kernel = jnp.einsum("rbpf,ucqf,bpcq->rbuc", _take(left, samples, 1), c, same,
                          optimize=True)
    return kernel.reshape(-1, r * b)

  def matvec(self, v: Leaves) -> jax.Array:
    """``K v`` for a parameter dict ``v``: ``(..., d)``."""
    picked = jnp.take(v["embedding"], self.ids, axis=-2)  # (..., B, P, features)
    out = jnp.einsum("...bpf,rbpf->...rb", picked, self.cotangents)
    return out.reshape(out.shape[:-2] + (-1,))

  def rmatvec(self, t: jax.Array) -> dict[str, jax.Array]:
    """``K^T t`` for ``t`` of shape ``(..., d)``: a scatter-add into the table's shape."""
    r, b = self.cotangents.shape[:2]
    t = t.reshape(t.shape[:-1] + (r, b))
    weighted = jnp.einsum("...rb,rbpf->...bpf", t, self.cotangents)
    table = jnp.zeros(t.shape[:-2] + self.leaf_shapes["embedding"], weighted.dtype)
    return {"embedding": table.at[..., self.ids, :].add(weighted)}

  def rows(self) -> dict[str, jax.Array]:
    """``K`` materialised, ``{"embedding": (d, V, features)}`` (for tests and small blocks)."""
    return self.rmatvec(jnp.eye(self.num_rows, dtype=self.cotangents.dtype))


Factor = DenseFactor | RowsFactor | EmbedFactor


def factor_from_structure(structure, inputs: Sequence[jax.Array], cotangents: Sequence[jax.Array]):
  """The factor of a recognised layer from its recorded inputs and the output cotangents of every
  call (one home for the layer kinds of :mod:`riemod.nn.structure`: dense/conv, embedding,
  elementwise scale and bias)."""
  if isinstance(structure, DenseStructure):
    return _dense_factor(structure, inputs, cotangents)
  if isinstance(structure, EmbedStructure):
    return _embed_factor(structure, inputs, cotangents)
  if isinstance(structure, ElementwiseStructure):
    return _elementwise_factor(structure, inputs, cotangents)
  raise TypeError(f"No factor for the layer structure {type(structure).__name__}.")


def _dense_factor(structure, inputs, cotangents):
  features = jnp.concatenate([structure.features(v) for v in inputs], axis=1)
  rows = jnp.concatenate([structure.positions(c, batch_axes=1) for c in cotangents], axis=2)
  return DenseFactor(features, rows, structure)


def _embed_factor(structure, inputs, cotangents):
  for ids in inputs:
    if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
      raise TypeError(f"An embedding was called with {jnp.asarray(ids).dtype} inputs; it "
                      "takes integer token ids.")
  ids = jnp.concatenate([v.reshape(v.shape[0], -1) for v in inputs], axis=1)
  rows = jnp.concatenate([c.reshape(c.shape[:2] + (-1, structure.features)) for c in cotangents],
                         axis=2)
  return EmbedFactor(rows, ids, structure)


def _elementwise_factor(structure, inputs, cotangents):
  f = structure.num_features
  xhat = jnp.concatenate([v.reshape(v.shape[0], -1, f) for v in inputs], axis=1)
  rows = jnp.concatenate([c.reshape(c.shape[:2] + (-1, f)) for c in cotangents], axis=2)
  leaf_rows = {}
  if structure.has_scale:
    leaf_rows["scale"] = jnp.einsum("bpf,rbpf->rbf", xhat.astype(rows.dtype), rows)
  if structure.has_bias:
    leaf_rows["bias"] = rows.sum(axis=2)
  return RowsFactor(leaf_rows)

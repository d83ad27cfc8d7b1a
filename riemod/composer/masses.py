"""Mass policies: how the mass ``D`` of ``G = K^T K + D`` is chosen, step by step.

A policy turns the optimizer's running statistics into the mass of the modules that declare none
(declared masses are kept). Every policy is expressed as a change of variables ``S`` (per
module, ``None`` for the identity) under which that mass becomes the geometry's scalar default:

    (K^T K + D)^{-1} = S (S^T K^T K S + mass I)^{-1} S^T,    D = mass S^{-T} S^{-1},

so the composer solves one kind of problem, with one place that applies the mass and its scale.
For the diagonal policies ``S`` is a per-parameter scale (``S^T = S``, ``D = mass S^{-2}``).

* :func:`constant`: ``D = mass`` (``S = I``).
* :func:`adaptive`: ``D = mass (sqrt(v) + eps)`` with ``v`` the bias-corrected moving average of
  squared gradients (Adam's second moment; Kingma & Ba, arXiv 1412.6980). Outside the range of
  the factor rows the step is then Adam's scaling instead of the same ``1 / mass`` for every
  parameter. For dense-structured modules ``v`` of the kernel is replaced by its rank-one
  (Adafactor; Shazeer & Stern, arXiv 1804.04235) approximation ``v_ab ~ R_a C_b / mean(R)``, so
  ``S`` is a Kronecker product and ``K S`` is again a dense factor (features times ``a^{-1/2}``,
  cotangents times ``b^{-1/2}``): the Gram-Hadamard kernel and its cost are kept. Other modules
  take the full diagonal (their rows are materialised anyway).
* :func:`kronecker`: per dense or convolution module ``D_a = mass (A (x) S)``, the moving averages
  of K-FAC's two factors (the bias-augmented input second moments ``A``, the second moments ``S``
  of the output-metric rows pulled back to the layer output), read off the rows the step already
  computes and refactored every ``update_every`` steps. ``S`` is then the pair of inverse Cholesky
  factors ``(L_A^{-1}, L_S^{-1})``, ordered bias first so the whitened features keep a constant
  bias entry: ``K S`` is again a dense factor (features ``L_A^{-1} [1; x]``, cotangents
  ``L_S^{-1} c``) and the Gram-Hadamard kernel is kept. The step is K-FAC's memory plus this
  batch's exact curvature; with no batch rows it is the damped K-FAC step
  ``A^{-1} G S^{-1} / mass``. ``A (x) S`` carries the curvature's own units, so ``mass`` is
  a relative weight here and its default is 1 (:attr:`KroneckerMass.default_mass`). Modules
  without dense structure keep a constant mass in the constant policy's unit,
  ``D = mass * 1e-2`` (the constant policy's default 1e-2 at the default mass 1).

References:
  Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 3 (a
  diagonal mass ``D_a``).
  Martens & Grosse, *Optimizing Neural Networks with Kronecker-factored Approximate Curvature*
  (arXiv 1503.05671), for the factors, their moving averages and the factored damping.
  Grosse & Martens, *A Kronecker-factored approximate Fisher matrix for convolution layers*
  (arXiv 1602.01407), for the factors of a convolution (sums over positions).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from riemod.curvature import _mesh
from riemod.curvature.factors import DenseFactor, EmbedFactor, RowsFactor
from riemod.curvature.types import Curvature
from riemod.nn.adapter import parameter_groups
from riemod.nn.structure import DenseStructure


# -- changes of variables (what ComposedMetric applies at its boundary, per module)

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalChange:
  """``S`` as a per-parameter scale ``{leaf name: array or None}`` (``S^T = S``)."""

  leaf_scales: dict[str, Any]

  def apply(self, leaves: dict[str, jax.Array], *, inverse: bool = False,
            transpose: bool = False) -> dict[str, jax.Array]:
    """``S v`` (``inverse``: ``S^{-1} v``); ``transpose`` changes nothing for a diagonal."""
    del transpose
    out = {}
    for name, x in leaves.items():
      s = self.leaf_scales.get(name)
      out[name] = x if s is None else (x / s.astype(x.dtype) if inverse else x * s.astype(x.dtype))
    return out

  def smallest_mass(self, inverse_masses: dict[str, jax.Array]) -> jax.Array:
    """``lam_min`` of the module's mass ``S^{-T} diag(1 / inverse_masses) S^{-1}`` (exact: it
    is diagonal)."""
    scaled = [1.0 / (jnp.asarray(inverse) * (1.0 if self.leaf_scales.get(name) is None
                                             else jnp.asarray(self.leaf_scales[name]) ** 2))
              for name, inverse in inverse_masses.items()]
    return jnp.min(jnp.stack([jnp.min(v) for v in scaled]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KroneckerChange:
  """``S`` of a dense module under a Kronecker mass: ``Theta = L_A^{-T} Phi L_S^{-1}``.

  ``Theta`` is the module's parameters as one ``(1 + fan_in, fan_out)`` matrix, bias row first
  (``(fan_in, fan_out)`` without a bias), and ``A = L_A L_A^T``, ``S = L_S L_S^T`` are the damped
  factors, so ``S S^T = A^{-1} (x) S^{-1}`` and ``D = mass S^{-T} S^{-1} = mass (A (x) S)``.

  Attributes:
    inputs_root, inputs_inverse: ``L_A`` and ``L_A^{-1}`` (lower triangular).
    outputs_root, outputs_inverse: ``L_S`` and ``L_S^{-1}``.
    structure: the layer's static :class:`~riemod.nn.DenseStructure`.
  """

  inputs_root: jax.Array
  inputs_inverse: jax.Array
  outputs_root: jax.Array
  outputs_inverse: jax.Array
  structure: DenseStructure = dataclasses.field(metadata=dict(static=True))

  def apply(self, leaves: dict[str, jax.Array], *, inverse: bool = False,
            transpose: bool = False) -> dict[str, jax.Array]:
    """``S v``, ``S^T v``, ``S^{-1} v`` or ``S^{-T} v`` (leaves may carry one leading axis)."""
    # S: L_A^{-T} . L_S^{-1};  S^T: L_A^{-1} . L_S^{-T};  S^{-1}: L_A^T . L_S;  S^{-T}: L_A . L_S^T.
    if inverse:
      left, right = self.inputs_root, self.outputs_root
    else:
      left, right = self.inputs_inverse, self.outputs_inverse
    if not transpose:
      left = left.T
    else:
      right = right.T
    structure = self.structure
    flat = structure.kernel_to_flat(leaves["kernel"])
    theta = (jnp.concatenate([structure.bias_to_flat(leaves["bias"])[..., None, :], flat],
                             axis=-2) if structure.has_bias else flat)
    dtype = theta.dtype
    theta = jnp.einsum("ij,...jk,kl->...il", left.astype(dtype), theta, right.astype(dtype))
    out = {"kernel": structure.flat_to_kernel(theta[..., 1:, :] if structure.has_bias else theta)}
    if structure.has_bias:
      out["bias"] = structure.flat_to_bias(theta[..., 0, :])
    return out

  def smallest_mass(self, inverse_masses: dict[str, jax.Array]) -> jax.Array:
    """A lower bound on ``lam_min`` of the module's mass ``S^{-T} diag(1 / inverse_masses)
    S^{-1}``: ``min(1 / inverse_masses) sigma_min(L_A)^2 sigma_min(L_S)^2`` (the singular
    values of ``S^{-1} = L_A^T (x) L_S`` are products of the factors'), exact when the module
    has one mass, as under the Kronecker policy."""
    sigma = lambda root: jnp.linalg.svd(root, compute_uv=False)[-1]
    return (UNSCALED.smallest_mass(inverse_masses)
            * (sigma(self.inputs_root) * sigma(self.outputs_root)) ** 2)


# No change of variables (``S = I``): what a module without one has.
UNSCALED = DiagonalChange({})


def _identity_changes(curvature: Curvature) -> list[Any]:
  return [None] * len(curvature.modules)


@dataclasses.dataclass(frozen=True)
class ConstantMass:
  """``D = mass`` for every module that declares none (the geometry's default policy)."""

  # The geometry's mass when none is given: D = 1e-2 I, in the units of K^T K.
  default_mass: ClassVar[float] = 1e-2

  def init(self, params: Any) -> None:
    del params
    return None

  def update(self, moments: None, grads: Any, curvature: Curvature | None = None,
             count: jax.Array | None = None) -> None:
    del moments, grads, curvature, count
    return None

  def rescale(self, curvature: Curvature, moments: None, count: jax.Array
              ) -> tuple[Curvature, list[Any]]:
    del moments, count
    return curvature, _identity_changes(curvature)


@dataclasses.dataclass(frozen=True)
class AdaptiveMass:
  """``D = mass (sqrt(v) + eps)`` from the gradients' bias-corrected second moment ``v``.

  Attributes:
    decay: the moving average's decay (Adam's ``b2``), in ``[0, 1)``.
    eps: added to ``sqrt(v)`` (keeps ``D`` positive where gradients vanish), > 0.
  """

  # D = 1e-2 (sqrt(v) + eps): outside the rows' range Adam's scaling at rate lr / 1e-2.
  default_mass: ClassVar[float] = 1e-2
  decay: float = 0.99
  eps: float = 1e-8

  def __post_init__(self):
    if isinstance(self.decay, (int, float)) and not 0 <= self.decay < 1:
      raise ValueError(f"decay={self.decay!r}: the second-moment decay must lie in [0, 1), "
                       "e.g. 0.99.")
    if isinstance(self.eps, (int, float)) and not self.eps > 0:
      raise ValueError(f"eps={self.eps!r}: must be > 0, e.g. 1e-8.")

  def init(self, params: Any) -> list[jax.Array]:
    return [jnp.zeros_like(p) for p in jax.tree.leaves(params)]

  def update(self, moments: list[jax.Array], grads: Any, curvature: Curvature | None = None,
             count: jax.Array | None = None) -> list[jax.Array]:
    del curvature, count
    return [self.decay * v + (1 - self.decay) * (g * g).astype(v.dtype)
            for v, g in zip(moments, jax.tree.leaves(grads))]

  def rescale(self, curvature: Curvature, moments: list[jax.Array], count: jax.Array
              ) -> tuple[Curvature, list[Any]]:
    """The curvature of ``K S`` and each module's ``S`` (``count``: gradients averaged so far)."""
    correction = 1 - self.decay ** jnp.maximum(count, 1).astype(moments[0].dtype) if moments else 1
    second_moment = [v / correction for v in moments]
    changes: list[Any] = []
    modules = []
    for module in curvature.modules:
      if module.mass is not None or module.kind == "frozen":
        modules.append(module)
        changes.append(None)
        continue
      v = {name: second_moment[i] for name, i in zip(module.leaf_names, module.leaf_indices)}
      if isinstance(module.factor, DenseFactor):
        leaf_scales, in_scale, out_scale, bias_weight = _dense_scaling(module.factor.structure,
                                                                       v, self.eps)
        scale = lambda f: DenseFactor(f.features * in_scale, f.cotangents * out_scale,
                                      f.structure, bias_weight)
      else:
        leaf_scales = {name: jax.lax.rsqrt(jnp.sqrt(value) + self.eps) for name, value in v.items()}
        scale = lambda f: _diagonally_scaled(f, leaf_scales)
      changes.append(DiagonalChange(leaf_scales))
      modules.append(module.map_factor(scale))
    return dataclasses.replace(curvature, modules=tuple(modules)), changes


def _diagonally_scaled(factor: Any, leaf_scales: dict[str, jax.Array]) -> Any:
  """The factor of ``K S`` for a diagonal ``S`` given leaf by leaf (no dense structure)."""
  if isinstance(factor, RowsFactor):
    return RowsFactor({name: rows * leaf_scales[name] for name, rows in factor.leaf_rows.items()})
  if isinstance(factor, EmbedFactor):
    return factor.scaled(leaf_scales["embedding"])
  return factor


def _dense_scaling(structure, v: dict[str, jax.Array], eps: float):
  """``S`` of a dense module with the rank-one second moment of its kernel: the leaves' scales,
  and the input, output and bias scales that give ``K S`` from ``K``."""
  flat_v = structure.kernel_to_flat(v["kernel"])  # (fan_in, fan_out)
  rows, cols = flat_v.mean(axis=1), flat_v.mean(axis=0)
  tiny = eps * eps
  a = jnp.sqrt((rows + tiny) / (rows.mean() + tiny))
  b = jnp.sqrt(cols) + eps
  in_scale, out_scale = jax.lax.rsqrt(a), jax.lax.rsqrt(b)
  scales = {"kernel": structure.flat_to_kernel(in_scale[:, None] * out_scale[None, :])}
  bias_weight = None
  if structure.has_bias:
    # D_b = mass * s * b: the kernel's column profile, scaled to the bias's own mean magnitude.
    # The cotangents already carry b^{-1/2}; the bias rows get the remaining s^{-1/2}.
    s = jnp.mean(jnp.sqrt(v["bias"]) + eps) / jnp.mean(b)
    scales["bias"] = structure.flat_to_bias(jax.lax.rsqrt(s * b))
    bias_weight = jax.lax.rsqrt(s)
  return scales, in_scale, out_scale, bias_weight


class KroneckerMoments(NamedTuple):
  """One dense module's Kronecker mass state (in ``GeometryState.moments``).

  Attributes:
    inputs: moving average of the bias-augmented input second moments ``[1; x][1; x]^T`` (bias
      entry first), not yet bias-corrected: ``(1 + fan_in, 1 + fan_in)`` (``fan_in`` without bias).
    outputs: moving average of the pulled-back cotangents' second moments ``(fan_out, fan_out)``.
    inputs_root, inputs_inverse: ``L_A`` and ``L_A^{-1}`` of the damped, bias-corrected ``A``
      from the last refactoring (what the mass uses until the next one).
    outputs_root, outputs_inverse: ``L_S`` and ``L_S^{-1}`` likewise.
  """

  inputs: jax.Array
  outputs: jax.Array
  inputs_root: jax.Array
  inputs_inverse: jax.Array
  outputs_root: jax.Array
  outputs_inverse: jax.Array


@dataclasses.dataclass(frozen=True)
class KroneckerMass:
  """``D_a = mass (A (x) S)`` per dense/conv module from K-FAC's moving-average factors.

  Attributes:
    decay: the factors' moving-average decay, in ``[0, 1)`` (0: this batch's factors only).
    damping: ``delta > 0`` of the factored Tikhonov damping ``A + pi sqrt(delta) I``,
      ``S + sqrt(delta) / pi I`` with ``pi^2 = (tr A / dim A) / (tr S / dim S)``, so that
      ``A (x) S`` is damped by about ``delta I``.
    update_every: refactor (Cholesky and triangular inverse) every this many steps, >= 1; in
      between the mass keeps the last factors while the moving averages keep updating.
  """

  # A (x) S approximates K^T K itself, so the mass is a relative weight: 1 weighs the
  # remembered curvature as much as this batch's exact rows. The certified step at this default
  # trains the digits autoencoder where the constant 1e-2 is refused by the precision check
  # (benchmarks/results/tuning_free.md).
  default_mass: ClassVar[float] = 1.0
  decay: float = 0.95
  damping: float = 1e-3
  update_every: int = 1

  def __post_init__(self):
    if isinstance(self.decay, (int, float)) and not 0 <= self.decay < 1:
      raise ValueError(f"decay={self.decay!r}: the factors' moving-average decay must lie in "
                       "[0, 1), e.g. 0.95.")
    if isinstance(self.damping, (int, float)) and not (math.isfinite(self.damping)
                                                       and self.damping > 0):
      raise ValueError(f"damping={self.damping!r}: must be finite and > 0 (it keeps A and S "
                       "invertible), e.g. 1e-3.")
    if not isinstance(self.update_every, int) or self.update_every < 1:
      raise ValueError(f"update_every={self.update_every!r}: refactor every this many steps, an "
                       "int >= 1 (e.g. 1, or 10 to amortise the Cholesky factorisations).")

  def init(self, params: Any) -> dict[str, KroneckerMoments]:
    """Zero moving averages and identity factors for every module with a ``kernel`` (keyed by the
    kernel's position in ``jax.tree.leaves(params)``)."""
    if isinstance(params, nnx.State):
      params = nnx.as_pure(params)
    leaves = jax.tree.leaves(params)
    moments = {}
    for group in parameter_groups(params):
      names = dict(zip(group.leaf_names, group.leaf_indices))
      if "kernel" not in names or not set(names) <= {"kernel", "bias"}:
        continue
      kernel = leaves[names["kernel"]]
      if kernel.ndim < 2:
        continue
      # A general dense layer (attention's query/key/value: kernel (in, heads, head_dim)) has
      # several output axes; its bias has exactly their shape. Without a bias the last axis is
      # taken as the output (dense and conv layers); a layer where that is wrong is named in a
      # warning when the curvature shows its structure (see `_eligible`).
      out_ndim = 1
      if "bias" in names:
        bias_shape = leaves[names["bias"]].shape
        if 1 <= len(bias_shape) < kernel.ndim and kernel.shape[-len(bias_shape):] == bias_shape:
          out_ndim = len(bias_shape)
      fan_in = math.prod(kernel.shape[:-out_ndim]) + ("bias" in names)
      fan_out = math.prod(kernel.shape[-out_ndim:])
      eye_in, eye_out = jnp.eye(fan_in, dtype=kernel.dtype), jnp.eye(fan_out, dtype=kernel.dtype)
      moments[str(names["kernel"])] = KroneckerMoments(
          jnp.zeros_like(eye_in), jnp.zeros_like(eye_out), eye_in, eye_in, eye_out, eye_out)
    return moments

  def _eligible(self, module, moments) -> KroneckerMoments | None:
    """The module's state if it takes the Kronecker mass (dense factor, no declared mass)."""
    if module.mass is not None or module.kind != "riemannian":
      return None
    if not isinstance(module.factor, DenseFactor) or "kernel" not in module.leaf_names:
      return None
    state = moments.get(str(module.leaf_indices[module.leaf_names.index("kernel")]))
    structure = module.factor.structure
    if state is None:
      return None
    if state.inputs.shape[0] != structure.fan_in + structure.has_bias or (
        state.outputs.shape[0] != structure.fan_out):
      warnings.warn(
          f"riemod.masses.kronecker: module {module.name} (kernel {structure.kernel_shape}, "
          f"{structure.fan_in} inputs x {structure.fan_out} outputs) keeps the constant mass: "
          "its Kronecker state was sized from the parameters alone, which do not show a general "
          "dense layer's output axes without a bias. Give the layer a bias, or declare its mass.",
          stacklevel=2)
      return None
    return state

  def update(self, moments: dict[str, KroneckerMoments], grads: Any,
             curvature: Curvature | None = None, count: jax.Array | None = None
             ) -> dict[str, KroneckerMoments]:
    """Folds this step's factors into the moving averages; refactors every ``update_every``
    steps (``count``: steps folded in, this one included).

    Inside the ``jax.shard_map`` whose axes the curvature's rows were gathered over
    (``curvature.axis_name``), every device forms the statistics of its own samples (the
    modules' shards) and one all-reduce of the ``(1 + fan_in)^2`` and ``fan_out^2`` matrices joins them, and each
    module's refresh runs on one device (:func:`riemod.curvature._mesh.spread`, balanced by the
    factors' cubed sizes) and is shared by one all-reduce. Elsewhere every device computes all.
    """
    del grads
    if curvature is None or count is None:
      raise ValueError("riemod.masses.kronecker reads its factors off the curvature: call "
                       "geometry.advance(state, grads, curvature) with the step's curvature.")
    axes = curvature.axis_name
    if not (_mesh.bound(axes) and _mesh.size(axes) > 1):
      axes = ()  # one device, or a curvature used outside the shard_map it was measured in
    eligible = [(module, state) for module in curvature.modules
                if (state := self._eligible(module, moments)) is not None]
    if not eligible:
      return dict(moments)
    if axes and all(module.shard is not None for module, _ in eligible):
      # Each device sums its own samples (its shard); one all-reduce for all modules, of the
      # symmetric sums' lower triangles only (n (n + 1) / 2 of their n^2 entries).
      devices = _mesh.size(axes)
      triangle = lambda m: m[jnp.tril_indices(m.shape[0])]
      partial = jax.lax.psum([(triangle(second), mean, triangle(outputs)) for second, mean, outputs
                              in (_batch_sums(module.shard, devices) for module, _ in eligible)],
                             axes)
      partial = [(_symmetric(second, module.shard.features.shape[-1]), mean,
                  _symmetric(outputs, module.shard.cotangents.shape[-1]))
                 for (second, mean, outputs), (module, _) in zip(partial, eligible)]
    else:
      partial = [_batch_sums(module.factor) for module, _ in eligible]
    averages = []
    for (module, state), sums in zip(eligible, partial):
      inputs, outputs = _batch_factors(module.factor, sums)
      inputs = self.decay * state.inputs + (1 - self.decay) * inputs.astype(state.inputs.dtype)
      outputs = self.decay * state.outputs + (1 - self.decay) * outputs.astype(state.outputs.dtype)
      averages.append((inputs, outputs))
    # Bias correction in each module's own dtype (modules may differ in precision).
    correction = lambda a: 1 - self.decay ** count.astype(a.dtype)
    refresh = (count - 1) % self.update_every == 0
    thunks = [lambda a=a, s=s, state=state: self._factorize(a / correction(a), s / correction(s),
                                                            state)
              for (a, s), (_, state) in zip(averages, eligible)]

    def fresh():
      if not axes:
        return [thunk() for thunk in thunks]
      # Cholesky and triangular inverse of both factors: ~(n_in^3 + n_out^3) / 3 each.
      costs = [float(a.shape[0] ** 3 + s.shape[0] ** 3) for a, s in averages]
      # Roots and inverses are lower triangular: only their n (n + 1) / 2 entries are shared.
      lower = lambda n: jnp.tril_indices(n)
      pack = lambda thunk: lambda: [m[lower(m.shape[0])] for m in thunk()]
      shared = _mesh.spread(axes, costs, [pack(thunk) for thunk in thunks])
      return [tuple(jnp.zeros_like(m).at[lower(m.shape[0])].set(v) for m, v in zip(old, new))
              for old, new in zip(kept(), shared)]

    def kept():
      return [(state.inputs_root, state.inputs_inverse, state.outputs_root,
               state.outputs_inverse) for _, state in eligible]

    # `refresh` is the same on every device (the count is replicated): all take one branch.
    roots = jax.lax.cond(refresh, fresh, kept)
    out = dict(moments)
    for (module, _), (inputs, outputs), root in zip(eligible, averages, roots):
      out[str(module.leaf_indices[module.leaf_names.index("kernel")])] = KroneckerMoments(
          inputs, outputs, *root)
    return out

  def _factorize(self, inputs: jax.Array, outputs: jax.Array, old: KroneckerMoments):
    """Damped Cholesky factors and their inverses; the old ones where a factorisation fails."""
    dtype = inputs.dtype
    tiny = jnp.sqrt(jnp.finfo(dtype).tiny)
    n_in, n_out = inputs.shape[0], outputs.shape[0]
    pi = jnp.sqrt((jnp.trace(inputs) / n_in + tiny) / (jnp.trace(outputs) / n_out + tiny))
    root_damping = jnp.sqrt(jnp.asarray(self.damping, dtype))
    roots = []
    for matrix, shift in ((inputs, pi * root_damping), (outputs, root_damping / pi)):
      n = matrix.shape[0]
      root = jnp.linalg.cholesky(matrix + shift * jnp.eye(n, dtype=dtype))
      inverse = jax.scipy.linalg.solve_triangular(root, jnp.eye(n, dtype=dtype), lower=True)
      roots += [root, inverse]
    ok = jnp.all(jnp.array([jnp.all(jnp.isfinite(r)) for r in roots]))
    previous = (old.inputs_root, old.inputs_inverse, old.outputs_root, old.outputs_inverse)
    return tuple(jnp.where(ok, new, prev) for new, prev in zip(roots, previous))

  def rescale(self, curvature: Curvature, moments: dict[str, KroneckerMoments], count: jax.Array
              ) -> tuple[Curvature, list[Any]]:
    """The curvature of ``K S`` (whitened features and cotangents) and each module's ``S``."""
    del count
    changes: list[Any] = []
    modules = []
    for module in curvature.modules:
      state = self._eligible(module, moments)
      if state is None:
        if module.mass is not None or module.kind != "riemannian":
          modules.append(module)
          changes.append(None)
          continue
        # No Kronecker factors here: the constant policy's unit, D = mass * 1e-2 (so at the
        # default mass 1 such a module gets the constant policy's default mass 1e-2, not 1).
        # As a change of variables: S = sqrt(default / constant default) on every leaf.
        scale = math.sqrt(self.default_mass / ConstantMass.default_mass)
        modules.append(module.map_factor(lambda f, scale=scale: _uniformly_scaled(f, scale)))
        changes.append(DiagonalChange({name: jnp.asarray(scale) for name in module.leaf_names}))
        continue
      modules.append(module.map_factor(lambda f, state=state: _whitened(f, state)))
      changes.append(KroneckerChange(state.inputs_root, state.inputs_inverse, state.outputs_root,
                                     state.outputs_inverse, module.factor.structure))
    return dataclasses.replace(curvature, modules=tuple(modules)), changes


def _whitened(factor: DenseFactor, state: KroneckerMoments) -> DenseFactor:
  """The factor of ``K S`` for the Kronecker change ``S = L_A^{-T} (x) L_S^{-T}``."""
  inverse_in = state.inputs_inverse.astype(factor.features.dtype)
  inverse_out = state.outputs_inverse.astype(factor.cotangents.dtype)
  bias_weight = None
  if factor.structure.has_bias:
    # L_A^{-1} [1; x]: a constant bias entry L_A^{-1}[0, 0] (lower triangular, bias first)
    # and features L_A^{-1}[1:, 1:] x + L_A^{-1}[1:, 0].
    features = factor.features @ inverse_in[1:, 1:].T + inverse_in[1:, 0]
    bias_weight = inverse_in[0, 0]
  else:
    features = factor.features @ inverse_in.T
  return DenseFactor(features, factor.cotangents @ inverse_out.T, factor.structure, bias_weight)


def _uniformly_scaled(factor: Any, scale: float) -> Any:
  """The factor of ``K S`` for ``S = scale I``."""
  if isinstance(factor, DenseFactor):
    return dataclasses.replace(factor, cotangents=factor.cotangents * scale)
  if isinstance(factor, RowsFactor):
    return RowsFactor({name: rows * scale for name, rows in factor.leaf_rows.items()})
  if isinstance(factor, EmbedFactor):
    return dataclasses.replace(factor, cotangents=factor.cotangents * scale)
  raise TypeError(f"riemod.masses.kronecker: no uniform scaling for a {type(factor).__name__}.")


def _batch_sums(factor: DenseFactor, devices: int = 1) -> tuple[jax.Array, ...]:
  """``(sum x x^T, sum x, sum c c^T)`` over the factor's samples, the first two divided by the
  sample-position count of a batch of ``devices`` such factors (a device's shard: summing over
  the devices then gives the whole batch's means; the cotangents carry the ``1/sqrt(B)`` already).
  """
  x, c = factor.features, factor.cotangents
  samples = x.shape[0] * x.shape[1] * devices
  second = jnp.einsum("bpi,bpj->ij", x, x) / samples
  mean = x.sum(axis=(0, 1)) / samples
  outputs = jnp.einsum("rbpf,rbpg->fg", c, c)
  return second, mean, outputs


def _symmetric(lower: jax.Array, n: int) -> jax.Array:
  """The symmetric ``n x n`` matrix with lower triangle ``lower`` (``jnp.tril_indices`` order)."""
  rows, cols = jnp.tril_indices(n)
  matrix = jnp.zeros((n, n), lower.dtype).at[rows, cols].set(lower)
  return matrix.at[cols, rows].set(lower)


def _batch_factors(factor: DenseFactor, sums: tuple[jax.Array, ...] | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """This batch's ``A`` (mean over samples and positions of ``[1; x][1; x]^T``) and ``S`` (sum
  over rows, samples and positions of ``c c^T``; the rows carry the batch mean's ``1/sqrt(B)``),
  so that ``A (x) S`` approximates ``K^T K`` (K-FAC; exact up to the cross-position terms and the
  correlation of inputs and cotangents). ``sums``: :func:`_batch_sums` of the whole batch
  (summed over the devices), computed here when not given."""
  second, mean, outputs = _batch_sums(factor) if sums is None else sums
  if factor.structure.has_bias:
    one = jnp.ones((1, 1), second.dtype)
    second = jnp.block([[one, mean[None, :]], [mean[:, None], second]])
  return second, outputs


MassPolicy = ConstantMass | AdaptiveMass | KroneckerMass


def constant() -> ConstantMass:
  """The constant mass policy: ``D = mass`` (scheduled by the geometry's ``mass``).

  Example:
    >>> import riemod
    >>> riemod.Geometry(mass=1e-2, mass_policy=riemod.masses.constant()).mass
    0.01
  """
  return ConstantMass()


def adaptive(decay: float = 0.99, eps: float = 1e-8) -> AdaptiveMass:
  """The adaptive mass policy: ``D = mass (sqrt(v) + eps)`` (see the module docstring).

  ``mass`` then has the units of an inverse learning rate: outside the factor rows' range the step
  is ``(lr / mass) g / sqrt(v)``.

  Example:
    >>> import riemod
    >>> riemod.Geometry(mass=30.0, mass_policy=riemod.masses.adaptive(decay=0.99)).mass_policy.decay
    0.99
  """
  return AdaptiveMass(decay, eps)


def kronecker(decay: float = 0.95, damping: float = 1e-3, update_every: int = 1) -> KroneckerMass:
  """The Kronecker mass policy: ``D_a = mass (A (x) S)`` per dense/conv module (see the module
  docstring); the moving averages are read off the step's own factor rows.

  ``mass`` is then dimensionless: it weighs K-FAC's running estimate of the Gauss-Newton matrix
  against the exact curvature of the batch (``mass = 1``: as much as one batch). Modules without
  dense structure (the generic path), euclidean modules and modules that declare a mass keep the
  constant (or declared) mass. Attention's query/key/value projections (kernels
  ``(in, heads, head_dim)``) are sized from their bias; a general dense layer with several output
  axes and no bias cannot be sized from its parameters and keeps the constant mass, with a warning
  that names it. The state holds four ``(1 + fan_in)^2`` and ``fan_out^2`` matrices
  per dense module (two moving averages, a Cholesky factor and its inverse of each).

  Args:
    decay: the factors' moving-average decay, in ``[0, 1)``.
    damping: ``delta > 0``: ``A (x) S`` is damped by about ``delta I`` (factored Tikhonov).
    update_every: refactor the damped factors every this many steps (>= 1).

  Example:
    >>> import jax, jax.numpy as jnp, riemod
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> geometry = riemod.Geometry(mass=1.0, mass_policy=riemod.masses.kronecker(damping=1e-2))
    >>> x = jax.random.normal(jax.random.key(1), (8, 3))
    >>> _, g, curv = riemod.value_grad_and_curvature(
    ...     model, x, lambda y: 0.5 * jnp.mean(jnp.sum(y**2, -1)), riemod.metrics.identity())
    >>> state = geometry.advance(geometry.init(nnx.state(model, nnx.Param)), g, curv)
    >>> step = geometry.compose(curv, state).solve(g)   # (K^T K + A (x) S)^{-1} g
    >>> step["kernel"].shape
    (3, 2)
  """
  return KroneckerMass(decay, damping, update_every)


def _validate(policy: Any) -> None:
  if not isinstance(policy, (ConstantMass, AdaptiveMass, KroneckerMass)):
    raise TypeError(f"mass_policy={policy!r}: use riemod.masses.constant(), "
                    "riemod.masses.adaptive(decay, eps) or riemod.masses.kronecker(decay, "
                    "damping, update_every).")


__all__ = ["AdaptiveMass", "ConstantMass", "DiagonalChange", "KroneckerChange", "KroneckerMass",
           "KroneckerMoments", "MassPolicy", "adaptive", "constant", "kronecker"]

"""Mass policies: how the mass ``D`` of ``G = K^T K + D`` is chosen, step by step.

A policy turns the optimizer's running statistics into the mass of the modules that declare none
(declared masses are kept). Every policy is expressed as a change of variables ``S`` (per
parameter, ``None`` for the identity) under which that mass becomes the geometry's scalar default:

    (K^T K + D)^{-1} = S (S K^T K S + mass I)^{-1} S,    D = mass S^{-2},

so the composer solves one kind of problem, with one place that applies the mass and its scale.

* :func:`constant`: ``D = mass`` (``S = I``).
* :func:`adaptive`: ``D = mass (sqrt(v) + eps)`` with ``v`` the bias-corrected moving average of
  squared gradients (Adam's second moment; Kingma & Ba, arXiv 1412.6980). Outside the range of
  the factor rows the step is then Adam's scaling instead of the same ``1 / mass`` for every
  parameter. For dense-structured modules ``v`` of the kernel is replaced by its rank-one
  (Adafactor; Shazeer & Stern, arXiv 1804.04235) approximation ``v_ab ~ R_a C_b / mean(R)``, so
  ``S`` is a Kronecker product and ``K S`` is again a dense factor (features times ``a^{-1/2}``,
  cotangents times ``b^{-1/2}``): the Gram-Hadamard kernel and its cost are kept. Other modules
  take the full diagonal (their rows are materialised anyway).

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610),
sec. 3 (a diagonal mass ``D_a``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from riemod.curvature.factors import DenseFactor, RowsFactor
from riemod.curvature.types import Curvature


@dataclasses.dataclass(frozen=True)
class ConstantMass:
  """``D = mass`` for every module that declares none (the geometry's default policy)."""

  def init(self, params: Any) -> None:
    del params
    return None

  def update(self, moments: None, grads: Any) -> None:
    del moments, grads
    return None

  def rescale(self, curvature: Curvature, moments: None, count: jax.Array
              ) -> tuple[Curvature, list[Any]]:
    del moments, count
    return curvature, [None] * len(curvature.leaf_shapes)


@dataclasses.dataclass(frozen=True)
class AdaptiveMass:
  """``D = mass (sqrt(v) + eps)`` from the gradients' bias-corrected second moment ``v``.

  Attributes:
    decay: the moving average's decay (Adam's ``b2``), in ``[0, 1)``.
    eps: added to ``sqrt(v)`` (keeps ``D`` positive where gradients vanish), > 0.
  """

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

  def update(self, moments: list[jax.Array], grads: Any) -> list[jax.Array]:
    return [self.decay * v + (1 - self.decay) * (g * g).astype(v.dtype)
            for v, g in zip(moments, jax.tree.leaves(grads))]

  def rescale(self, curvature: Curvature, moments: list[jax.Array], count: jax.Array
              ) -> tuple[Curvature, list[Any]]:
    """The curvature of ``S K`` and the per-leaf ``S`` (``count``: gradients averaged so far)."""
    correction = 1 - self.decay ** jnp.maximum(count, 1).astype(moments[0].dtype) if moments else 1
    second_moment = [v / correction for v in moments]
    scales: list[Any] = [None] * len(curvature.leaf_shapes)
    modules = []
    for module in curvature.modules:
      if module.mass is not None or module.kind == "frozen":
        modules.append(module)
        continue
      v = {name: second_moment[i] for name, i in zip(module.leaf_names, module.leaf_indices)}
      if isinstance(module.factor, DenseFactor):
        factor, leaf_scales = _dense_scaling(module.factor, v, self.eps)
      else:
        leaf_scales = {name: jax.lax.rsqrt(jnp.sqrt(value) + self.eps) for name, value in v.items()}
        factor = module.factor
        if isinstance(factor, RowsFactor):
          factor = RowsFactor({name: rows * leaf_scales[name]
                               for name, rows in factor.leaf_rows.items()})
      for name, i in zip(module.leaf_names, module.leaf_indices):
        scales[i] = leaf_scales[name]
      modules.append(dataclasses.replace(module, factor=factor))
    return dataclasses.replace(curvature, modules=tuple(modules)), scales


def _dense_scaling(factor: DenseFactor, v: dict[str, jax.Array], eps: float):
  """``K S`` and ``S`` of a dense module with the rank-one second moment of its kernel."""
  structure = factor.structure
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
    scales["bias"] = jax.lax.rsqrt(s * b)
    bias_weight = jax.lax.rsqrt(s)
  scaled = DenseFactor(factor.features * in_scale, factor.cotangents * out_scale, structure,
                       bias_weight)
  return scaled, scales


MassPolicy = ConstantMass | AdaptiveMass


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


def _validate(policy: Any) -> None:
  if not isinstance(policy, (ConstantMass, AdaptiveMass)):
    raise TypeError(f"mass_policy={policy!r}: use riemod.masses.constant() or "
                    "riemod.masses.adaptive(decay, eps).")


__all__ = ["AdaptiveMass", "ConstantMass", "MassPolicy", "adaptive", "constant"]

"""An adaptive per-parameter mass: ``D = mass * (sqrt(v) + eps)`` from the gradients' second moment.

``v`` is the bias-corrected moving average of squared gradients (Adam's second moment; Kingma &
Ba, arXiv 1412.6980). Outside the range of the factor rows ``G = K^T K + D`` acts as ``D``, so
there the step is Adam's scaling (heavy-ball RMSprop with learning rate ``lr / mass`` under SPRING
momentum) instead of the same ``1 / mass`` for every parameter; inside the range the curvature
takes over.

A general diagonal ``D`` would break the Gram-Hadamard kernel of dense layers (the rows would have
to be materialised). So for dense-structured modules ``v`` of the kernel is replaced by its rank-one
(Adafactor; Shazeer & Stern, arXiv 1804.04235) approximation ``v_ab ~ R_a C_b / mean(R)`` with
``R``, ``C`` its row and column means, and ``D_W = mass * a (x) b`` with
``a = sqrt((R + eps^2) / (mean R + eps^2))``, ``b = sqrt(C) + eps``; the bias gets
``D_b = mass * s * b`` (``s`` matches the mean of ``sqrt(v_bias) + eps``). With
``S = D^{-1/2}`` (a Kronecker product for the kernel),

    (K^T K + D)^{-1} = S (S K^T K S + I)^{-1} S,

and ``K S`` is again a dense factor (features times ``(mass a)^{-1/2}``, cotangents times
``b^{-1/2}``), so the solve keeps its cost. Other modules get the full diagonal as declared masses.
Modules that declare their own mass keep it.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610),
sec. 3 (a diagonal mass ``D_a``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp

from riemod.composer.factors import DenseFactor

if TYPE_CHECKING:  # riemod.curvature imports the composer's factors; avoid the import cycle.
  from riemod.curvature import Curvature


def rms_scaled_curvature(curvature: Curvature, second_moment: Sequence[jax.Array], mass,
                         eps: float) -> tuple[Curvature, list[Any]]:
  """The curvature of ``S (K^T K + D) S`` and the per-leaf scalings ``S`` (``None``: identity).

  Args:
    curvature: from :func:`riemod.value_grad_and_curvature`.
    second_moment: bias-corrected ``v`` per leaf of ``jax.tree.leaves(params)``.
    mass: the scalar mass multiplier (> 0).
    eps: added to ``sqrt(v)`` (keeps ``D`` positive where gradients vanish).

  Returns:
    ``(scaled curvature, scales)``: solve with the scaled curvature for ``S g`` (mass 1 where
    scaled) and multiply the result by ``S``; ``scales[i]`` is ``S`` of leaf ``i`` or ``None``.

  Example:
    >>> import jax.numpy as jnp, riemod
    >>> from riemod.composer.rms_mass import rms_scaled_curvature
    >>> f = lambda p, x: x @ p["w"]
    >>> _, g, curv = riemod.value_grad_and_curvature(
    ...     f, jnp.ones((4, 3)), lambda y: 0.5 * jnp.mean(y**2), riemod.metrics.identity(),
    ...     params={"w": jnp.ones((3, 2))})
    >>> scaled, scales = rms_scaled_curvature(curv, [g["w"] ** 2], mass=1.0, eps=1e-8)
    >>> scaled.modules[0].mass["w"].shape  # the generic path: a full diagonal
    (3, 2)
  """
  scales: list[Any] = [None] * len(curvature.leaf_shapes)
  modules = []
  for module in curvature.modules:
    if module.mass is not None or module.kind == "frozen":
      modules.append(module)
      continue
    v = {name: second_moment[i] for name, i in zip(module.leaf_names, module.leaf_indices)}
    if isinstance(module.factor, DenseFactor):
      factor, masses, leaf_scales = _dense(module.factor, v, mass, eps)
      for name, i in zip(module.leaf_names, module.leaf_indices):
        scales[i] = leaf_scales[name]
      modules.append(dataclasses.replace(module, factor=factor, mass=masses))
    else:
      masses = {name: mass * (jnp.sqrt(value) + eps) for name, value in v.items()}
      modules.append(dataclasses.replace(module, mass=masses))
  return dataclasses.replace(curvature, modules=tuple(modules)), scales


def _dense(factor: DenseFactor, v: dict[str, jax.Array], mass, eps: float):
  structure = factor.structure
  flat_v = structure.kernel_to_flat(v["kernel"])  # (fan_in, fan_out)
  rows, cols = flat_v.mean(axis=1), flat_v.mean(axis=0)
  tiny = eps * eps
  a = jnp.sqrt((rows + tiny) / (rows.mean() + tiny))
  b = jnp.sqrt(cols) + eps
  in_scale, out_scale = jax.lax.rsqrt(mass * a), jax.lax.rsqrt(b)
  masses = {"kernel": jnp.ones((), flat_v.dtype)}
  scales = {"kernel": structure.flat_to_kernel(in_scale[:, None] * out_scale[None, :])}
  if structure.has_bias:
    # D_b = mass * s * b: the kernel's column profile, scaled to the bias's own mean magnitude.
    s = jnp.mean(jnp.sqrt(v["bias"]) + eps) / jnp.mean(b)
    masses["bias"] = mass * s
    scales["bias"] = out_scale
  scaled = DenseFactor(factor.features * in_scale, factor.cotangents * out_scale, structure)
  return scaled, masses, scales

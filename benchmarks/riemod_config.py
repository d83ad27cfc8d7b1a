"""riemod's configuration per task: one small dict of keyword arguments, turned into a step.

A configuration looks like::

    {"structure": "layerwise", "learning_rate": 0.3, "mass": 1e-2,
     "output_metric": "softmax_fisher", "curvature_batch": 32, "momentum": 0.8, "clip": 10.0}

* ``structure``: ``"layerwise"`` -> :func:`riemod.layerwise_natural_gradient`, ``"full"`` ->
  :func:`riemod.natural_gradient`.
* The metric: ``mass``, ``structure``, ``space``, ``refinement_steps`` and ``mass_policy``
  (``"constant"``, ``"adaptive"`` or ``"adaptive:<decay>"``, e.g. ``"adaptive:0.99"`` for
  :func:`riemod.masses.adaptive`, or ``"kronecker:<decay>:<damping>:<update_every>"`` for
  :func:`riemod.masses.kronecker`) build one :class:`riemod.Geometry`, passed as ``geometry=`` to
  the transform and to the guard.
* ``output_metric``: a name from :mod:`riemod.metrics`, optionally with a count after a colon
  (``"sampled_softmax_fisher:1"``, ``"gaussian_sketch:4"``).
* ``curvature_batch`` is passed to :func:`riemod.value_grad_and_curvature` and ``momentum`` (and any
  other unknown key) to the transform, *only if riemod's signature accepts them*; otherwise the
  configuration is reported as unsupported (never silently dropped).
* ``clip``: ``optax.clip_by_global_norm`` before the transform (``None``: no clipping).
* ``guard``: keyword arguments of :func:`riemod.certify.guarded` (Levenberg-Marquardt mass
  adaptation; the configuration's geometry is passed for you), e.g. ``{"min_scale": 1e-6}``;
  ``None``: no guard. The step must pass ``value=`` and ``value_fn=``.
* ``mass_decay``: ``{"final": m_end, "steps": n}`` turns ``mass`` into a geometric schedule from
  ``mass`` to ``m_end`` over ``n`` steps (then constant); ``None``: a constant mass.
* ``line_search``: keyword arguments of :func:`riemod.scale_by_grid_linesearch`, chained after the
  transform, e.g. ``{"max_step": 1.0, "factor": 0.5, "num": 12}`` (ENGD's grid); ``None``: none.
  The step must pass ``value_fn=`` (``params -> loss`` on the batch) to ``tx.update``.
"""

from __future__ import annotations

import inspect
from typing import Any

import optax

import riemod

# Keys that describe the metric (one riemod.Geometry) and keys handled here; any other key is
# passed to the transform if its signature has it.
GEOMETRY_KEYS = ("mass", "space", "mass_policy", "refinement_steps")
LOCAL_KEYS = ("structure", "output_metric", "clip", "curvature_batch", "guard", "line_search",
              "mass_decay")


def _transform_fn(structure: str):
  if structure == "layerwise":
    return riemod.layerwise_natural_gradient
  if structure == "full":
    return riemod.natural_gradient
  raise ValueError(f"structure={structure!r}")


def output_metric(name: str) -> riemod.metrics.OutputMetric:
  base, _, count = name.partition(":")
  fn = getattr(riemod.metrics, base, None)
  if fn is None:
    raise ValueError(f"output_metric={name!r}: riemod.metrics has no {base!r}.")
  return fn(int(count)) if count else fn()


def mass_policy(name: str):
  """``"constant"``, ``"adaptive[:<decay>]"`` or ``"kronecker[:<decay>[:<damping>[:<every>]]]"``
  -> a :mod:`riemod.masses` policy."""
  base, _, decay = name.partition(":")
  if base == "constant" and not decay:
    return riemod.masses.constant()
  if base == "adaptive":
    return riemod.masses.adaptive(float(decay)) if decay else riemod.masses.adaptive()
  if base == "kronecker":
    # "kronecker:<decay>:<damping>:<update_every>", trailing fields optional
    fields = decay.split(":") if decay else []
    kinds = (float, float, int)
    return riemod.masses.kronecker(*(kind(v) for kind, v in zip(kinds, fields)))
  raise ValueError(f"mass_policy={name!r}: use 'constant', 'adaptive', 'adaptive:<decay>' or "
                   "'kronecker:<decay>:<damping>:<update_every>'.")


def supported(config: dict[str, Any]) -> tuple[bool, str]:
  """Whether this riemod accepts every option of ``config`` (and the reason if not)."""
  vgc = inspect.signature(riemod.value_grad_and_curvature).parameters
  if config.get("curvature_batch") is not None and "curvature_batch" not in vgc:
    return False, "riemod.value_grad_and_curvature has no curvature_batch= option"
  tparams = inspect.signature(_transform_fn(config.get("structure", "layerwise"))).parameters
  for key, value in config.items():
    if key in LOCAL_KEYS or key in GEOMETRY_KEYS or value is None:
      continue
    if key not in tparams:
      return False, f"the riemod transform has no {key}= option"
  return True, ""


def geometry(config: dict[str, Any]) -> riemod.Geometry:
  """The configuration's metric: mass (or its decay schedule), policy, structure, space."""
  mass = config.get("mass", 1e-2)
  if config.get("mass_decay") is not None:
    decay = config["mass_decay"]
    mass = optax.exponential_decay(
        config["mass"], transition_steps=decay["steps"], decay_rate=decay["final"] / config["mass"],
        end_value=decay["final"])
  return riemod.Geometry(
      mass=mass, mass_policy=mass_policy(config.get("mass_policy") or "constant"),
      structure=config.get("structure", "layerwise"), space=config.get("space") or "auto",
      refinement_steps=config.get("refinement_steps") or 0)


def build(config: dict[str, Any]):
  """``(transform, metric, vgc_kwargs)`` for a configuration (see module docstring)."""
  ok, why = supported(config)
  if not ok:
    raise NotImplementedError(why)
  structure = config.get("structure", "layerwise")
  kwargs = {k: v for k, v in config.items()
            if k not in LOCAL_KEYS and k not in GEOMETRY_KEYS and v is not None}
  metric_geometry = geometry(config)
  tx = _transform_fn(structure)(geometry=metric_geometry, **kwargs)
  if config.get("guard") is not None:
    tx = riemod.certify.guarded(tx, metric_geometry, **config["guard"])
  if config.get("line_search") is not None:
    tx = optax.chain(tx, riemod.scale_by_grid_linesearch(**config["line_search"]))
  if config.get("clip") is not None:
    tx = optax.chain(optax.clip_by_global_norm(config["clip"]), tx)
  vgc_kwargs = {}
  if config.get("curvature_batch") is not None:
    vgc_kwargs["curvature_batch"] = config["curvature_batch"]
  return tx, output_metric(config.get("output_metric", "identity")), vgc_kwargs

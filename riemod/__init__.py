"""riemod: modular Riemannian training for JAX/Flax.

Riemannian modules carry a layerwise metric (a mass plus the output metric pulled back through the
network); the Woodbury composer turns those metrics into natural-gradient steps, used as optax
transformations. Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems*
(arXiv 2603.03610).
"""

import types as _types

from riemod._threads import set_blas_threads  # one BLAS thread from here on; see riemod._threads
from riemod import certify, composer, conservation, metrics, nn, sampling
from riemod.composer import ComposedMetric, compose_metric
from riemod.curvature import Curvature, ModuleCurvature, value_grad_and_curvature
from riemod.linesearch import GridLinesearchState, scale_by_grid_linesearch
from riemod.nn import MetricDeclaration
from riemod.state import find_state
from riemod.transforms import (LayerwiseMetricState, layerwise_natural_gradient, module_diagnostics,
                               natural_gradient, scale_by_layerwise_metric)

__version__ = "0.1.0"


class _CallableCertify(_types.ModuleType):
  """``riemod.certify(...)`` runs the certificate; ``riemod.certify.<part>`` stays a package."""

  def __call__(self, *args, **kwargs):
    return self.certify(*args, **kwargs)


certify.__class__ = _CallableCertify

__all__ = [
    "ComposedMetric", "Curvature", "GridLinesearchState", "certify", "conservation", "sampling", "LayerwiseMetricState", "MetricDeclaration", "ModuleCurvature",
    "compose_metric", "composer", "find_state", "layerwise_natural_gradient", "metrics", "module_diagnostics",
    "natural_gradient", "nn", "scale_by_grid_linesearch", "scale_by_layerwise_metric", "value_grad_and_curvature",
]

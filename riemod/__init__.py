"""riemod: modular Riemannian training for JAX/Flax.

Riemannian modules carry a layerwise metric (a mass plus the output metric pulled back through the
network); the Woodbury composer turns those metrics into natural-gradient steps, used as optax
transformations. Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems*
(arXiv 2603.03610).
"""

from riemod import composer, metrics, nn
from riemod.composer import ComposedMetric, compose_metric
from riemod.curvature import Curvature, ModuleCurvature, value_grad_and_curvature
from riemod.nn import MetricDeclaration
from riemod.transforms import (LayerwiseMetricState, layerwise_natural_gradient, module_diagnostics,
                               natural_gradient, scale_by_layerwise_metric)

__version__ = "0.1.0"

__all__ = [
    "ComposedMetric", "Curvature", "LayerwiseMetricState", "MetricDeclaration", "ModuleCurvature",
    "compose_metric", "composer", "layerwise_natural_gradient", "metrics", "module_diagnostics",
    "natural_gradient", "nn", "scale_by_layerwise_metric", "value_grad_and_curvature",
]

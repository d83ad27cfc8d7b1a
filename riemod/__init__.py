"""riemod: modular Riemannian training for JAX/Flax.

Riemannian modules carry a layerwise metric (a mass plus the output metric pulled back through the
network); a :class:`Geometry` turns those metrics into natural-gradient steps with the Woodbury
composer, used as optax transformations. Reference: Pehle & Slotine, *Riemannian Optimization in
Modular Systems* (arXiv 2603.03610).
"""

from riemod._threads import set_blas_threads  # one BLAS thread from here on; see riemod._threads
from riemod import certify, composer, conservation, metrics, nn, sampling
from riemod.composer import ComposedMetric, Geometry, GeometryState, masses
from riemod.curvature import Curvature, ModuleCurvature, value_grad_and_curvature
from riemod.linesearch import GridLinesearchState, scale_by_grid_linesearch
from riemod.certify.guard import LevenbergMarquardtState, levenberg_marquardt
from riemod.nn import MetricDeclaration
from riemod.state import find_state
from riemod.transforms import (ActionState, MetricState, StepRefusedError, ValidStepState,
                               apply_if_valid, layerwise_natural_gradient, module_diagnostics,
                               natural_gradient, scale_by_metric, track_action)

__version__ = "0.1.0"

__all__ = [
    "ActionState", "ComposedMetric", "Curvature", "Geometry", "GeometryState",
    "GridLinesearchState", "LevenbergMarquardtState", "MetricDeclaration", "MetricState",
    "ModuleCurvature", "StepRefusedError", "ValidStepState", "apply_if_valid", "certify",
    "composer", "conservation", "find_state", "layerwise_natural_gradient", "levenberg_marquardt",
    "masses", "metrics", "module_diagnostics", "natural_gradient", "nn", "sampling",
    "scale_by_grid_linesearch", "scale_by_metric", "track_action", "value_grad_and_curvature",
]

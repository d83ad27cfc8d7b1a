"""Stability certificates for Riemannian training: contraction, Lipschitz, action, stability.

:func:`certify` measures, at one batch, everything riemod promises about a training step:

1. per-module Lipschitz constants ``||A_a||``, ``||B_a||`` and their composition
   (:mod:`riemod.certify.lipschitz`);
2. the spectrum of ``G^{-1} H`` by generalised Lanczos (:mod:`riemod.certify.lanczos`), the
   contraction factor, the largest stable learning rate, per module and composed
   (:mod:`riemod.certify.contraction`);
3. the action gap of the run so far (:mod:`riemod.certify.action`);
4. the stability bound with measured constants (:mod:`riemod.certify.bound`).

:func:`guarded` wraps a natural-gradient transform with Levenberg-Marquardt mass adaptation and
step rejection; :func:`levenberg_marquardt` adapts the mass from the step actually taken (line
search included), without rejection (both in :mod:`riemod.certify.guard`). :func:`controlled` wraps riemod's step with a
certified learning rate, a fixed fraction of the edge of stability ``2 / lam_max(G^{-1} H_GN)``
measured every few steps (:mod:`riemod.certify.controller`); :func:`certified_natural_gradient`
and :func:`certified_layerwise_natural_gradient` are the aliases that need no learning rate, and
:func:`certified_gauss_newton` the recipe for full-batch least squares (PINNs).

References:
  Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 5-6.
  Lohmiller & Slotine, *On contraction analysis for non-linear systems*, Automatica (1998).
  Bousquet & Elisseeff, *Stability and generalization*, JMLR (2002).
  Kozachkov, Wensing & Slotine, *Generalization as dynamical robustness*.
"""

from riemod.certify.action import ActionTerms, action_terms, path_action
from riemod.certify.bound import FORMULA, StabilityBound, stability_bound
from riemod.certify.certificate import certify
from riemod.certify.contraction import (Contraction, cascade_weights, composed_rate,
                                        contraction_factor, contraction_of, coupling_norm,
                                        max_stable_learning_rate, spectrum)
from riemod.certify.controller import (ControllerState, certified_gauss_newton,
                                       certified_geometry,
                                       certified_layerwise_natural_gradient,
                                       certified_natural_gradient, controlled)
from riemod.certify.guard import (GuardState, LevenbergMarquardtState, guarded,
                                  levenberg_marquardt)
from riemod.certify.lanczos import LanczosResult, generalized_lanczos, top_ritz_pair
from riemod.certify.lipschitz import (LipschitzSummary, ModuleLipschitz, network_lipschitz,
                                      param_lipschitz, state_lipschitz)
from riemod.certify.report import CertificateReport

__all__ = [
    "ActionTerms", "CertificateReport", "Contraction", "ControllerState", "FORMULA", "GuardState",
    "LanczosResult", "LevenbergMarquardtState", "LipschitzSummary", "ModuleLipschitz", "StabilityBound", "action_terms",
    "cascade_weights", "certified_gauss_newton", "certified_geometry", "certified_layerwise_natural_gradient", "certified_natural_gradient",
    "certify", "composed_rate", "contraction_factor", "contraction_of", "controlled",
    "coupling_norm", "generalized_lanczos", "guarded", "levenberg_marquardt", "max_stable_learning_rate",
    "network_lipschitz", "param_lipschitz", "path_action", "spectrum", "stability_bound",
    "state_lipschitz", "top_ritz_pair",
]



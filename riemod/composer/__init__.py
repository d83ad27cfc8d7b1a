"""The composer: from curvature to the metric ``G = K^T K + D`` and its solves.

:class:`Geometry` describes the metric (mass, mass policy, block structure, solve space,
refinement); :meth:`Geometry.compose` factors it into a :class:`ComposedMetric`, whose blocks are
:class:`BlockFactorization` objects (Woodbury in sample space, or Cholesky in parameter space).
"""

from riemod.composer import masses
from riemod.composer.geometry import SPACES, Geometry, GeometryState, validate_mass
from riemod.composer.metric import STRUCTURES, ComposedMetric, StepReport
from riemod.composer.spectral import precision_cutoff
from riemod.composer.woodbury import (BlockFactorization, BlockStep, cholesky_with_jitter,
                                      factorize_block)

__all__ = ["BlockFactorization", "BlockStep", "ComposedMetric", "Geometry", "GeometryState",
           "SPACES", "STRUCTURES", "StepReport", "cholesky_with_jitter", "factorize_block",
           "masses", "precision_cutoff", "validate_mass"]

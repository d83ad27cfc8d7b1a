"""Measuring curvature: the ``Curvature`` pytree and :func:`value_grad_and_curvature`."""

from riemod.curvature.factors import DenseFactor, Factor, RowsFactor
from riemod.curvature.measure import value_grad_and_curvature
from riemod.curvature.types import Curvature, ModuleCurvature

__all__ = ["Curvature", "DenseFactor", "Factor", "ModuleCurvature", "RowsFactor",
           "value_grad_and_curvature"]

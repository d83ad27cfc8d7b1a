"""Riemannian modules: layers that carry their metric declaration, their compositions, and
functional layers (``dense``) for plain functions."""

from riemod.nn.composition import Parallel, Sequential
from riemod.nn.declaration import KINDS, MetricDeclaration
from riemod.nn.functional import conv, dense, embed, layer_norm, rms_norm
from riemod.nn.layers import Conv, Dense
from riemod.nn.structure import DenseStructure

__all__ = ["Conv", "Dense", "DenseStructure", "KINDS", "MetricDeclaration", "Parallel",
           "Sequential", "conv", "dense", "embed", "layer_norm", "rms_norm"]

"""The Woodbury composer: per-module kernels, block factorisations, solves and exact draws."""

from riemod.composer.factors import DenseFactor, RowsFactor
from riemod.composer.metric import STRUCTURES, ComposedMetric, compose_metric
from riemod.composer.woodbury import BlockFactorization, cholesky_with_jitter, factorize_block

__all__ = ["BlockFactorization", "ComposedMetric", "DenseFactor", "RowsFactor", "STRUCTURES",
           "cholesky_with_jitter", "compose_metric", "factorize_block"]

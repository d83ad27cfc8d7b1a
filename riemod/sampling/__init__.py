"""Langevin sampling driven by the same metric objects as the optimizers.

* :mod:`~riemod.sampling.batching`: minibatch schedules with or without replacement, from a key.
* :mod:`~riemod.sampling.langevin`: :func:`sgld`, :func:`sgworld`, :func:`riemannian_sgld` (optax
  transforms, key in the state) and :func:`potential_grad`.
* :mod:`~riemod.sampling.driver`: :func:`sample` (burn-in, thinning, chains, progress bar).
* :mod:`~riemod.sampling.diagnostics`: moments, Lyapunov closed forms, probability current,
  entropy production and the integral fluctuation theorem.
* :mod:`~riemod.sampling.blr`: the Bayesian linear regression with its exact posterior.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from riemod import sampling
  >>> grad_fn = lambda p, idx, key: ({"w": p["w"]}, {})          # U = |w|^2 / 2
  >>> result = sampling.sample(sampling.sgld(0.1, key=0), {"w": jnp.zeros(2)}, grad_fn,
  ...                          sampling.Minibatcher(1, 1), key=0, num_samples=10, progress=False)
  >>> result.samples["w"].shape
  (10, 2)
"""

from riemod.sampling import blr, diagnostics
from riemod.sampling.batching import BatchState, Minibatcher, batch_indices, minibatches
from riemod.sampling.driver import ChainState, SampleResult, sample
from riemod.sampling.langevin import (LangevinState, RiemannianLangevinState, potential_grad,
                                      riemannian_sgld, sgld, sgworld)

__all__ = [
    "BatchState", "ChainState", "LangevinState", "Minibatcher", "RiemannianLangevinState",
    "SampleResult", "batch_indices", "blr", "diagnostics", "minibatches", "potential_grad",
    "riemannian_sgld", "sample", "sgld", "sgworld",
]

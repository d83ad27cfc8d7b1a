"""The algorithmic-stability bound ``O(kappa^2 L / (xi mu sqrt(n)))`` with measured constants.

The paper (Pehle & Slotine, arXiv 2603.03610) states a uniform-stability bound of this order; its
exact theorem is not known to riemod. riemod's reading, evaluated with constants measured at the
certified batch::

    beta = kappa^2 * L / (xi * mu * sqrt(n))

* ``kappa``: the composed parameter-Lipschitz constant of the network, ``sup_s ||dy/dw (x_s)||``
  over the batch (the feature-map norm that plays the role of ``kappa`` in Bousquet & Elisseeff's
  bound for regularised kernel methods);
* ``L``: the Lipschitz constant of the loss gradient with respect to one sample's outputs, the
  largest eigenvalue of the per-sample output Hessian, by power iteration;
* ``xi``: read as the reciprocal of the metric's condition-number bound,
  ``xi = 1 / max_a (lam_max(G_a) / min mass_a)``, so that an ill-conditioned metric enlarges the
  bound (the conservative reading of "a bound on the condition number");
* ``mu``: the smallest mass (times the guard's mass scale), the regulariser;
* ``n``: the training-set size (the batch size when it is not given).

The value is a diagnostic of order, not a proven constant: it is meaningful for comparing runs
(masses, widths, data sizes), not as an absolute generalisation guarantee.

References:
  Bousquet & Elisseeff, *Stability and generalization*, JMLR 2 (2002).
  Kozachkov, Wensing & Slotine, *Generalization as dynamical robustness* (contraction at rate
  ``lam`` gives uniform stability ``O(1 / (lam n))``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

FORMULA = "beta = kappa^2 * L / (xi * mu * sqrt(n))"


class StabilityBound(NamedTuple):
  """The bound and every constant in it, each with how it was measured."""

  value: float
  kappa: float
  loss_gradient_lipschitz: float
  xi: float
  condition_bound: float
  mu: float
  n: int
  formula: str
  measured: dict

  def to_dict(self) -> dict:
    return {"value": self.value, "formula": self.formula, "constants": {
        "kappa": self.kappa, "L": self.loss_gradient_lipschitz, "xi": self.xi,
        "condition_bound": self.condition_bound, "mu": self.mu, "n": self.n},
            "measured": dict(self.measured)}


def stability_bound(kappa: float, loss_gradient_lipschitz: float, condition_bound: float,
                    mu: float, n: int, *, measured: dict | None = None) -> StabilityBound:
  """Evaluates ``kappa^2 L / (xi mu sqrt(n))`` with ``xi = 1 / condition_bound``.

  Example:
    >>> round(stability_bound(2.0, 0.5, 10.0, 1e-2, 100).value, 6)
    200.0
  """
  for name, value in (("kappa", kappa), ("loss_gradient_lipschitz", loss_gradient_lipschitz),
                      ("condition_bound", condition_bound), ("mu", mu)):
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"{name}={value!r}: the stability bound needs a finite non-negative value.")
  if condition_bound < 1.0 or mu <= 0:
    raise ValueError(f"condition_bound={condition_bound!r} must be >= 1 and mu={mu!r} > 0.")
  if int(n) < 1:
    raise ValueError(f"n={n!r}: the training-set size must be a positive integer.")
  xi = 1.0 / condition_bound
  value = kappa ** 2 * loss_gradient_lipschitz / (xi * mu * math.sqrt(int(n)))
  return StabilityBound(value, kappa, loss_gradient_lipschitz, xi, condition_bound, mu, int(n),
                        FORMULA, measured or {})

"""The certificate report: per-module rows, network quantities, a verdict; table, dict and JSON.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 5.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any


def _clean(value: Any) -> Any:
  """JSON-safe: non-finite floats become ``None``; numpy scalars become Python numbers."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if hasattr(value, "tolist"):
    return _clean(value.tolist())
  return value


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    if math.isinf(value):
      return "inf"
    if math.isnan(value):
      return "nan"
    return f"{value:.4g}"
  return str(value)


@dataclasses.dataclass
class CertificateReport:
  """What :func:`riemod.certify.certify` measured.

  Attributes:
    modules: one dict per module (Lipschitz constants; for parametric modules also the block
      spectrum of ``G_a^{-1} H_aa``, its contraction factor and stable learning rate, the metric
      condition bound).
    network: whole-network spectrum of ``G^{-1} H``, contraction factor, stable learning rate.
    composition: composed rate by the cascade/feedback rule, the coupling matrix, the slowest
      module's factor, Lipschitz bounds beside measured end-to-end constants.
    action: action terms from the optimizer state (``None`` without a state).
    bound: the stability bound with its constants (see :mod:`riemod.certify.bound`).
    settings: learning rate, mass, structure, batch and data sizes, loss.
    verdict: a short string.
    notes: caveats met while certifying.
  """

  modules: list[dict]
  network: dict
  composition: dict
  action: dict | None
  bound: dict
  settings: dict
  verdict: str
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def contraction_factor(self) -> float:
    return self.network["contraction_factor"]

  @property
  def max_stable_learning_rate(self) -> float:
    return self.network["max_stable_learning_rate"]

  @property
  def action_gap(self) -> float | None:
    return None if self.action is None else self.action["gap"]

  @property
  def stability_bound(self) -> float:
    return self.bound["value"]

  def to_dict(self) -> dict:
    """JSON-safe dict (non-finite numbers become ``None``)."""
    return _clean({
        "verdict": self.verdict,
        "contraction_factor": self.contraction_factor,
        "max_stable_learning_rate": self.max_stable_learning_rate,
        "action_gap": self.action_gap,
        "stability_bound": self.stability_bound,
        "modules": self.modules,
        "network": self.network,
        "composition": self.composition,
        "action": self.action,
        "bound": self.bound,
        "settings": self.settings,
        "notes": self.notes,
    })

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

  def table(self) -> str:
    """A readable multi-line summary."""
    s, net, comp = self.settings, self.network, self.composition
    lines = [f"riemod certificate  lr={_fmt(s['learning_rate'])}  mass={_fmt(s['mass'])}"
             f"  structure={s['structure']}  batch={s['batch_size']}  loss={_fmt(s['loss'])}",
             f"verdict: {self.verdict}", ""]
    header = ("module", "kind", "||A||", "||B||", "lam_min", "lam_max", "rho_a", "2/lam_max",
              "cond(G_a)")
    rows = [header]
    for m in self.modules:
      rows.append((m["name"], m["kind"], _fmt(m["state_lipschitz"]), _fmt(m["param_lipschitz"]),
                   _fmt(m.get("lam_min")), _fmt(m.get("lam_max")),
                   _fmt(m.get("contraction_factor")), _fmt(m.get("max_stable_learning_rate")),
                   _fmt(m.get("condition_bound"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
      lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
      if i == 0:
        lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        f"network  G^-1 H in [{_fmt(net['lam_min'])}, {_fmt(net['lam_max'])}]"
        f"  ({net['lanczos_steps']} Lanczos steps)",
        f"  contraction factor max|1 - lr lam| = {_fmt(net['contraction_factor'])}",
        f"  max stable learning rate 2/lam_max = {_fmt(net['max_stable_learning_rate'])}",
        f"composed rate rho(N) (cascade/feedback rule) = {_fmt(comp['composed_rate'])}"
        f"  slowest module = {_fmt(comp['slowest_module_factor'])}"
        f"  whole network = {_fmt(net['contraction_factor'])}",
        f"Lipschitz  state: composed {_fmt(comp['composed_state_lipschitz'])} >= measured "
        f"{_fmt(comp['measured_state_lipschitz'])};  params: composed "
        f"{_fmt(comp['composed_param_lipschitz'])} >= measured "
        f"{_fmt(comp['measured_param_lipschitz'])}",
    ]
    if self.action is None:
      lines.append("action: - (pass opt_state= with value=loss tracked)")
    else:
      a = self.action
      lines.append(f"action  S = {_fmt(a['action'])}  l(0) - l(T) = {_fmt(a['loss_decrease'])}"
                   f"  gap = {_fmt(a['gap'])}  ({a['num_steps']} steps, {a['form']} form)")
    b = self.bound
    c = b["constants"]
    lines.append(f"stability  {b['formula']} = {_fmt(b['value'])}  (kappa={_fmt(c['kappa'])}, "
                 f"L={_fmt(c['L'])}, xi={_fmt(c['xi'])}, mu={_fmt(c['mu'])}, n={c['n']})")
    for note in self.notes:
      lines.append(f"note: {note}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()

"""The certificate report: per-module rows, network quantities, a verdict; table, dict and JSON.

Reference: Pehle & Slotine, *Riemannian Optimization in Modular Systems* (arXiv 2603.03610), sec. 5.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from riemod.certify.contraction import Verdict, classify


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
    verdict: one line, ``"<status>: <reason>"``; the status is one of ``contracting``,
      ``stable``, ``edge``, ``unstable``, ``failed`` (see
      :func:`~riemod.certify.contraction.classify` and :attr:`verdict_detail` for the step-size,
      curvature and contraction statements).
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

  @staticmethod
  def verdict_of(network: dict, settings: dict, action: dict | None = None) -> Verdict:
    """The :class:`~riemod.certify.contraction.Verdict` of a report's parts.

    Uses the whole-network spectrum, ``network["gauss_newton"]`` when measured and, with the
    optimizer's action terms, the loss history (the first update's loss against the certified
    loss ``settings["loss"]``).
    """
    gn = network.get("gauss_newton")
    history = None
    if action is not None and action.get("num_steps"):
      history = (action["initial_loss"], settings["loss"], action["num_steps"])
    return classify(network["lam_min"], network["lam_max"], settings["learning_rate"],
                    gauss_newton=None if gn is None else (gn["lam_min"], gn["lam_max"]),
                    history=history)

  @property
  def verdict_detail(self) -> Verdict:
    """The verdict with its step-size, curvature and contraction statements."""
    return self.verdict_of(self.network, self.settings, self.action)

  def with_gauss_newton(self, result) -> "CertificateReport":
    """A copy with the Gauss-Newton spectrum (``lam_min``, ``lam_max`` attributes, e.g. from
    :func:`~riemod.certify.contraction.gauss_newton_spectrum`) and the verdict it refines."""
    lr = self.settings["learning_rate"]
    lam_min, lam_max = float(result.lam_min), float(result.lam_max)
    network = dict(self.network, gauss_newton={
        "lam_min": lam_min, "lam_max": lam_max, "edge_ratio": lr * max(lam_max, 0.0) / 2,
        "max_stable_learning_rate": 2.0 / lam_max if lam_max > 0 else math.inf})
    return dataclasses.replace(self, network=network,
                               verdict=str(self.verdict_of(network, self.settings, self.action)))

  def with_measured_stability(self, measured) -> "CertificateReport":
    """A copy whose ``bound`` holds a measured stability figure beside the bound (a
    :class:`~riemod.certify.bound.MeasuredStability`)."""
    bound = dict(self.bound, measured_stability=measured.to_dict())
    return dataclasses.replace(self, bound=bound)

  def to_dict(self) -> dict:
    """JSON-safe dict (non-finite numbers become ``None``)."""
    return _clean({
        "verdict": self.verdict,
        "verdict_detail": self.verdict_detail._asdict(),
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
             f"verdict: {self.verdict}"]
    detail = self.verdict_detail
    if detail.status != "failed":
      lines += [f"  step size: {detail.step_size}", f"  curvature: {detail.curvature}",
                f"  contraction: {detail.contraction}"]
    lines.append("")
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
        f"  edge of stability 2/lam_max = {_fmt(net['max_stable_learning_rate'])}"
        f"  (lr lam_max/2 = {_fmt(detail.edge_ratio)})",
        f"composed rate rho(N) (cascade/feedback rule) = {_fmt(comp['composed_rate'])}"
        f"  slowest module = {_fmt(comp['slowest_module_factor'])}"
        f"  whole network = {_fmt(net['contraction_factor'])}",
        f"Lipschitz  state: composed {_fmt(comp['composed_state_lipschitz'])} >= measured "
        f"{_fmt(comp['measured_state_lipschitz'])};  params: composed "
        f"{_fmt(comp['composed_param_lipschitz'])} >= measured "
        f"{_fmt(comp['measured_param_lipschitz'])}",
    ]
    gn = net.get("gauss_newton")
    if gn is not None:
      lines.append(f"Gauss-Newton model  G^-1 H_GN in [{_fmt(gn['lam_min'])}, "
                   f"{_fmt(gn['lam_max'])}]"
                   f"  edge 2/lam_max = {_fmt(gn['max_stable_learning_rate'])}"
                   f"  (lr lam_max/2 = {_fmt(gn['edge_ratio'])})")
    if self.action is None:
      lines.append("action: - (pass opt_state= with value=loss tracked)")
    else:
      a = self.action
      lines.append(f"action  S = {_fmt(a['action'])}  l(0) - l(T) = {_fmt(a['loss_decrease'])}"
                   f"  gap = {_fmt(a['gap'])}  ({a['num_steps']} steps, {a['form']} form)")
    b = self.bound
    c = b["constants"]
    lines.append(f"stability bound  {b['formula']} = {_fmt(b['value'])}")
    lines.append(f"  constants: kappa={_fmt(c['kappa'])}, L={_fmt(c['L'])}, xi={_fmt(c['xi'])} "
                 f"(condition bound {_fmt(c['condition_bound'])}), mu={_fmt(c['mu'])}, n={c['n']}")
    m = b.get("measured_stability")
    if m is None:
      lines.append("  measured: - (riemod.certify.bound.measured_stability gives the figure)")
    else:
      loss = "" if m["loss_difference"] is None else \
          f", max_z |l(w, z) - l(w', z)| = {_fmt(m['loss_difference'])}"
      lines.append(f"  measured: ||w - w'|| = {_fmt(m['parameter_distance'])}{loss}  (two runs, "
                   f"sample {m['index']} replaced, {m['num_steps']} steps)")
    for note in self.notes:
      lines.append(f"note: {note}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()

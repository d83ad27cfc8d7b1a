"""The adversarial run: bad inputs fed to riemod, each outcome classified automatically.

Run::

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.adversarial [--groups mass lr ...] [--quiet]

Writes ``benchmarks/results/adversarial.json`` (per case: group, axes, expected verdict, outcome,
exception type and the first line of its message) and ``adversarial.md`` (counts by outcome and
group; every case that is not "correct" or "answered" listed).

Every case is a point of a small product of axes (values x entry points x policies x frontends x
eager/jit), so the count is what the axes give, not padding. The problem is one tiny tanh MLP
(3 -> 4 -> 2, batch 6, least squares with the identity metric) written four ways: a plain function
(generic rows), a plain function with ``riemod.nn.dense`` (dense factors), an NNX module and a
Linen module, all with the same weights.

Each case states its expectation from its own definition, never from running riemod:

* a *valid* case expects the parameter change of the dense reference: ``-lr (J^T J / B + D)^{-1} g``
  in float64 with ``J`` from ``jax.jacrev`` (block diagonal per layer for the layerwise
  structure), or the documented behaviour (a zero learning rate moves nothing; an ``optax.masked``
  leaf outside the mask receives its gradient);
* an *invalid* case expects a refusal: a ``ValueError`` / ``TypeError`` / ``FloatingPointError``
  (under ``jax.jit`` the documented ``JaxRuntimeError`` carrying ``StepRefusedError``) whose message
  names the offending argument, or, under ``on_nonfinite="skip"``, a skipped step (parameters
  unchanged, ``skipped_steps`` counted);
* with ``on_nonfinite="ignore"`` non-finite data is documented to pass unchecked: a non-finite
  update is the expected result there.

Outcomes: ``correct`` (the expected update or documented behaviour), ``answered`` (refused with a
message naming the argument), ``silent wrong`` (finite but not the reference, or a step that
should have been refused), ``unexpected NaN`` (non-finite parameters without a refusal),
``unhelpful crash`` (any other exception, or the right type without the argument named) and
``wrongly refused`` (a valid input refused). Invalid inputs under ``on_nonfinite="ignore"``
that only show at run time (a traced negative mass or learning rate) are not in the product:
"ignore" is documented to check nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen, nnx  # noqa: E402

import riemod  # noqa: E402
from benchmarks import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IN, HID, OUT, BATCH = 3, 4, 2, 6
LR = 0.5
TOL = 2e-3  # float32 step vs float64 reference, relative to the reference's largest entry
OUTCOMES = ("correct", "answered", "silent wrong", "unexpected NaN", "unhelpful crash",
            "wrongly refused")
FAILURES = ("silent wrong", "unexpected NaN", "unhelpful crash", "wrongly refused")
NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------- the problem
def _weights(seed: int = 0, hidden: int = HID, layers: int = 2) -> dict[str, dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  sizes = [IN] + [hidden] * (layers - 1) + [OUT]
  names = "abcdef"
  return {names[i]: {"kernel": (rng.standard_normal((sizes[i], sizes[i + 1])) /
                                np.sqrt(sizes[i])).astype(np.float32),
                     "bias": (0.1 * rng.standard_normal(sizes[i + 1])).astype(np.float32)}
          for i in range(layers)}


def _data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((BATCH, IN)).astype(np.float32),
          rng.standard_normal((BATCH, OUT)).astype(np.float32))


def _forward(p, x):
  """The canonical network on a ``{"a": {kernel, bias}, "b": ...}`` dict (any number of layers)."""
  names = sorted(p)
  h = x
  for i, name in enumerate(names):
    h = h @ p[name]["kernel"] + p[name]["bias"]
    if i < len(names) - 1:
      h = jnp.tanh(h)
  return h


def _forward_dense(p, x):
  names = sorted(p)
  h = x
  for i, name in enumerate(names):
    h = riemod.nn.dense(p[name], h)
    if i < len(names) - 1:
      h = jnp.tanh(h)
  return h


def _ls_loss(t):
  return lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))


class _NNXNet(nnx.Module):

  def __init__(self, w, *, dropout: float = 0.0, batchnorm: bool = False, out: str = "array",
               param_dtype=jnp.float32):
    self.a = nnx.Linear(IN, HID, rngs=nnx.Rngs(0), param_dtype=param_dtype)
    self.b = nnx.Linear(HID, OUT, rngs=nnx.Rngs(1), param_dtype=param_dtype)
    for name in "ab":
      layer = getattr(self, name)
      layer.kernel.value = jnp.asarray(w[name]["kernel"], param_dtype)
      layer.bias.value = jnp.asarray(w[name]["bias"], param_dtype)
    self.drop = nnx.Dropout(dropout, rngs=nnx.Rngs(2)) if dropout else None
    self.norm = nnx.BatchNorm(HID, rngs=nnx.Rngs(3)) if batchnorm else None
    self.out = out

  def __call__(self, x):
    h = jnp.tanh(self.a(x))
    if self.drop is not None:
      h = self.drop(h)
    if self.norm is not None:
      h = self.norm(h)
    return _shape_output(self.b(h), self.out)


class _LinenNet(linen.Module):
  dropout: float = 0.0
  deterministic: bool = True
  batchnorm: bool = False
  out: str = "array"
  param_dtype: Any = jnp.float32

  @linen.compact
  def __call__(self, x):
    h = jnp.tanh(linen.Dense(HID, param_dtype=self.param_dtype)(x))
    if self.dropout:
      h = linen.Dropout(self.dropout, deterministic=self.deterministic)(h)
    if self.batchnorm:
      h = linen.BatchNorm(use_running_average=False)(h)
    return _shape_output(linen.Dense(OUT, param_dtype=self.param_dtype)(h), self.out)


def _shape_output(y, out: str):
  if out == "scalar":
    return jnp.sum(y)
  if out == "tuple":
    return y, y
  if out == "dict":
    return {"y": y}
  if out == "transposed":
    return y.T
  return y


def _linen_variables(w, module: _LinenNet, dtype=jnp.float32):
  variables = module.init(jax.random.key(0), jnp.ones((1, IN)))
  params = dict(variables["params"])
  for name, key in zip("ab", ("Dense_0", "Dense_1")):
    params[key] = {"kernel": jnp.asarray(w[name]["kernel"], dtype),
                   "bias": jnp.asarray(w[name]["bias"], dtype)}
  return {**variables, "params": params}


# --------------------------------------------------------------------------- the dense reference
def reference_delta(w, x, t, *, lr: float, mass: Any, structure: str,
                    selected: tuple[str, ...] | None = None, forward=_forward) -> np.ndarray:
  """``-lr (J^T J / B + D)^{-1} g`` in float64 on the canonical parameters, flattened in
  ``jax.flatten_util.ravel_pytree`` order. ``mass``: a number or ``{module: number}``;
  ``selected``: only these modules are stepped (others' rows of the result are the gradient's
  pass-through, filled by the caller)."""
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), w)
    x64, t64 = jnp.asarray(x, jnp.float64), jnp.asarray(t, jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(p64)
    out = lambda v: forward(unravel(v), x64)
    jac = np.asarray(jax.jacrev(out)(flat)).reshape(-1, flat.size) / np.sqrt(x64.shape[0])
    grad = np.asarray(jax.grad(lambda v: _ls_loss(t64)(out(v)))(flat))
    owner = np.asarray(jax.flatten_util.ravel_pytree(
        {m: jax.tree.map(lambda a, i=i: jnp.full(a.shape, i), p64[m])
         for i, m in enumerate(sorted(p64))})[0]).astype(int)
    modules = sorted(p64)
  gn = jac.T @ jac
  if structure == "layerwise":
    gn = gn * (owner[:, None] == owner[None, :])
  masses = np.array([mass[modules[i]] if isinstance(mass, dict) else mass for i in owner], float)
  keep = np.ones(flat.size, bool) if selected is None else np.isin(
      np.array(modules)[owner], selected)
  step = np.zeros(flat.size)
  sub = np.ix_(keep, keep)
  step[keep] = np.linalg.solve(gn[sub] + np.diag(masses[keep]), grad[keep])
  return -lr * step


def gradient(w, x, t) -> np.ndarray:
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), w)
    g = jax.grad(lambda p: _ls_loss(jnp.asarray(t, jnp.float64))(
        _forward(p, jnp.asarray(x, jnp.float64))))(p64)
    return np.asarray(jax.flatten_util.ravel_pytree(g)[0])


def _canonical(frontend: str, params) -> dict:
  """Any frontend's parameters as the canonical ``{"a": ..., "b": ...}`` dict of numpy arrays."""
  if frontend == "linen":
    params = {"a": params["params"]["Dense_0"], "b": params["params"]["Dense_1"]}
  elif frontend == "nnx":
    params = nnx.to_pure_dict(params)
    params = {k: v for k, v in params.items() if k in ("a", "b")}
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _flat(tree) -> np.ndarray:
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


# --------------------------------------------------------------------------- running a step
_SHARED: dict[Any, Callable] = {}
IDENTITY = riemod.metrics.identity()
@dataclasses.dataclass
class Run:
  """What a run produced: the parameter change (canonical, flat), skipped steps, losses."""

  delta: np.ndarray | None = None
  skipped: int | None = None
  losses: list[float] = dataclasses.field(default_factory=list)


def _skipped(state) -> int | None:
  found = riemod.find_state(state, riemod.ValidStepState)
  return None if found is None else int(found.skipped_steps)


def run_steps(frontend: str, tx, *, mode: str = "eager", w=None, x=None, t=None, steps: int = 1,
              metric=None, vgc: dict | None = None, state=None, pass_value: bool = True,
              loss=None, model=None, params=None, data: Callable | None = None,
              share: Any = None) -> Run:
  """``steps`` riemod steps of the tiny problem on one frontend, eagerly or under ``jax.jit`` /
  ``nnx.jit``; returns the canonical parameter change of the last step. ``share``: a key under
  which the jitted step is kept, so cases differing only in their data compile once."""
  w = _weights() if w is None else w
  x0, t0 = _data()
  x = x0 if x is None else x
  t = t0 if t is None else t
  metric = riemod.metrics.identity() if metric is None else metric
  vgc = dict(vgc or {})
  make_loss = _ls_loss if loss is None else loss
  batches = data or (lambda i: (x, t))
  losses = []
  if frontend == "nnx":
    model = _NNXNet(w) if model is None else model
    before = _canonical("nnx", nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if state is not None:
      opt.opt_state = state

    def nnx_step(model, opt, x, t, key):
      value, grads, curv = riemod.value_grad_and_curvature(
          model, x, make_loss(t), metric, key=key, **vgc)
      opt.update(model, grads, curvature=curv, **(dict(value=value) if pass_value else {}))
      return value

    step = nnx.jit(nnx_step) if mode == "jit" else nnx_step
    for i in range(steps):
      if i == steps - 1:
        before = _canonical("nnx", nnx.state(model, nnx.Param))
      xb, tb = batches(i)
      losses.append(float(step(model, opt, jax.tree.map(jnp.asarray, xb), jnp.asarray(tb),
                               jax.random.key(100 + i))))
    after = _canonical("nnx", nnx.state(model, nnx.Param))
    return Run(_flat(after) - _flat(before), _skipped(opt.opt_state), losses)
  f = {"plain": _forward, "dense": _forward_dense}.get(frontend)
  if frontend == "linen":
    f = _LinenNet() if model is None else model
    params = _linen_variables(w, f) if params is None else params
    f = f.apply
  elif model is not None:
    f = model
  params = jax.tree.map(jnp.asarray, w) if params is None else params
  state = tx.init(params) if state is None else state

  def step(params, state, x, t, key):
    value, grads, curv = riemod.value_grad_and_curvature(
        f, x, make_loss(t), metric, params=params, key=key, **vgc)
    updates, state = tx.update(grads, state, params, curvature=curv,
                               **(dict(value=value) if pass_value else {}))
    return optax.apply_updates(params, updates), state, value

  if mode == "jit":
    step = _SHARED.setdefault(share, jax.jit(step)) if share is not None else jax.jit(step)
  p = params
  for i in range(steps):
    if i == steps - 1:
      params = p
    xb, tb = batches(i)
    p, state, value = step(p, state, jax.tree.map(jnp.asarray, xb), jnp.asarray(tb),
                           jax.random.key(100 + i))
    losses.append(float(value))
  delta = _flat(_canonical(frontend, p)) - _flat(_canonical(frontend, params))
  return Run(delta, _skipped(state), losses)


# --------------------------------------------------------------------------- expectations
@dataclasses.dataclass
class Expect:
  """What a case's definition says must happen.

  Attributes:
    kind: ``"reference"`` (valid: this update), ``"refuse"`` (invalid: refused naming one of
      ``names``), ``"either"`` (refused, or exactly the reference: a harmless input), ``"nonfinite"``
      (documented unchecked: a non-finite update) or ``"bounded"`` (a multi-step run whose loss
      stays below ``growth`` times the first, or is refused).
  """

  kind: str
  reference: np.ndarray | None = None
  names: tuple[str, ...] = ()
  tol: float = TOL
  growth: float = 3.0


def _accepted_exception(error: BaseException) -> bool:
  if isinstance(error, (ValueError, TypeError, FloatingPointError)):
    return True
  # Under jax.jit a refusal surfaces from its host callback wrapped by jax (documented).
  return (isinstance(error, jax.errors.JaxRuntimeError)
          and "StepRefusedError" in str(error))


def _names_it(error: BaseException, names: tuple[str, ...]) -> bool:
  text = str(error).lower()
  return any(name.lower() in text for name in names)


def classify(expect: Expect, run: Run | None, error: BaseException | None) -> str:
  """The outcome of one case (see the module docstring)."""
  if error is not None:
    if expect.kind in ("reference", "nonfinite"):
      return "wrongly refused" if _accepted_exception(error) else "unhelpful crash"
    if _accepted_exception(error) and (expect.kind == "bounded" or _names_it(error, expect.names)):
      return "answered"
    return "unhelpful crash"
  delta = run.delta
  finite = bool(np.all(np.isfinite(delta)))
  if expect.kind == "nonfinite":
    return "correct" if not finite else "silent wrong"
  if expect.kind == "bounded":
    losses = np.asarray(run.losses)
    if not np.all(np.isfinite(losses)) or not finite:
      return "unexpected NaN"
    if run.skipped:
      return "answered"
    return "correct" if losses.max() <= expect.growth * losses[0] else "silent wrong"
  if expect.kind == "refuse":
    if run.skipped and finite and np.all(delta == 0):
      return "answered"
    return "silent wrong" if finite else "unexpected NaN"
  # reference / either
  if not finite:
    return "unexpected NaN"
  ref = expect.reference
  scale = max(float(np.abs(ref).max()), 1e-30)
  if float(np.abs(delta - ref).max()) <= expect.tol * scale + 1e-7:
    return "correct"
  if expect.kind == "either" and run.skipped and np.all(delta == 0):
    return "answered"
  return "silent wrong"


# --------------------------------------------------------------------------- the catalogue
@dataclasses.dataclass
class Case:
  group: str
  axes: dict[str, str]
  run: Callable[[], Run]
  expect: Callable[[], Expect]


def _alias(structure: str):
  return riemod.natural_gradient if structure == "full" else riemod.layerwise_natural_gradient


_REFS: dict[tuple, np.ndarray] = {}


def _ref(structure="full", *, mass=1e-2, lr=LR, w=None, x=None, t=None, **kw) -> np.ndarray:
  if w is None and x is None and t is None:  # the shared problem: computed once per setting
    key = (structure, repr(mass), repr(lr), repr(sorted(kw.items())))
    if key not in _REFS:
      _REFS[key] = _ref(structure, mass=mass, lr=lr, w=_weights(), **kw)
    return _REFS[key]
  x0, t0 = _data()
  return reference_delta(_weights() if w is None else w, x0 if x is None else x,
                         t0 if t is None else t, lr=lr, mass=mass, structure=structure, **kw)


def _mass_values():
  """(label, value, valid): Python, NumPy and JAX scalars, wrong shapes, schedules."""
  return [
      ("py -1.0", -1.0, False), ("py 0.0", 0.0, False), ("py nan", NAN, False),
      ("py inf", INF, False), ("None", None, False), ("str '0.1'", "0.1", False),
      ("py True", True, False), ("py 1e-2", 1e-2, True),
      ("np.float32 -1", np.float32(-1), False), ("np.float64 0", np.float64(0), False),
      ("np.float32 nan", np.float32(NAN), False), ("np.float64 inf", np.float64(INF), False),
      ("np.ones(3)", np.ones(3), False), ("np.float32 0.1", np.float32(0.1), True),
      ("jnp -1", jnp.asarray(-1.0), False), ("jnp 0", jnp.asarray(0.0), False),
      ("jnp nan", jnp.asarray(NAN), False), ("jnp inf", jnp.asarray(INF), False),
      ("jnp.ones(2)", jnp.ones(2), False), ("jnp 0.1", jnp.asarray(0.1), True),
      ("schedule -> -10", lambda c: -10.0, False),
      ("schedule -> str", lambda c: "x", False),
      ("schedule 0.1 then -10", lambda c: jnp.where(c < 1, 0.1, -10.0), "later"),
      ("exponential_decay(0.1)", optax.exponential_decay(0.1, 1, 0.5), True),
  ]


def _mass_cases() -> list[Case]:
  cases = []
  for label, value, valid in _mass_values():
    for entry in ("natural_gradient(mass=)", "layerwise_natural_gradient(mass=)",
                  "Geometry(mass=)", "declarations"):
      structure = "layerwise" if entry.startswith("layerwise") or entry == "declarations" else "full"
      schedule = callable(value)
      # A declared (per-module) mass is a number or per-parameter arrays, never a schedule;
      # a plain bool is not a mass anywhere.
      ok = valid if not (entry == "declarations" and schedule) else False
      if value is None and entry != "Geometry(mass=)":
        ok = True  # mass=None / a declared None mean "the default mass" (documented)
      steps = 2 if ok == "later" else 1

      def run(value=value, entry=entry, structure=structure, steps=steps):
        if entry == "declarations":
          tx = riemod.layerwise_natural_gradient(LR)
          return run_steps("plain", tx, steps=steps,
                           vgc=dict(declarations={"a": dict(mass=value)}))
        if entry == "Geometry(mass=)":
          tx = riemod.natural_gradient(LR, geometry=riemod.Geometry(mass=value, structure="full"))
        else:
          tx = _alias(structure)(LR, mass=value)
        return run_steps("plain", tx, steps=steps)

      def expect(value=value, structure=structure, ok=ok, entry=entry):
        if ok is True:
          mass = 1e-2 if value is None else float(value(0)) if callable(value) else float(value)
          if entry == "declarations":
            return Expect("reference", _ref(structure, mass={"a": mass, "b": 1e-2}))
          return Expect("reference", _ref(structure, mass=mass))
        return Expect("refuse", names=("mass",))

      cases.append(Case("mass", dict(value=label, entry=entry), run, expect))
  return cases


_INJECTED: dict[tuple, Callable] = {}


def _injected_step(structure: str, policy: str):
  """One compiled step per (structure, policy): hyperparameters live in the optimizer state."""
  key = (structure, policy)
  if key not in _INJECTED:
    tx = optax.inject_hyperparams(_alias(structure), static_args=("on_nonfinite",))(
        learning_rate=LR, mass=0.1, on_nonfinite=policy)

    def step(params, state, x, t):
      value, grads, curv = riemod.value_grad_and_curvature(
          _forward, x, _ls_loss(t), riemod.metrics.identity(), params=params)
      updates, state = tx.update(grads, state, params, curvature=curv, value=value)
      return optax.apply_updates(params, updates), state

    _INJECTED[key] = (tx, jax.jit(step))
  return _INJECTED[key]


def _traced_cases() -> list[Case]:
  """Hyperparameters changed in an ``inject_hyperparams`` state, so traced under ``jax.jit``."""
  cases = []
  values = [("mass", -1.0), ("mass", 0.0), ("mass", NAN), ("mass", INF), ("mass", 0.1),
            ("learning_rate", -0.5), ("learning_rate", NAN), ("learning_rate", INF),
            ("learning_rate", 0.0)]
  for name, value in values:
    for policy in ("error", "skip", "ignore"):
      for structure in ("full", "layerwise"):
        invalid = not (math.isfinite(value) and (value > 0 or (name == "learning_rate"
                                                               and value == 0)))
        nonfinite_lr = name == "learning_rate" and not math.isfinite(value)
        if policy == "ignore" and invalid and not nonfinite_lr:
          continue  # "ignore" checks nothing: a finite wrong value is what was asked for

        def run(name=name, value=value, policy=policy, structure=structure):
          tx, step = _injected_step(structure, policy)
          params = jax.tree.map(jnp.asarray, _weights())
          state = tx.init(params)
          state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
          x, t = _data()
          new, state = step(params, state, x, t)
          new = jax.block_until_ready(new)
          return Run(_flat(_canonical("plain", new)) - _flat(_canonical("plain", params)),
                     _skipped(state))

        def expect(name=name, value=value, policy=policy, structure=structure, invalid=invalid,
                   nonfinite_lr=nonfinite_lr):
          if policy == "ignore" and nonfinite_lr:
            return Expect("nonfinite")
          if invalid:
            return Expect("refuse", names=("mass",) if name == "mass" else
                          ("learning_rate", "learning rate"))
          kw = {name: value, **({"mass": 0.1} if name == "learning_rate" else {"lr": LR})}
          kw["lr"] = kw.pop("learning_rate", kw.get("lr"))
          return Expect("reference", _ref(structure, **kw))

        cases.append(Case("traced", dict(hyper=name, value=repr(value), on_nonfinite=policy,
                                         structure=structure), run, expect))
  return cases


def _lr_cases() -> list[Case]:
  values = [
      ("py 0.0", 0.0, True), ("py -0.1", -0.1, False), ("py inf", INF, False),
      ("py nan", NAN, False), ("None", None, False), ("str '0.1'", "0.1", False),
      ("np.float32 -0.1", np.float32(-0.1), False), ("jnp nan", jnp.asarray(NAN), False),
      ("jnp inf", jnp.asarray(INF), False), ("schedule -> -0.1", lambda c: -0.1, False),
      ("schedule -> nan", lambda c: NAN, False),
      ("linear_schedule(0.5, 0.05)", optax.linear_schedule(0.5, 0.05, 3), True),
      ("schedule 0.5 then -0.5", lambda c: jnp.where(c < 1, 0.5, -0.5), "later"),
      ("constant_schedule(inf)", optax.constant_schedule(INF), False),
  ]
  cases = []
  for label, value, valid in values:
    for policy in ("error", "skip", "ignore"):
      if policy == "ignore" and valid == "later":
        continue  # a finite negative rate found at run time: "ignore" checks nothing
      if valid is True and policy != "error":
        continue  # valid rates under every policy: the on_nonfinite x max_error group
      steps = 2 if valid == "later" else 1

      def run(value=value, policy=policy, steps=steps):
        return run_steps("plain", riemod.natural_gradient(value, on_nonfinite=policy),
                         steps=steps)

      def expect(value=value, valid=valid, policy=policy):
        if policy == "ignore" and isinstance(value, jax.Array):
          return Expect("nonfinite")  # arrays are checked at run time; "ignore" checks nothing
        if valid is True:
          return Expect("reference", _ref("full", lr=float(value(0)) if callable(value)
                                           else float(value)))
        return Expect("refuse", names=("learning_rate", "learning rate"))

      cases.append(Case("learning rate", dict(value=label, on_nonfinite=policy), run, expect))
  return cases


def _policy_cases() -> list[Case]:
  cases = []
  for policy in ("error", "skip", "ignore", "raise", "Skip", None):
    for max_error in (None, 1e-2, INF, 0.0, -1.0, NAN, "1e-2"):
      valid = policy in ("error", "skip", "ignore") and (
          max_error is None or (isinstance(max_error, float) and max_error > 0))

      def run(policy=policy, max_error=max_error):
        return run_steps("plain", riemod.natural_gradient(LR, on_nonfinite=policy,
                                                          max_error=max_error))

      def expect(valid=valid, policy=policy):
        if valid:
          return Expect("reference", _ref("full"))
        return Expect("refuse", names=("max_error",) if policy in ("error", "skip", "ignore")
                      else ("on_nonfinite",))

      cases.append(Case("on_nonfinite x max_error", dict(on_nonfinite=repr(policy),
                                                         max_error=repr(max_error)), run, expect))
  return cases


def _bad_data():
  x, t = _data()
  out = {}
  for what, arr in (("x", x), ("targets", t)):
    for bad in (NAN, INF):
      a = arr.copy()
      a[2, 1] = bad
      out[f"{bad} in {what}"] = (a, t) if what == "x" else (x, a)
  a = x.copy()
  a[:, 0] = -INF
  out["-inf column in x"] = (a, t)
  return out


def _data_cases() -> list[Case]:
  cases = []
  for label, (x, t) in _bad_data().items():
    for policy in ("error", "skip", "ignore"):
      for mode in ("eager", "jit"):
        if mode == "eager" and policy != "error":
          continue  # eager differs from jit in how a refusal is raised (at once), not skipped

        def run(x=x, t=t, policy=policy, mode=mode):
          return run_steps("plain", _data_tx(policy), mode=mode, x=x, t=t, metric=IDENTITY,
                           share=("data", policy))

        def expect(policy=policy):
          if policy == "ignore":
            return Expect("nonfinite")
          return Expect("refuse", names=("nan/inf", "non-finite", "nan", "inf"))

        cases.append(Case("nan/inf data", dict(data=label, on_nonfinite=policy, mode=mode), run,
                          expect))
  return cases


_DATA_TX: dict[str, Any] = {}


def _data_tx(policy):
  # One transform per policy, so the jitted steps of the data cases share their compilation.
  if policy not in _DATA_TX:
    _DATA_TX[policy] = riemod.natural_gradient(LR, on_nonfinite=policy)
  return _DATA_TX[policy]


_SHARED_JIT: dict[tuple, Callable] = {}


def _dtype_cases() -> list[Case]:
  cases = []
  for dtype in ("bfloat16", "float16", "int32"):
    for frontend in ("plain", "linen", "nnx"):
      def run(dtype=dtype, frontend=frontend):
        d = jnp.dtype(dtype)
        w = jax.tree.map(lambda a: np.asarray(a).astype(d), _weights())
        tx = riemod.natural_gradient(LR)
        if frontend == "nnx":
          if d == jnp.int32:
            raise_model = _NNXNet(w, param_dtype=jnp.float32)
            state = nnx.state(raise_model, nnx.Param)
            nnx.update(raise_model, jax.tree.map(lambda a: a.astype(jnp.int32), state))
            return run_steps("nnx", tx, model=raise_model)
          return run_steps("nnx", tx, model=_NNXNet(w, param_dtype=d))
        if frontend == "linen":
          module = _LinenNet(param_dtype=d if d != jnp.int32 else jnp.float32)
          variables = _linen_variables(w, module, d)
          return run_steps("linen", tx, model=module, params=variables)
        return run_steps("plain", tx, params=jax.tree.map(jnp.asarray, w))

      cases.append(Case("dtypes", dict(params=dtype, frontend=frontend), run,
                        lambda dtype=dtype: Expect("refuse", names=(dtype,))))
  for dtype in ("int32", "bfloat16", "float16"):
    for frontend in ("plain", "linen", "nnx"):
      if frontend == "plain" and dtype != "int32":
        continue  # jnp promotes in the model itself; the layers' recorded inputs are the point
      def run(dtype=dtype, frontend=frontend):
        x, t = _data()
        xd = (np.round(3 * x) if dtype == "int32" else x).astype(jnp.dtype(dtype))
        return run_steps(frontend, riemod.natural_gradient(LR), x=xd)

      def expect(dtype=dtype):
        x, _ = _data()
        xd = np.round(3 * x) if dtype == "int32" else np.asarray(
            jnp.asarray(x, jnp.dtype(dtype)).astype(jnp.float32))
        return Expect("reference", _ref("full", x=xd.astype(np.float64)))

      cases.append(Case("dtypes", dict(inputs=dtype, frontend=frontend), run, expect))

  def run64():
    with jax.enable_x64(True):
      w = jax.tree.map(lambda a: np.asarray(a, np.float64), _weights())
      x, t = _data()
      return run_steps("plain", riemod.natural_gradient(LR), params=jax.tree.map(jnp.asarray, w),
                       x=x.astype(np.float64), t=t.astype(np.float64))

  cases.append(Case("dtypes", dict(params="float64 (jax_enable_x64)", frontend="plain"), run64,
                    lambda: Expect("reference", _ref("full"), tol=1e-6)))
  return cases


def _shape_cases() -> list[Case]:
  cases = []
  x, t = _data()
  shapes = {
      "batch 0": dict(x=x[:0], t=t[:0], out="array", names=("0 samples",)),
      "scalar output": dict(out="scalar", names=("scalar",)),
      "tuple output": dict(out="tuple", names=("tuple",)),
      "dict output": dict(out="dict", names=("dict",)),
      "outputs not per sample": dict(out="transposed", names=("leading", "output")),
      "loss not a scalar": dict(out="array", loss=lambda t: lambda y: jnp.sum((y - t) ** 2, -1),
                                names=("loss_fn",)),
      "x leaves of unequal length": dict(out="array", x=(x, x[:3]), names=("leading",)),
  }
  for label, spec in shapes.items():
    for frontend in ("plain", "linen", "nnx"):
      for mode in ("eager", "jit"):
        def run(spec=spec, frontend=frontend, mode=mode):
          out = spec["out"]
          xs = spec.get("x", x)
          first = (lambda v: v[0]) if isinstance(xs, tuple) else (lambda v: v)
          if frontend == "nnx":
            model = _NNXNet(_weights(), out=out)
            model.__call__  # noqa: B018
            net = model if not isinstance(xs, tuple) else _TupleInput(model)
            return run_steps("nnx", riemod.natural_gradient(LR), model=net, mode=mode, x=xs,
                             t=spec.get("t", t), loss=spec.get("loss"))
          if frontend == "linen":
            module = _LinenNet(out=out)
            variables = _linen_variables(_weights(), module)
            apply = module.apply if not isinstance(xs, tuple) else (
                lambda v, xx: module.apply(v, xx[0]))
            return run_steps("plain", riemod.natural_gradient(LR), model=apply, params=variables,
                             mode=mode, x=xs, t=spec.get("t", t), loss=spec.get("loss"),
                             w=_weights()) if isinstance(xs, tuple) else run_steps(
                "linen", riemod.natural_gradient(LR), model=module, params=variables, mode=mode,
                x=xs, t=spec.get("t", t), loss=spec.get("loss"))
          f = lambda p, v: _shape_output(_forward(p, first(v)), out)
          return run_steps("plain", riemod.natural_gradient(LR), model=f, mode=mode, x=xs,
                           t=spec.get("t", t), loss=spec.get("loss"))

        cases.append(Case("shapes", dict(case=label, frontend=frontend, mode=mode), run,
                          lambda spec=spec: Expect("refuse", names=spec["names"])))
  return cases


class _TupleInput(nnx.Module):
  def __init__(self, inner):
    self.inner = inner

  def __call__(self, xs):
    return self.inner(xs[0])


def _mismatch_cases() -> list[Case]:
  cases = []
  foreign = {"3-layer model": dict(layers=3), "1-layer model": dict(layers=1),
             "wider hidden layer": dict(hidden=7)}
  for label, spec in foreign.items():
    for structure in ("full", "layerwise"):
      for policy in ("constant", "adaptive"):
        for frontend in ("plain", "linen"):
          if frontend == "linen" and (policy == "adaptive" or structure == "full"):
            continue

          def make_tx(structure=structure, policy=policy):
            mass_policy = (riemod.masses.constant() if policy == "constant"
                           else riemod.masses.adaptive())
            return _alias(structure)(LR, geometry=riemod.Geometry(
                mass=1e-2, structure=structure, mass_policy=mass_policy))

          def run(spec=spec, frontend=frontend, make_tx=make_tx):
            tx = make_tx()
            other = jax.tree.map(jnp.asarray, _weights(seed=5, **spec))
            if frontend == "linen":
              other = {"params": {f"Dense_{i}": v for i, v in enumerate(other.values())}}
            return run_steps(frontend, tx, state=tx.init(other))

          def expect(structure=structure, policy=policy):
            if policy == "constant":
              # The constant policy's state holds nothing of the model: the new model's step
              # is harmless; a refusal is also fine.
              return Expect("either", _ref(structure), names=("state",))
            return Expect("refuse", names=("state",))

          cases.append(Case("state from another model", dict(state=label, structure=structure,
                                                              mass_policy=policy,
                                                              frontend=frontend), run, expect))
  return cases


def _model_cases() -> list[Case]:
  cases = []
  for mode in ("eager", "jit"):
    cases.append(Case("models", dict(case="nnx.Dropout active", mode=mode),
                      lambda mode=mode: run_steps("nnx", riemod.natural_gradient(LR), mode=mode,
                                                  model=_NNXNet(_weights(), dropout=0.5)),
                      lambda: Expect("refuse", names=("eval()",))))
    cases.append(Case("models", dict(case="linen.Dropout active (no rng)", mode=mode),
                      lambda mode=mode: run_steps(
                          "linen", riemod.natural_gradient(LR), mode=mode,
                          model=_LinenNet(dropout=0.5, deterministic=False)),
                      lambda: Expect("refuse", names=("deterministic", "dropout"))))
    cases.append(Case("models", dict(case="nnx.BatchNorm in training mode", mode=mode),
                      lambda mode=mode: run_steps("nnx", riemod.natural_gradient(LR), mode=mode,
                                                  model=_NNXNet(_weights(), batchnorm=True)),
                      lambda: Expect("refuse", names=("eval()", "batch")))),
    cases.append(Case("models", dict(case="linen.BatchNorm batch statistics", mode=mode),
                      lambda mode=mode: run_steps("linen", riemod.natural_gradient(LR), mode=mode,
                                                  model=_LinenNet(batchnorm=True)),
                      lambda: Expect("refuse", names=("batch",))))
    cases.append(Case("models", dict(case="Linen variables['params'] only", mode=mode),
                      lambda mode=mode: run_steps(
                          "linen", riemod.natural_gradient(LR), mode=mode,
                          params=_linen_variables(_weights(), _LinenNet())["params"]),
                      lambda: Expect("refuse", names=("variables",))))

  def nnx_eval():
    model = _NNXNet(_weights(), dropout=0.5)
    model.eval()
    return run_steps("nnx", riemod.natural_gradient(LR), model=model)

  cases.append(Case("models", dict(case="nnx.Dropout after model.eval()", mode="eager"), nnx_eval,
                    lambda: Expect("reference", _ref("full"))))
  cases.append(Case("models", dict(case="linen.Dropout deterministic", mode="eager"),
                    lambda: run_steps("linen", riemod.natural_gradient(LR),
                                      model=_LinenNet(dropout=0.5, deterministic=True)),
                    lambda: Expect("reference", _ref("full"))))

  def linen_module_itself():
    module = _LinenNet()
    variables = _linen_variables(_weights(), module)
    tx = riemod.natural_gradient(LR)
    x, t = _data()
    _, g, c = riemod.value_grad_and_curvature(module, x, _ls_loss(t), riemod.metrics.identity(),
                                              params=variables)
    u, _ = tx.update(g, tx.init(variables), variables, curvature=c)
    return Run(_flat(_canonical("linen", u)))

  cases.append(Case("models", dict(case="Linen module passed (not .apply)", mode="eager"),
                    linen_module_itself, lambda: Expect("reference", _ref("full"))))

  def nnx_with_params():
    model = _NNXNet(_weights())
    x, t = _data()
    riemod.value_grad_and_curvature(model, x, _ls_loss(t), params=nnx.state(model, nnx.Param))

  def plain_without_params():
    x, t = _data()
    riemod.value_grad_and_curvature(_forward, x, _ls_loss(t))

  def not_a_model():
    x, t = _data()
    riemod.value_grad_and_curvature({"a": 1}, x, _ls_loss(t), params=_weights())

  for label, fn, names in (("NNX model with params=", nnx_with_params, ("params=",)),
                           ("plain function without params=", plain_without_params,
                            ("params=",)),
                           ("model is a dict", not_a_model, ("model",))):
    cases.append(Case("models", dict(case=label, mode="eager"), fn,
                      lambda names=names: Expect("refuse", names=names)))
  return cases


def _api_cases() -> list[Case]:
  cases = []
  x, t = _data()
  params = jax.tree.map(jnp.asarray, _weights())

  def measured(f=_forward, p=params, metric=None, **kw):
    return riemod.value_grad_and_curvature(f, x, _ls_loss(t),
                                           riemod.metrics.identity() if metric is None else metric,
                                           params=p, **kw)

  for structure in ("full", "layerwise"):
    def positional(structure=structure):
      tx = _alias(structure)(LR)
      _, g, c = measured()
      tx.update(g, tx.init(params), params, c)

    def missing(structure=structure):
      tx = _alias(structure)(LR)
      _, g, _ = measured()
      tx.update(g, tx.init(params), params)

    def a_dict(structure=structure):
      tx = _alias(structure)(LR)
      _, g, _ = measured()
      tx.update(g, tx.init(params), params, curvature={"rows": jnp.ones(3)})

    def other_curvature(structure=structure, **shape):
      # The curvature of another model (shape: _weights' layers= or hidden=) with this one's state.
      tx = _alias(structure)(LR)
      _, g, _ = measured()
      _, _, c = measured(p=jax.tree.map(jnp.asarray, _weights(seed=5, **shape)))
      u, _ = tx.update(g, tx.init(params), params, curvature=c)
      return Run(_flat(u))

    other_model = functools.partial(other_curvature, layers=3)
    other_width = functools.partial(other_curvature, hidden=7)

    for label, fn, names in (("positional curvature", positional, ("curvature",)),
                             ("no curvature", missing, ("curvature",)),
                             ("curvature a dict", a_dict, ("curvature",)),
                             ("curvature of a 3-layer model", other_model, ("curvature",)),
                             ("curvature of a wider model", other_width, ("curvature",))):
      cases.append(Case("api", dict(case=label, structure=structure), fn,
                        lambda names=names: Expect("refuse", names=names)))

  def value_vector():
    tx = riemod.natural_gradient(LR)
    _, g, c = measured()
    tx.update(g, tx.init(params), params, curvature=c, value=jnp.ones(3))

  def value_string():
    tx = riemod.natural_gradient(LR)
    _, g, c = measured()
    tx.update(g, tx.init(params), params, curvature=c, value="high")

  def metric_array():
    measured(metric=jnp.eye(2))

  def metric_uncalled():
    measured(metric=riemod.metrics.identity)

  def metric_bad_rows():
    measured(metric=riemod.metrics.custom(lambda y: jnp.ones((2, 3))))

  def sampled_no_key():
    measured(metric=riemod.metrics.sampled_softmax_fisher())

  def loss_not_callable():
    riemod.value_grad_and_curvature(_forward, x, 0.5, params=params)

  def declarations_typo():
    measured(declarations={"c": dict(mass=0.1)})

  def declaration_kind():
    measured(declarations={"a": dict(kind="euclidian")})

  api = [("value= a vector", value_vector, ("value",)),
         ("value= a string", value_string, ("value",)),
         ("output_metric an array", metric_array, ("output_metric",)),
         ("output_metric uncalled (metrics.identity)", metric_uncalled, ("output_metric",)),
         ("custom metric rows of the wrong shape", metric_bad_rows, ("output metric",)),
         ("sampled metric without key=", sampled_no_key, ("key=",)),
         ("loss_fn not callable", loss_not_callable, ("loss_fn",)),
         ("declarations name an unknown module", declarations_typo, ("declarations",)),
         ("declaration kind misspelled", declaration_kind, ("kind",))]
  for cb in (0, 7, 2.5):
    api.append((f"curvature_batch={cb}", lambda cb=cb: measured(curvature_batch=cb),
                ("curvature_batch",)))
  for label, fn, names in api:
    cases.append(Case("api", dict(case=label, structure="-"), fn,
                      lambda names=names: Expect("refuse", names=names)))
  return cases


def _wrapper_cases() -> list[Case]:
  cases = []
  mask = {"a": {"kernel": True, "bias": True}, "b": {"kernel": False, "bias": False}}
  labels = {"a": "ng", "b": "sgd"}
  for structure in ("full", "layerwise"):
    wrappers = {
        "optax.masked (layer a)": (lambda s=structure: optax.masked(_alias(s)(LR), mask),
                                   "masked"),
        "optax.multi_transform (a: riemod, b: sgd)": (
            lambda s=structure: optax.multi_transform(
                {"ng": _alias(s)(LR), "sgd": optax.sgd(0.1)},
                {"a": {"kernel": "ng", "bias": "ng"}, "b": {"kernel": "sgd", "bias": "sgd"}}),
            "multi"),
        "chain(clip_by_global_norm(1e3), riemod)": (
            lambda s=structure: optax.chain(optax.clip_by_global_norm(1e3), _alias(s)(LR)),
            "plain"),
        "inject_hyperparams": (lambda s=structure: optax.inject_hyperparams(_alias(s))(
            learning_rate=LR, mass=1e-2), "plain"),
    }
    for label, (make, kind) in wrappers.items():
      for mode in ("eager", "jit"):
        # the wrappers' own logic runs at trace time: jit only; structure only where the
        # wrapper restricts the curvature (masked, multi_transform)
        if mode == "eager" or (kind == "plain" and structure == "layerwise"):
          continue

        def run(make=make, mode=mode):
          return run_steps("plain", make(), mode=mode)

        def expect(structure=structure, kind=kind):
          if kind == "plain":
            return Expect("reference", _ref(structure))
          sel = _ref(structure, selected=("a",))
          x, t = _data()
          g = gradient(_weights(), x, t)
          owner_b = np.arange(g.size) >= _weights()["a"]["kernel"].size + HID
          # ravel order: a/bias, a/kernel, b/bias, b/kernel
          rest = g if kind == "masked" else -0.1 * g
          return Expect("reference", np.where(owner_b, rest, sel))

        cases.append(Case("wrappers", dict(wrapper=label, structure=structure, mode=mode), run,
                          expect))
  del labels
  return cases


def _string_cases() -> list[Case]:
  bad = [
      ("structure", "Layerwise", lambda: riemod.Geometry(structure="Layerwise")),
      ("structure", "blockwise", lambda: riemod.Geometry(structure="blockwise")),
      ("space", "samples", lambda: riemod.Geometry(space="samples")),
      ("space", "params", lambda: riemod.Geometry(space="params")),
      ("mass_policy", "'adaptive' (a string)", lambda: riemod.Geometry(mass_policy="adaptive")),
      ("mass_policy", "masses.adaptive (uncalled)",
       lambda: riemod.Geometry(mass_policy=riemod.masses.adaptive)),
      ("mass_policy", "None", lambda: riemod.Geometry(mass_policy=None)),
      ("refinement_steps", "-1", lambda: riemod.Geometry(refinement_steps=-1)),
      ("refinement_steps", "1.5", lambda: riemod.Geometry(refinement_steps=1.5)),
      ("cutoff", "2.0", lambda: riemod.Geometry(cutoff=2.0)),
      ("rank", "rank without nystrom", lambda: riemod.Geometry(rank=4)),
      ("momentum", "1.0", lambda: riemod.natural_gradient(LR, momentum=1.0)),
      ("momentum", "-0.5", lambda: riemod.natural_gradient(LR, momentum=-0.5)),
      ("geometry", "a dict", lambda: riemod.natural_gradient(LR, geometry={"mass": 0.1})),
      ("geometry", "structure full to layerwise alias",
       lambda: riemod.layerwise_natural_gradient(LR, geometry=riemod.Geometry(structure="full"))),
      ("mass", "mass= and geometry= both",
       lambda: riemod.natural_gradient(LR, mass=0.1,
                                       geometry=riemod.Geometry(structure="full"))),
      ("max_loss_growth", "0.5", lambda: riemod.natural_gradient(LR, max_loss_growth=0.5)),
      ("decay", "adaptive(decay=1.5)", lambda: riemod.masses.adaptive(1.5)),
  ]
  return [Case("strings and options", dict(argument=name, value=label),
               lambda make=make: make(), lambda name=name: Expect("refuse", names=(name,)))
          for name, label, make in bad]


def _grad_cases() -> list[Case]:
  """``jax.grad`` of the loss after one step w.r.t. the mass and the parameters."""
  cases = []
  for structure in ("full", "layerwise"):
    for mode in ("jit",):  # eager reverse mode costs ~40 s a case on the 2-core machine

      def run(structure=structure, mode=mode):
        x, t = _data()
        params = jax.tree.map(jnp.asarray, _weights())

        def after(mass, p):
          tx = _alias(structure)(LR, mass=mass)
          _, g, c = riemod.value_grad_and_curvature(_forward, x, _ls_loss(t),
                                                    riemod.metrics.identity(), params=p)
          u, _ = tx.update(g, tx.init(p), p, curvature=c)
          return _ls_loss(t)(_forward(optax.apply_updates(p, u), x))

        grad = jax.grad(after, argnums=(0, 1))
        if mode == "jit":
          grad = jax.jit(grad)
        d_mass, d_params = grad(jnp.asarray(0.1), params)
        return Run(np.concatenate([[float(d_mass)], _flat(d_params)]))

      def expect(structure=structure):
        x, t = _data()
        w = _weights()
        with jax.enable_x64(True):
          p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), w)
          x64, t64 = jnp.asarray(x, jnp.float64), jnp.asarray(t, jnp.float64)
          flat0, unravel = jax.flatten_util.ravel_pytree(p64)
          split = w["a"]["kernel"].size + w["a"]["bias"].size

          def after(mass, flat):
            out = lambda v: _forward(unravel(v), x64)
            jac = jax.jacrev(out)(flat).reshape(-1, flat.size) / np.sqrt(BATCH)
            gn = jac.T @ jac
            if structure == "layerwise":
              block = jnp.zeros_like(gn).at[:split, :split].set(1).at[split:, split:].set(1)
              gn = gn * block
            g = jax.grad(lambda v: _ls_loss(t64)(out(v)))(flat)
            step = jnp.linalg.solve(gn + mass * jnp.eye(flat.size), g)
            return _ls_loss(t64)(out(flat - LR * step))

          d_mass, d_flat = jax.grad(after, argnums=(0, 1))(jnp.asarray(0.1, jnp.float64), flat0)
          ref = np.concatenate([[float(d_mass)], np.asarray(d_flat)])
        return Expect("reference", ref, tol=1e-2)

      cases.append(Case("jax.grad through a step", dict(structure=structure, mode=mode), run,
                        expect))
  return cases


def _classifier_problem():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((64, 8)).astype(np.float32)
  y = np.argmax(x @ rng.standard_normal((8, 5)), -1)
  w = {"a": {"kernel": (rng.standard_normal((8, 16)) / np.sqrt(8)).astype(np.float32),
             "bias": np.zeros(16, np.float32)},
       "b": {"kernel": (rng.standard_normal((16, 5)) / 4).astype(np.float32),
             "bias": np.zeros(5, np.float32)}}
  return x, y, w


def _lowrank_cases() -> list[Case]:
  """The default mass with low-rank metrics: the loss must not grow 3x silently in 20 steps."""
  cases = []
  metrics = {
      "sampled_softmax_fisher()": (lambda: riemod.metrics.sampled_softmax_fisher(), {}),
      "softmax_fisher, curvature_batch=2": (lambda: riemod.metrics.softmax_fisher(),
                                            dict(curvature_batch=2)),
  }
  for label, (metric, vgc) in metrics.items():
    for structure in ("full", "layerwise"):
      if structure == "layerwise" and label != "sampled_softmax_fisher()":
        continue
      for pass_value in (True, False):
        def run(metric=metric, vgc=vgc, structure=structure, pass_value=pass_value):
          x, y, w = _classifier_problem()
          rng = np.random.default_rng(3)
          batches = [rng.choice(64, 16, replace=False) for _ in range(20)]
          loss = lambda labels: lambda z: optax.softmax_cross_entropy_with_integer_labels(
              z, labels).mean()
          return run_steps("plain", _alias(structure)(0.3), mode="jit", w=w, steps=20,
                           metric=metric(), vgc=vgc, loss=loss, pass_value=pass_value,
                           data=lambda i: (x[batches[i]], y[batches[i]]))

        cases.append(Case("low-rank metric at the default mass",
                          dict(metric=label, structure=structure,
                               value="passed" if pass_value else "not passed"),
                          run, lambda: Expect("bounded")))
  return cases


def _control_cases() -> list[Case]:
  cases = []
  for frontend in ("plain", "dense", "nnx", "linen"):
    for structure in ("full", "layerwise"):
      for mode in ("eager", "jit"):
        if mode == "eager" and frontend != "plain":
          continue  # eager steps are the same computation; the plain function stands for them
        cases.append(Case("valid controls", dict(frontend=frontend, structure=structure,
                                                 mode=mode),
                          lambda f=frontend, s=structure, m=mode: run_steps(
                              f, _alias(s)(LR), mode=m),
                          lambda s=structure: Expect("reference", _ref(s))))
  return cases


GROUPS = {
    "mass": _mass_cases, "traced": _traced_cases, "lr": _lr_cases, "policy": _policy_cases,
    "data": _data_cases, "dtypes": _dtype_cases, "shapes": _shape_cases,
    "mismatch": _mismatch_cases, "models": _model_cases, "api": _api_cases,
    "wrappers": _wrapper_cases, "strings": _string_cases, "grad": _grad_cases,
    "lowrank": _lowrank_cases, "controls": _control_cases,
}


def catalogue(groups=None) -> list[Case]:
  return [c for name, make in GROUPS.items() if groups is None or name in groups for c in make()]


# --------------------------------------------------------------------------- running it
def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  # jax's wrapped host-callback errors put the useful line after a header.
  match = re.search(r"(StepRefusedError: .*)", text)
  line = match.group(1) if match else (text.splitlines()[0] if text else "")
  return line[:400]


def run_case(case: Case) -> dict[str, Any]:
  start = time.perf_counter()
  run, error = None, None
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      result = case.run()
      run = result if isinstance(result, Run) else None
      if run is None:
        error = None
        run = Run(delta=np.zeros(1))  # a call that returned nothing and raised nothing
        run.skipped = None
        result_kind = "returned"
      else:
        result_kind = "ran"
    except Exception as e:  # noqa: BLE001 - every exception is an outcome to classify
      error, result_kind = e, "raised"
  expect = case.expect()
  if result_kind == "returned" and expect.kind == "refuse":
    outcome = "silent wrong"  # accepted without complaint
  else:
    outcome = classify(expect, run, error)
  return dict(group=case.group, axes=case.axes, expected=expect.kind,
              names=list(expect.names), outcome=outcome,
              exception=None if error is None else type(error).__name__,
              message=None if error is None else _first_line(error),
              skipped=None if run is None else run.skipped,
              max_abs_error=(None if run is None or expect.reference is None
                             or run.delta is None or run.delta.shape != expect.reference.shape
                             else float(np.max(np.abs(run.delta - expect.reference)))),
              seconds=round(time.perf_counter() - start, 3))


# Why a case still fails, where the reason is known (explanation only: it changes no outcome).
OPEN: dict[tuple[str, str], str] = {}


def _why(row: dict[str, Any]) -> str:
  for (group, value), why in OPEN.items():
    if row["group"] == group and value in row["axes"].values():
      return why
  return ""


def write_markdown(path: Path, payload: dict[str, Any]) -> None:
  rows = payload["cases"]
  groups = list(dict.fromkeys(r["group"] for r in rows))
  lines = ["# Adversarial run (issue 12: every bad input answered)", "",
           f"`python -m benchmarks.adversarial` on {payload['machine'].get('cpu_model', '?')} "
           f"({payload['machine'].get('affinity_cores', '?')} cores), load {payload['load_before']} -> "
           f"{payload['load_after']}, {payload['seconds']:.0f} s, riemod "
           f"{payload['machine'].get('git', '?')}.", "",
           f"**{len(rows)} cases**: " + ", ".join(
               f"{payload['counts'][o]} {o}" for o in OUTCOMES), "",
           "Expected verdicts and references come from each case's definition (dense float64 "
           "solve, documented behaviour, or a refusal naming the argument); see the module "
           "docstring of `benchmarks/adversarial.py`.", "",
           harness.markdown_table(["group", "cases"] + list(OUTCOMES),
                                  [[g, sum(r["group"] == g for r in rows)]
                                   + [sum(r["group"] == g and r["outcome"] == o for r in rows)
                                      for o in OUTCOMES] for g in groups]), ""]
  bad = [r for r in rows if r["outcome"] in FAILURES]
  lines.append(f"## Cases not correct or answered ({len(bad)})")
  lines.append("")
  if bad:
    lines.append(harness.markdown_table(
        ["group", "axes", "expected", "outcome", "exception: message", "why (where known)"],
        [[r["group"], "; ".join(f"{k}={v}" for k, v in r["axes"].items()), r["expected"],
          r["outcome"], (f"{r['exception']}: {r['message']}" if r["exception"] else
                         f"max abs error {r['max_abs_error']}").replace("|", "/")[:300],
          _why(r)] for r in bad]))
  else:
    lines.append("None.")
  path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--groups", nargs="*", choices=sorted(GROUPS), default=None,
                      help="case groups to run (default: all)")
  parser.add_argument("--out", type=Path, default=RESULTS,
                      help="folder for adversarial.json/.md (default: benchmarks/results)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  from tqdm import tqdm

  cases = catalogue(args.groups)
  load_before = [round(v, 1) for v in os.getloadavg()]
  start = time.perf_counter()
  rows = []
  bar = tqdm(cases, disable=args.quiet, desc="adversarial")
  for case in bar:
    rows.append(run_case(case))
    bar.set_postfix_str(f"{case.group}: {rows[-1]['outcome']}")
  counts = Counter(r["outcome"] for r in rows)
  payload = dict(machine=harness.machine_info(), load_before=load_before,
                 load_after=[round(v, 1) for v in os.getloadavg()],
                 seconds=time.perf_counter() - start, groups=args.groups or sorted(GROUPS),
                 counts={o: counts.get(o, 0) for o in OUTCOMES}, cases=rows)
  name = "adversarial" if args.groups is None else "adversarial_partial"
  args.out.mkdir(parents=True, exist_ok=True)
  harness.write_json(args.out / f"{name}.json", payload)
  write_markdown(args.out / f"{name}.md", payload)
  print(", ".join(f"{payload['counts'][o]} {o}" for o in OUTCOMES),
        f"({len(rows)} cases, {payload['seconds']:.0f} s)")
  return payload


if __name__ == "__main__":
  main()

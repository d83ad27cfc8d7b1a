"""riemod on several devices: ``jax.shard_map`` with ``axis_name=``, and ``jax.jit`` on a sharded batch.

The computations run once, in a subprocess with 4 forced host devices
(``--xla_force_host_platform_device_count=4`` must be set before JAX starts, and the pytest process
has started it already); the subprocess prints one JSON record of measured differences and error
messages, and the tests below judge them. The reference is always the same step on one device on
the whole batch, and the sharded parameters and optimizer state (with the step report) are read
back from every device, not from one. With the layerwise structure the blocks are factored on
different devices: a five-block network checks the step and, in the compiled program, that no
factorisation runs on every device and each runs in its owner's branch only; with the one-block
structure every device assembles only its d / devices rows of the kernel. The Kronecker mass's
statistics come from each device's own samples joined by one all-reduce, and each module's factor
refresh runs on one device (both read off the compiled program). The float64 steps
of every frontend and structure and the refusals run by default; float32, the
per-device curvature_batch, per-device models and jax.jit on a sharded float32 batch are marked
slow (a second subprocess, ``make test-slow``).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

DEVICES = 4
FRONTENDS = ("nnx", "linen", "function")
STRUCTURES = ("layerwise", "full")
STEPS = 3
# float64 at 1e-10 relative: the sharded step reorders sums only (gathers, means of equal shards).
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
# A float32 step's round-off is about eps * cond(G): a reordered sum moves it by that much on one
# device too (measured: 1e-3 relative after 3 steps at mass 1e-3, 2e-6 after one at mass 0.1).
# At mass 1 cond(G) is small, so the float32 comparison measures the sharding, not float32.
MASS = {"float64": 1e-3, "float32": 1.0}
# Every frontend and structure in float64; in float32 one structure per frontend (each XLA program
# costs ~2 s of compilation on a 2-core CPU).
FLOAT32 = (("nnx", "full"), ("linen", "layerwise"), ("function", "full"))
# Each subprocess compiles 12-14 small programs: XLA's cheapest optimisation level about halves
# the compile time (2 s instead of 4 s of CPU per program); both sides of every comparison are
# compiled with the same flags.
XLA_FLAGS = (f"--xla_force_host_platform_device_count={DEVICES} "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


# Mass policies with state, in float64 (slow): (frontend, structure, policy). The adaptive mass
# is mass * sqrt(v), v the gradient's second moment: at mass 1e-3 three steps differed (measured)
# by 1.3e-10 relative (round-off of the averaged gradient, amplified by cond(G)); at mass 1 the
# comparison measures the sharding.
MASS_POLICIES = (("nnx", "layerwise", "kronecker"), ("linen", "full", "adaptive"),
                 ("linen", "full", "kronecker"), ("function", "layerwise", "kronecker2"))
POLICY_MASS = 1.0
# The Kronecker mass in the default part: statistics from each device's samples joined by one
# all-reduce, refreshes spread over the devices; refactored every second step, so the three steps
# take the refresh (spread, under the refresh's conditional), keep the factors, and refresh again.
KRONECKER = ("nnx", "layerwise", "kronecker2")
# NNX's two dense layers: (1 + fan_in, fan_out) of the Kronecker factors, 16 samples of 3 rows.
KRONECKER_FACTORS = ((5, 6), (7, 3))
# The Kronecker policy on a batch where one sample (on the second device) has inputs of 1e200.
HUGE = "kronecker2/huge"
# Five dense layers (fan_in, fan_out): five layerwise blocks of unequal cost on four devices.
DEEP = ((4, 6), (6, 5), (5, 7), (7, 3), (3, 3))
# At mass 1e-3 this network's blocks reach cond(G) ~ 2e5 and three steps move the parameters by
# 2.7e-10 relative between one device and the replicated shard_map step alike (the reordered sums
# of the gathered rows; spread and replicated agree bit for bit): at 0.1 (cond <= 21) the
# comparison measures the sharding.
DEEP_MASS = 0.1


def _deep_assignment() -> tuple[int, ...]:
  """The device of each of DEEP's blocks: 16 samples x 3 outputs = 48 rows, more than any
  block's parameters, so every block is solved in parameter space."""
  from riemod.curvature import _mesh
  costs = [_mesh.factorisation_flops(i * o + o, 16 * 3, "parameter") for i, o in DEEP]
  return _mesh.assign(costs, DEVICES)


def factorisations(hlo: str, devices: int) -> dict:
  """Where a compiled program factors: LAPACK Cholesky calls (``potrf``) that every device runs
  (``"every_device"``), and those in each branch of a ``devices``-way conditional (the switch on
  the device's index, ``"per_branch"``). Calls under other conditionals (the jitter retries,
  which run only when a plain factorisation fails) are not counted."""
  return _placed(hlo, devices, lambda line: "potrf" in line and "custom-call" in line)


def kernel_dots(hlo: str, rows: int, devices: int) -> dict:
  """The dot products of a compiled program whose result is ``rows x rows`` (``"whole"``: a
  kernel assembled in full) or ``rows / devices x rows`` (``"slab"``: one device's share of it),
  counted where every device runs them (outside conditionals, as :func:`factorisations`)."""
  import re

  def shaped(shape):
    pattern = re.compile(r"= f(?:32|64)\[" + ",".join(map(str, shape)) + r"\]\S* dot\(")
    return lambda line: pattern.search(line) is not None

  return {"whole": _placed(hlo, devices, shaped((rows, rows)))["every_device"],
          "slab": _placed(hlo, devices, shaped((rows // devices, rows)))["every_device"]}


def kronecker_refreshes(hlo: str, devices: int) -> dict:
  """Cholesky factorisations of the Kronecker factors' sizes (:data:`KRONECKER_FACTORS`; no
  layerwise block of the NNX net has those sizes), placed as by :func:`factorisations` but also
  counted inside other conditionals (the refresh runs under ``lax.cond(refresh, ...)``)."""
  sizes = {n for pair in KRONECKER_FACTORS for n in pair}
  def matches(line):
    return "potrf" in line and "custom-call" in line and any(
        f"= (f64[{n},{n}]" in line for n in sizes)
  found = _placed(hlo, devices, matches, descend=True)
  found["per_branch"] = [b for b in found["per_branch"] if any(b)]
  # What the all-reduces under two-way conditionals (the refresh's) carry.
  import re
  reduce = lambda line: " all-reduce(" in line
  lines = set(_placed(hlo, devices, reduce, descend=True, lines=True)["every_device"]) - set(
      _placed(hlo, devices, reduce, lines=True)["every_device"])
  found["shared"] = sorted({shape for line in lines for shape in re.findall(
      r"f64\[([0-9,]*)\]", line.split("all-reduce(")[0])})
  return found


def statistics(hlo: str, devices: int) -> dict:
  """The Kronecker statistics' dot products (named by their einsums in the HLO metadata) with the
  number of terms each sums (the product of its contracting dimensions: samples x positions for
  ``A``, rows x samples x positions for ``S``), and the shapes of the all-reduces every device runs
  outside conditionals."""
  import math
  import re
  shapes = {m.group(1): [int(n) for n in m.group(2).split(",") if n]
            for m in re.finditer(r"%([\w.\-]+) = \w+\[([0-9,]*)\]", hlo)}
  terms = {"inputs": [], "outputs": []}
  for line in hlo.splitlines():
    einsum = re.search(r'op_name="[^"]*/(bpi,bpj->ij|rbpf,rbpg->fg)/dot_general', line)
    if einsum is None or " dot(" not in line:
      continue
    lhs = re.search(r" dot\(%([\w.\-]+)", line).group(1)
    dims = [int(n) for n in re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line).group(1)
            .split(",")]
    key = "inputs" if einsum.group(1).startswith("bpi") else "outputs"
    terms[key].append(math.prod(shapes[lhs][i] for i in dims))
  reduced = [re.findall(r"f64\[([0-9,]*)\]", line.split("all-reduce(")[0])
             for line in _placed(hlo, devices, lambda line: " all-reduce(" in line,
                                 lines=True)["every_device"]]
  return {"terms": {k: sorted(v) for k, v in terms.items()},
          "all_reduced": sorted(shape for found in reduced for shape in found)}


def _placed(hlo: str, devices: int, matches, descend: bool = False, lines: bool = False
            ) -> dict:
  """Instructions ``matches(line)`` selects: ``{"every_device": reachable from the entry without
  entering a conditional, "per_branch": per branch of each devices-way conditional}``.
  ``descend``: other conditionals' branches count as reachable too (all their branches);
  ``lines``: the matching lines instead of their counts."""
  import re
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
    if header and not line.startswith(" "):
      name = header.group(1)
      bodies[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif name is not None and line.startswith("  "):
      bodies[name].append(line)

  def count(comp) -> tuple[list, list]:
    """(matching lines reachable from comp without entering a conditional, the devices-way
    conditionals' branches met on the way)."""
    plain, switches = [], []
    for line in bodies[comp]:
      if matches(line):
        plain.append(line)
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      if branches:
        names = [b.strip().lstrip("%") for b in branches.group(1).split(",")]
        if len(names) == devices:  # devices > 2: the jitter retries are two-way
          switches.append(names)
        elif descend:
          for callee in names:
            sub_plain, sub_switches = count(callee)
            plain += sub_plain
            switches += sub_switches
        continue
      for callee in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line):
        sub_plain, sub_switches = count(callee)
        plain += sub_plain
        switches += sub_switches
    return plain, switches

  size = (lambda found: found) if lines else len
  every, switches = count(entry)
  per_branch = [[size(count(b)[0]) for b in names] for names in switches]
  return {"every_device": size(every), "per_branch": per_branch}


def _worker(part: str) -> dict:  # noqa: C901 (one linear script of independent checks)
  """The measurements of ``part``: ``"default"`` (float64 steps, refusals), ``"policies"``
  (mass policies with state) or ``"slow"`` (the rest)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import linen, nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import riemod

  jax.config.update("jax_enable_x64", True)
  assert jax.device_count() == DEVICES, jax.devices()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  batch, fan_in, hidden, classes = 16, 4, 6, 3
  rng = np.random.RandomState(0)
  data = {"x": rng.randn(batch, fan_in), "t": rng.randn(batch, classes),
          "labels": rng.randint(0, classes, batch)}
  out: dict = {}

  def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

  def tree_rel(a, b) -> float:
    return max(rel(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  class Linen(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.Dense(classes)(jnp.tanh(linen.Dense(hidden)(x)))

  class NNX(nnx.Module):
    def __init__(self, dtype):
      rngs = nnx.Rngs(0)
      self.a = nnx.Linear(fan_in, hidden, rngs=rngs, param_dtype=dtype)
      self.b = nnx.Linear(hidden, classes, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
      return self.b(jnp.tanh(self.a(x)))

  def plain(p, x):
    # One layer recognised by its structure (DenseFactor), one on the generic path (RowsFactor).
    return jnp.tanh(riemod.nn.dense(p["a"], x)) @ p["b"]["w"] + p["b"]["c"]

  def deep(p, x):
    for i in range(len(DEEP)):
      x = riemod.nn.dense(p[f"l{i}"], x)
      x = jnp.tanh(x) if i < len(DEEP) - 1 else x
    return x

  def problem(frontend, dtype):
    """``(params, batch dict, apply(params, x) -> (model, params=), loss(y, d), metric)``."""
    d = {"x": jnp.asarray(data["x"], dtype), "t": jnp.asarray(data["t"], dtype),
         "labels": jnp.asarray(data["labels"])}
    squares = lambda y, d: 0.5 * jnp.mean(jnp.sum((y - d["t"]) ** 2, -1))
    if frontend == "nnx":
      graphdef, params = nnx.split(NNX(dtype))
      entropy = lambda y, d: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          y, d["labels"]))
      return params, d, lambda p: (nnx.merge(graphdef, p), {}), entropy, \
          riemod.metrics.softmax_fisher()
    if frontend == "linen":
      model = Linen()
      params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(0), d["x"]))
      # The default output metric: from_loss(), the loss's own Gauss-Newton factor.
      return params, d, lambda p: (model, {"params": p}), squares, None
    if frontend == "deep":
      params = {f"l{i}": {"kernel": jax.random.normal(jax.random.key(i), shape, dtype) / 2,
                          "bias": jnp.zeros(shape[1], dtype)}
                for i, shape in enumerate(DEEP)}
      return params, d, lambda p: (deep, {"params": p}), squares, riemod.metrics.identity()
    keys = jax.random.split(jax.random.key(1), 2)
    params = {"a": {"kernel": jax.random.normal(keys[0], (fan_in, hidden), dtype) / 2,
                    "bias": jnp.zeros(hidden, dtype)},
              "b": {"w": jax.random.normal(keys[1], (hidden, classes), dtype) / 2,
                    "c": jnp.zeros(classes, dtype)}}
    return params, d, lambda p: (plain, {"params": p}), squares, riemod.metrics.identity()

  def optimizer(structure, mass, policy):
    make = riemod.natural_gradient if structure == "full" else riemod.layerwise_natural_gradient
    skip = policy == HUGE  # its steps are not finite: skipped, not refused
    policy = {None: riemod.masses.constant, "kronecker": riemod.masses.kronecker,
              "kronecker2": lambda: riemod.masses.kronecker(update_every=2),
              HUGE: lambda: riemod.masses.kronecker(update_every=2),
              "adaptive": riemod.masses.adaptive}[policy]()
    # The trajectories are compared, not judged: some grow the loss (1.18 -> 8.65 in 3 steps at
    # mass 1e-3), which the default divergence check would refuse.
    return make(0.5, geometry=riemod.Geometry(mass=mass, structure=structure, mass_policy=policy),
                max_loss_growth=None, **({"on_nonfinite": "skip"} if skip else {}))

  def make_step(frontend, structure, dtype, axis_name=None, policy=None, shards=True, **kwargs):
    params, d, apply, loss, metric = problem(frontend, dtype)
    if policy == HUGE:  # one sample's inputs overflow A (x x^T = 1e400): its refresh fails
      d = dict(d, x=d["x"].at[5].multiply(1e200))
    mass = DEEP_MASS if frontend == "deep" else MASS[dtype] if policy is None else POLICY_MASS
    tx = optimizer(structure, mass, policy)

    def step(params, state, d):
      model, extra = apply(params)
      value, grads, curv = riemod.value_grad_and_curvature(
          model, d["x"], lambda y: loss(y, d), metric, axis_name=axis_name, **extra, **kwargs)
      # shards=False: the curvature without its per-device shards (every row on every device).
      updates, state = tx.update(grads, state, params,
                                 curvature=curv if shards else curv.replicated())
      return optax.apply_updates(params, updates), state, value, curv

    return params, tx.init(params), d, step

  def sharded(step, check_vma=True):
    """The step inside shard_map; parameters and optimizer state (with the step report) come back
    stacked from every device."""
    def body(params, state, d):
      params, state, value, curv = step(params, state, d)
      # The shards differ between devices: the replicated curvature leaves the shard_map.
      return jax.tree.map(lambda a: a[None], (params, state)), value, curv.replicated()
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("batch")),
                                 out_specs=(P("batch"), P(), P()), check_vma=check_vma))

  def same(a, b) -> float:
    """``tree_rel`` where both are finite; ``inf`` where one is NaN or inf and the other is not
    (the reports hold NaN residuals when residuals are not requested)."""
    worst = 0.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
      if not np.array_equal(np.isfinite(u), np.isfinite(v)) or not np.array_equal(
          u[~np.isfinite(u)], v[~np.isfinite(v)], equal_nan=True):
        return float("inf")
      if np.isfinite(u).any():
        worst = max(worst, rel(u[np.isfinite(u)], v[np.isfinite(v)]))
    return worst

  references, reference_text = {}, {}

  def ahead(jitted):
    """``(call, texts)``: ``jitted`` compiled ahead of time once per argument signature (with
    jax_enable_x64 a float32 state's report starts in float64), so its program text is at hand
    (``texts``, in order of compilation)."""
    compiled, texts = {}, []

    def call(*args):
      key = str([(jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(args)])
      if key not in compiled:
        compiled[key] = jitted.lower(*args).compile()
        texts.append(compiled[key].as_text())
      return compiled[key](*args)

    return call, texts

  def reference(frontend, structure, dtype, policy=None):
    """One device on the whole batch: ``[(params, loss, curvature, state) after step i]``."""
    if (frontend, structure, dtype, policy) not in references:
      params, state, d, step_one = make_step(frontend, structure, dtype, policy=policy)
      (one, texts), trajectory = ahead(jax.jit(step_one)), []
      for _ in range(STEPS):
        params, state, loss, curv = one(params, state, d)
        trajectory.append((params, loss, curv, state))
      references[frontend, structure, dtype, policy] = trajectory
      reference_text[frontend, structure, dtype, policy] = texts[0]
    return references[frontend, structure, dtype, policy]

  def run_both(frontend, structure, dtype, check_vma=True, hlo=None, policy=None):
    """The worst differences to one device over STEPS steps. When ``hlo`` names a key, the
    compiled program's factorisations go into ``out[hlo]`` and its kernel-shaped dot products
    (with the one-device program's) into ``worst["kernel_dots"]``."""
    trajectory = reference(frontend, structure, dtype, policy)
    params, state, d, step_many = make_step(frontend, structure, dtype, axis_name="batch",
                                            policy=policy)
    many, texts = ahead(sharded(step_many, check_vma))
    pm, sm = params, state
    worst = {"params": 0.0, "loss": 0.0, "spread": 0.0, "curvature": 0.0, "state": 0.0}
    for i, (p1, l1, c1, s1) in enumerate(trajectory):
      stacked, lm, cm = many(pm, sm, d)
      copies = [jax.tree.map(lambda a, j=j: a[j], stacked) for j in range(DEVICES)]
      pm, sm = copies[0]
      worst["params"] = max(worst["params"], tree_rel(pm, p1))
      # The optimizer state holds the step report (condition, residual, jitter, error per block).
      worst["state"] = max(worst["state"], same(sm, s1))
      worst["loss"] = max(worst["loss"], rel(lm, l1))
      worst["spread"] = max(worst["spread"], max(same(c, copies[0]) for c in copies[1:]))
      if i == 0:  # every array of the curvature (rows, features, coordinates), element-wise
        worst["curvature"] = tree_rel(cm, c1)
        worst["num_rows"] = [cm.num_rows, c1.num_rows]
    if hlo is not None:
      out[hlo] = factorisations(texts[0], DEVICES)
      one = reference_text[frontend, structure, dtype, policy]
      if policy is not None and policy.startswith("kronecker"):
        worst["kronecker"] = {"refreshes": kronecker_refreshes(texts[0], DEVICES),
                              "statistics": statistics(texts[0], DEVICES),
                              "statistics_one_device": statistics(one, 1)}
      worst["kernel_dots"] = {"sharded": kernel_dots(texts[0], c1.num_rows, DEVICES),
                              "one_device": kernel_dots(one, c1.num_rows, 1)["whole"]}
    return worst

  # 3. Refusals: messages, or None when nothing was raised.
  def message(fn, *args):
    try:
      jax.block_until_ready(fn(*args))
    except ValueError as error:
      return str(error)
    return None

  if part == "default":
    # 1. The shard_map steps equal the single-device steps.
    for frontend in FRONTENDS:
      for structure in STRUCTURES:
        out[f"step/{frontend}/{structure}/float64"] = run_both(
            frontend, structure, "float64", hlo=f"factorisations/{frontend}/{structure}")
    # 2. Layerwise blocks spread over the devices: five blocks on four devices (one device owns
    # two). The step equals one device's, and the compiled program factors every block once,
    # inside the branch of its device only.
    out["step/deep/layerwise/float64"] = run_both(
        "deep", "layerwise", "float64", hlo="factorisations/deep/layerwise")
    out["assignment/deep"] = list(_deep_assignment())
    # Each block's rows go to its owner alone: the program of the deep step (the curvature not
    # among its outputs) against the same step with the per-device shards dropped.
    def collected(hlo):
      import re
      found = {"all-gather": [], "all-to-all": []}
      for line in hlo.splitlines():
        for op in found:
          match = re.search(rf"\s{op}(-start)?\(", line.split("=", 1)[-1]) if "=" in line else None
          if match:
            result = line.split("=", 1)[1][:match.start()]
            found[op] += re.findall(r"([fs](?:32|64)\[[0-9,]*\])", result)[-1:]
      return found

    for shards in (True, False):
      params, state, d, step_many = make_step("deep", "layerwise", "float64", "batch",
                                              shards=shards)
      program = jax.jit(jax.shard_map(lambda p, s, d: step_many(p, s, d)[0], mesh=mesh,
                                      in_specs=(P(), P(), P("batch")), out_specs=P()))
      out[f"owners/deep/shards={shards}"] = {
          "collectives": collected(program.lower(params, state, d).compile().as_text()),
          "params": tree_rel(program(params, state, d),
                             reference("deep", "layerwise", "float64")[0][0])}
    # to_owners itself: every block's factors (dense, rows, an embedding's integer ids: two
    # dtypes, two all-to-alls) arrive on the owner equal, bit for bit and in sample order, to
    # their all-gather; the spread returns them to every device.
    from riemod.curvature import _mesh
    from riemod.curvature.factors import DenseFactor, EmbedFactor, RowsFactor
    from riemod.nn.structure import DenseStructure, EmbedStructure

    def exchange(x):
      ids = jnp.floor(jnp.abs(x[:, :3]) * 10).astype(jnp.int32) % 7
      blocks = [[DenseFactor(x[:, None, :4], jnp.stack([x[:, None, 1:3], 2 * x[:, None, :2]]),
                             DenseStructure(kernel_shape=(4, 2), has_bias=True))],
                [RowsFactor({"w": x[None, :, :3]}), RowsFactor({"b": x[None, :, 3:]})],
                [EmbedFactor(jnp.stack([x[:, :3, None] * jnp.ones(2)]), ids,
                             EmbedStructure(num_embeddings=7, features=2))]]
      got = _mesh.spread(("batch",), [3.0, 2.0, 1.0], [lambda f: f] * len(blocks), blocks)
      want = [[_mesh.gather_samples(f, ("batch",)) for f in block] for block in blocks]
      return got, want

    got, want = jax.jit(jax.shard_map(exchange, mesh=mesh, in_specs=P("batch"),
                                      out_specs=P()))(jnp.asarray(data["x"] @ rng.randn(4, 5)))
    out["owners/exchange"] = {
        "equal": all(bool(np.array_equal(u, v)) for u, v in zip(jax.tree.leaves(got),
                                                                 jax.tree.leaves(want))),
        "dtypes": sorted({str(np.asarray(u).dtype) for u in jax.tree.leaves(got)}),
        "assignment": list(_mesh.assign([3.0, 2.0, 1.0], DEVICES))}
    out["owners/deep/shard_elements"] = [[4 * i, 12 * o] for i, o in DEEP]  # 4 samples, 3 rows
    # The Kronecker mass: statistics per device and one all-reduce, refreshes spread.
    out["step/kronecker"] = run_both(*KRONECKER[:2], "float64", policy=KRONECKER[2],
                                     hlo="factorisations/kronecker")
    out["step/kronecker/huge"] = run_both(*KRONECKER[:2], "float64", policy=HUGE)
    # The first layer's factors after the first step, on every device of the sharded step.
    params, state, d, step_many = make_step(*KRONECKER[:2], "float64", "batch", policy=HUGE)
    stacked = sharded(step_many)(params, state, d)[0][1]
    kept = [m for m in jax.tree.leaves(stacked, is_leaf=lambda m: isinstance(
        m, riemod.masses.KroneckerMoments)) if isinstance(m, riemod.masses.KroneckerMoments)]
    out["kronecker/huge/first_layer"] = {
        "inputs_finite": bool(np.isfinite(np.asarray(kept[0].inputs)).all()),
        "roots_identity": [bool(np.array_equal(np.asarray(r)[j], np.eye(r.shape[-1])))
                           for r in (kept[0].inputs_root, kept[0].inputs_inverse,
                                     kept[0].outputs_root, kept[0].outputs_inverse)
                           for j in range(DEVICES)]}
    # check_vma=False with axis_name= is the same computation without JAX's type checks.
    out["step/function/layerwise/float64/check_vma=False"] = run_both(
        "function", "layerwise", "float64", check_vma=False,
        hlo="factorisations/function/layerwise/check_vma=False")
    # jax.jit with the batch sharded over the mesh (no shard_map, no axis_name).
    p1, l1, _ = reference("function", "full", "float64")[0][:3]
    params, state, d, step = make_step("function", "full", "float64")
    placed = jax.device_put(d, NamedSharding(mesh, P("batch")))
    pm, _, lm, _ = jax.jit(step)(params, state, placed)
    out["jit_sharded/function/full/float64"] = {
        "params": tree_rel(pm, p1), "loss": rel(lm, l1),
        "sharded": not placed["x"].sharding.is_fully_replicated}
    # 3. Refusals (traced only, nothing compiles).
    params, state, d, step_plain = make_step("function", "full", "float64")
    out["error/no_axis_name"] = message(sharded(step_plain), params, state, d)
    out["error/no_axis_name/check_vma=False"] = message(sharded(step_plain, False), params,
                                                        state, d)
    _, _, _, step_named = make_step("function", "full", "float64", axis_name="batch")
    out["error/unbound_axis"] = message(jax.jit(step_named), params, state, d)
    replicated = jax.jit(jax.shard_map(lambda p, s, d: step_named(p, s, d)[2], mesh=mesh,
                                       in_specs=(P(), P(), P()), out_specs=P()))
    out["error/replicated_batch"] = message(replicated, params, state, d)
    return out

  if part == "policies":
    # Mass policies: their statistics come from the gathered rows (Kronecker) and the averaged
    # gradient (adaptive), so every device keeps one device's state. With check_vma=True a
    # statistic that varied over the devices would mostly be refused by JAX's types (a loop or
    # cond carrying it); with check_vma=False only the comparison of values can see it.
    for frontend, structure, policy in MASS_POLICIES:
      for check_vma in (True, False):
        key = f"step/{frontend}/{structure}/{policy}/check_vma={check_vma}"
        try:
          out[key] = run_both(frontend, structure, "float64", check_vma=check_vma,
                              policy=policy)
        except TypeError as error:  # JAX's types refused a value that varies over the devices
          out[key] = {"error": str(error)[-1500:]}
    return out

  for frontend, structure in FLOAT32:
    out[f"step/{frontend}/{structure}/float32"] = run_both(frontend, structure, "float32")

  # 2. curvature_batch with axis_name: m leading samples of every shard; one device computes the
  # same with those samples moved to the front of the batch.
  m, shard = 2, batch // DEVICES
  params, state, d, step_many = make_step("function", "full", "float64", "batch",
                                          curvature_batch=m)
  lead = np.concatenate([np.arange(j * shard, j * shard + m) for j in range(DEVICES)])
  order = np.concatenate([lead, np.setdiff1d(np.arange(batch), lead)])
  _, _, _, step_one = make_step("function", "full", "float64", curvature_batch=m * DEVICES)
  p1, _, _, c1 = jax.jit(step_one)(params, state, jax.tree.map(lambda a: a[order], d))
  (stacked, _), _, cm = sharded(step_many)(params, state, d)
  out["curvature_batch"] = {"params": tree_rel(jax.tree.map(lambda a: a[0], stacked), p1),
                            "curvature": tree_rel(cm, c1), "num_rows": [cm.num_rows, c1.num_rows]}

  # 4. Every device its own model on its own shard (check_vma=True, no axis_name): each device's
  # curvature is its shard's, as one device computes it.
  params, _, d, _ = make_step("function", "full", "float64")
  models = jax.tree.map(lambda a: jnp.stack([a * (1 + 0.1 * j) for j in range(DEVICES)]), params)
  loss = lambda y, d: 0.5 * jnp.mean(jnp.sum((y - d["t"]) ** 2, -1))

  def own(p, d):
    return riemod.value_grad_and_curvature(plain, d["x"], lambda y: loss(y, d),
                                           riemod.metrics.identity(), params=p)

  def own_body(p, d):
    _, grads, curv = own(jax.tree.map(lambda a: a[0], p), d)
    return jax.tree.map(lambda a: a[None], (grads, curv.modules[0].factor.cotangents))

  ensemble = jax.jit(jax.shard_map(own_body, mesh=mesh, in_specs=(P("batch"), P("batch")),
                                   out_specs=P("batch")))(models, d)
  worst = 0.0
  for j in range(DEVICES):
    part = jax.tree.map(lambda a: a[j * shard:(j + 1) * shard], d)
    _, grads, curv = jax.jit(own)(jax.tree.map(lambda a: a[j], models), part)
    expected = (grads, curv.modules[0].factor.cotangents)
    worst = max(worst, tree_rel(jax.tree.map(lambda a: a[j], ensemble), expected))
  out["per_device_models"] = worst

  # 5. jax.jit with the batch sharded over the mesh (no shard_map, no axis_name), float32.
  for frontend, structure in FLOAT32:
    p1, l1, _ = reference(frontend, structure, "float32")[0][:3]
    params, state, d, step = make_step(frontend, structure, "float32")
    placed = jax.device_put(d, NamedSharding(mesh, P("batch")))
    pm, _, lm, _ = jax.jit(step)(params, state, placed)
    out[f"jit_sharded/{frontend}/{structure}/float32"] = {
        "params": tree_rel(pm, p1), "loss": rel(lm, l1),
        "sharded": not placed["x"].sharding.is_fully_replicated}
  return out


# --- the tests: run in the pytest process --------------------------------------------------------


def _run(part: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  done = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), part], env=env,
                        capture_output=True, text=True, timeout=1800)
  assert done.returncode == 0, f"the {DEVICES}-device worker failed:\n{done.stderr[-4000:]}"
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured() -> dict:
  """float64 steps of every frontend and structure, and the refusals: ~14 programs."""
  return _run("default")


@pytest.fixture(scope="module")
def measured_policies() -> dict:
  """Kronecker and adaptive masses under shard_map (with and without check_vma), float64."""
  return _run("policies")


@pytest.fixture(scope="module")
def measured_slow() -> dict:
  """float32 steps, curvature_batch, per-device models, jax.jit on a sharded float32 batch."""
  return _run("slow")


def _check_step(worst: dict, dtype: str) -> None:  # The factor rows, features and coordinates of the whole batch, on every device.
  assert worst["num_rows"][0] == worst["num_rows"][1]
  assert worst["curvature"] <= TOLERANCE[dtype], worst
  assert worst["loss"] <= TOLERANCE[dtype], worst
  assert worst["params"] <= TOLERANCE[dtype], worst
  # The optimizer state, with the step report per block, as one device's.
  assert worst["state"] <= TOLERANCE[dtype], worst
  # Replicated parameters and reports stay identical on every device (bit for bit).
  assert worst["spread"] == 0.0, worst


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_shard_map_step_equals_one_device(measured, frontend, structure):
  _check_step(measured[f"step/{frontend}/{structure}/float64"], "float64")


def test_spread_blocks_step_equals_one_device(measured):
  _check_step(measured["step/deep/layerwise/float64"], "float64")


def test_layerwise_blocks_are_factored_once_on_their_device(measured):
  """Five blocks on four devices: no factorisation runs on every device; the switch on the
  device's index holds each block's in its owner's branch only."""
  owner = measured["assignment/deep"]
  assert sorted(set(owner)) == list(range(DEVICES)), owner  # every device gets work
  found = measured["factorisations/deep/layerwise"]
  assert found["every_device"] == 0, found
  assert found["per_branch"] == [[owner.count(j) for j in range(DEVICES)]], (found, owner)


def test_rows_sent_to_owners_equal_their_gather(measured):
  """Dense, rows and embedding factors (float and integer arrays), three blocks on three of four
  devices: what each owner receives equals the all-gather bit for bit."""
  found = measured["owners/exchange"]
  assert found["equal"] and found["dtypes"] == ["float64", "int32"], found
  assert sorted(found["assignment"]) == [0, 1, 2], found


def test_each_blocks_rows_reach_its_owner_only(measured):
  """The deep step's program (the curvature not among its outputs) sends each block's rows to
  its owner alone: one all-to-all of per-owner packs as wide as the largest owner's share
  (features 4 x fan_in and cotangents 3 x 4 x fan_out per device and block), and no row is
  all-gathered; only the loss gradient's coordinates (16 samples x 3 rows). Dropping the shards
  (every row to every device) all-gathers every layer's features and cotangents instead. Both
  steps equal one device's."""
  owner = measured["assignment/deep"]
  sizes = [sum(elements) for elements in measured["owners/deep/shard_elements"]]
  width = max(sum(n for n, o in zip(sizes, owner) if o == j) for j in range(DEVICES))
  owners = measured["owners/deep/shards=True"]
  assert owners["collectives"]["all-gather"] == ["f64[16,3]"], owners
  assert len(owners["collectives"]["all-to-all"]) == 1, owners
  assert owners["collectives"]["all-to-all"][0] in (f"f64[1,{width}]", f"f64[{DEVICES},{width}]")
  every = measured["owners/deep/shards=False"]
  assert every["collectives"]["all-to-all"] == [], every
  assert len(every["collectives"]["all-gather"]) == 1 + 2 * len(DEEP), every
  assert owners["params"] <= TOLERANCE["float64"] and every["params"] <= TOLERANCE["float64"]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_two_blocks_on_four_devices_and_one_block_everywhere(measured, frontend):
  """Two layerwise blocks: two devices factor one each, two none. The one-block structure keeps
  its replicated Cholesky."""
  found = measured[f"factorisations/{frontend}/layerwise"]
  assert found["every_device"] == 0 and found["per_branch"] == [[1, 1, 0, 0]], found
  assert measured[f"factorisations/{frontend}/full"] == {"every_device": 1, "per_branch": []}


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_one_block_kernel_is_assembled_in_slabs(measured, frontend):
  """structure="full" (steps equal one device's: test_shard_map_step_equals_one_device): every
  device computes a d / devices x d slab of the kernel for each dot the one-device program
  spends on the whole d x d kernel, and no whole-kernel dot runs on every device (the jitter
  retry's rebuild, under its conditional, is not counted)."""
  dots = measured[f"step/{frontend}/full/float64"]["kernel_dots"]
  assert dots["one_device"] >= 2, dots  # one per module at least (NNX, Linen: 2 dense layers)
  assert dots["sharded"] == {"whole": 0, "slab": dots["one_device"]}, dots


def test_kernel_slab_is_those_samples_rows_of_the_kernel():
  """``gram(inv_mass, samples=(start, size))`` equals those samples' rows (for every factor row)
  of ``K D^-1 K^T`` formed from the materialised rows, for every factor type and kernel path,
  scalar and per-parameter masses, with ``start`` traced. In this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from riemod.curvature.factors import DenseFactor, EmbedFactor, RowsFactor
  from riemod.nn.structure import DenseStructure, EmbedStructure

  rng = np.random.RandomState(0)
  r, b, size = 3, 8, 2
  normal = lambda *shape: jnp.asarray(rng.randn(*shape), jnp.float32)

  def dense(positions, fan_in, fan_out, bias_weight=None):
    return DenseFactor(normal(b, positions, fan_in), normal(r, b, positions, fan_out),
                       DenseStructure((fan_in, fan_out), True),
                       None if bias_weight is None else jnp.float32(bias_weight))

  def embed(positions, vocabulary):
    return EmbedFactor(normal(r, b, positions, 3),
                       jnp.asarray(rng.randint(0, vocabulary, (b, positions))),
                       EmbedStructure(vocabulary, 3))

  factors = {  # the branches of each gram: by cost, by the vocabulary's size against B P
      "dense": dense(1, 4, 5, 1.3), "dense/positions": dense(2, 9, 9),
      "dense/position rows": dense(6, 2, 2),
      "rows": RowsFactor({"w": normal(r, b, 4, 2), "c": normal(r, b, 2)}),
      "embed/table": embed(5, 6), "embed/present ids": embed(8, 100), "embed/pairs": embed(2, 50)}
  worst = {}
  for name, factor in factors.items():
    for per_parameter in (False, True):
      shapes = factor.leaf_shapes
      masses = {k: (jnp.asarray(rng.rand(*shapes[k]) + 0.5, jnp.float32) if per_parameter
                    else jnp.float32(0.7)) for k in factor.leaf_names}
      rows, d = factor.rows(), factor.num_rows
      dense_kernel = sum((rows[k].reshape(d, -1) * jnp.reshape(masses[k], (1, -1)))
                         @ rows[k].reshape(d, -1).T for k in factor.leaf_names)
      slab = jax.jit(lambda start: factor.gram(masses, samples=(start, size)))
      error = 0.0
      for start in (0, 2, b - size):
        expected = dense_kernel.reshape(r, b, d)[:, start:start + size].reshape(r * size, d)
        error = max(error, float(jnp.max(jnp.abs(slab(start) - expected))))
      worst[name, per_parameter] = error / float(jnp.max(jnp.abs(dense_kernel)))
  assert max(worst.values()) <= 1e-5, worst


def test_curvature_used_outside_its_shard_map_is_solved_in_place():
  """A curvature returned from the shard_map it was measured in carries axes that are not bound
  where the optimizer then runs: the step is replicated there (no lax.axis_index of an unbound
  axis), and equals the one computed without shard_map. One device, in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec as P

  import riemod

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
  params = {"a": {"kernel": jnp.ones((3, 4)) / 3, "bias": jnp.zeros(4)},
            "b": {"kernel": jnp.ones((4, 2)) / 4, "bias": jnp.zeros(2)}}
  model = lambda p, x: riemod.nn.dense(p["b"], jnp.tanh(riemod.nn.dense(p["a"], x)))
  x = jnp.arange(24.0).reshape(8, 3) / 24

  def measure(p, x, axis_name=None):
    return riemod.value_grad_and_curvature(
        model, x, lambda y: 0.5 * jnp.mean(jnp.sum(y ** 2, -1)), riemod.metrics.identity(),
        params=p, axis_name=axis_name)

  def measured(p, x):
    loss, grads, curv = measure(p, x, "batch")
    return loss, grads, curv.replicated()  # without the per-device shards, to leave shard_map

  _, grads, curv = jax.jit(jax.shard_map(measured, mesh=mesh, in_specs=(P(), P("batch")),
                                         out_specs=P()))(params, x)
  assert curv.axis_name == ("batch",)
  tx = riemod.layerwise_natural_gradient(0.1, mass=0.1)
  update = jax.jit(lambda g, c: tx.update(g, tx.init(params), params, curvature=c)[0])
  updates = update(grads, curv)
  _, grads_1, curv_1 = jax.jit(measure)(params, x)
  expected = update(grads_1, curv_1)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("frontend,structure", FLOAT32)
def test_shard_map_step_equals_one_device_float32(measured_slow, frontend, structure):
  _check_step(measured_slow[f"step/{frontend}/{structure}/float32"], "float32")


def test_shard_map_without_type_checks(measured):
  worst = measured["step/function/layerwise/float64/check_vma=False"]
  assert worst["params"] <= TOLERANCE["float64"] and worst["curvature"] <= TOLERANCE["float64"]
  assert worst["state"] <= TOLERANCE["float64"] and worst["spread"] == 0.0, worst
  found = measured["factorisations/function/layerwise/check_vma=False"]
  assert found == {"every_device": 0, "per_branch": [[1, 1, 0, 0]]}, found


@pytest.mark.slow
@pytest.mark.parametrize("check_vma", (True, False))
@pytest.mark.parametrize("frontend,structure,policy", MASS_POLICIES)
def test_mass_policy_state_equals_one_device(measured_policies, frontend, structure, policy,
                                             check_vma):
  """The moments (in the optimizer state, compared element-wise) equal one device's and are
  identical on every device."""
  worst = measured_policies[f"step/{frontend}/{structure}/{policy}/check_vma={check_vma}"]
  assert "error" not in worst, worst["error"]
  _check_step(worst, "float64")


@pytest.mark.slow
def test_curvature_batch_counts_samples_per_device(measured_slow):
  worst = measured_slow["curvature_batch"]
  assert worst["num_rows"] == [3 * 2 * DEVICES] * 2, worst
  assert worst["curvature"] <= TOLERANCE["float64"] and worst["params"] <= TOLERANCE["float64"]


def test_kronecker_mass_state_equals_one_device(measured):
  """The Kronecker moments, roots and inverses (in the optimizer state) and the steps equal one
  device's over a refresh, a kept step and a refresh (update_every=2), on every device."""
  _check_step(measured["step/kronecker"], "float64")


def test_kronecker_statistics_are_summed_per_device_and_all_reduced(measured):
  """Every device forms A and S from its own quarter of the samples (each statistic's dot sums
  1/4 of the terms one device sums), and one all-reduce outside conditionals carries the
  statistics' lower triangles (sum x x^T: fan_in (fan_in + 1) / 2, sum c c^T: fan_out (fan_out + 1)
  / 2). Replicated statistics
  (every device summing all 16 samples) fail both."""
  found = measured["step/kronecker"]["kronecker"]
  one, many = found["statistics_one_device"]["terms"], found["statistics"]["terms"]
  assert one == {"inputs": [16, 16], "outputs": [48, 48]}, one  # 16 samples x 3 rows, 2 layers
  assert many == {k: [n // DEVICES for n in v] for k, v in one.items()}, found
  # The sums x x^T and c c^T are symmetric: only their lower triangles travel.
  reduced = found["statistics"]["all_reduced"]
  for fan_in, fan_out in KRONECKER_FACTORS:
    assert str((fan_in - 1) * fan_in // 2) in reduced and str(fan_out * (fan_out + 1) // 2) in \
        reduced, reduced
    assert f"{fan_in - 1},{fan_in - 1}" not in reduced and f"{fan_out},{fan_out}" not in reduced


def test_kronecker_refresh_keeps_old_factors_where_new_ones_are_not_finite(measured):
  """One sample's inputs of 1e200 overflow the first layer's A: its refresh fails on its owner,
  which keeps (and shares) the previous factors, the identity, on every device, as one device
  does; the steps and state equal one device's."""
  found = measured["kronecker/huge/first_layer"]
  assert not found["inputs_finite"] and all(found["roots_identity"]), found
  _check_step(measured["step/kronecker/huge"], "float64")


def test_kronecker_refreshes_run_on_their_owners(measured):
  """Each module's two Cholesky factorisations (A and S) run in its owner's branch of the
  device switch only, the owners balanced by the factors' cubed sizes; none on every device."""
  from riemod.curvature import _mesh
  owner = _mesh.assign([float(a ** 3 + s ** 3) for a, s in KRONECKER_FACTORS], DEVICES)
  found = measured["step/kronecker"]["kronecker"]["refreshes"]
  shared = found.pop("shared")
  assert found == {"every_device": 0,
                   "per_branch": [[2 * owner.count(j) for j in range(DEVICES)]]}, found
  # Roots and inverses are lower triangular: their n (n + 1) / 2 entries are shared, not n x n.
  for n in {n for pair in KRONECKER_FACTORS for n in pair}:
    assert str(n * (n + 1) // 2) in shared and f"{n},{n}" not in shared, (n, shared)


def test_split_batch_without_axis_name_is_refused(measured):
  text = measured["error/no_axis_name"]
  assert text is not None and "axis_name='batch'" in text and "summed" in text, text
  text = measured["error/no_axis_name/check_vma=False"]
  assert text is not None and "axis_name='batch'" in text and "check_vma" in text, text


def test_axis_name_where_it_cannot_apply_is_refused(measured):
  text = measured["error/unbound_axis"]
  assert text is not None and "not a mapped axis" in text, text
  text = measured["error/replicated_batch"]
  assert text is not None and "not split over 'batch'" in text, text


@pytest.mark.slow
def test_per_device_models_get_their_own_shards_curvature(measured_slow):
  assert measured_slow["per_device_models"] <= TOLERANCE["float64"]


def test_jit_with_sharded_batch_equals_one_device(measured):
  worst = measured["jit_sharded/function/full/float64"]
  assert worst["sharded"]
  assert worst["params"] <= TOLERANCE["float64"] and worst["loss"] <= TOLERANCE["float64"], worst


@pytest.mark.slow
@pytest.mark.parametrize("frontend,structure", FLOAT32)
def test_jit_with_sharded_batch_equals_one_device_float32(measured_slow, frontend, structure):
  worst = measured_slow[f"jit_sharded/{frontend}/{structure}/float32"]
  assert worst["sharded"]
  assert worst["params"] <= 1e-6 and worst["loss"] <= 1e-6, worst


if __name__ == "__main__":
  os.environ.setdefault("XLA_FLAGS", XLA_FLAGS)
  print(json.dumps(_worker(sys.argv[1] if len(sys.argv) > 1 else "default")))

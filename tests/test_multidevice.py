"""riemod on several devices: ``jax.shard_map`` with ``axis_name=``, and ``jax.jit`` on a sharded batch.

The computations run once, in a subprocess with 4 forced host devices
(``--xla_force_host_platform_device_count=4`` must be set before JAX starts, and the pytest process
has started it already); the subprocess prints one JSON record of measured differences and error
messages, and the tests below judge them. The reference is always the same step on one device on
the whole batch, and the sharded parameters are read back from every device, not from one. The
float64 steps of every frontend and structure and the refusals run by default; float32, the
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


# --- the worker: runs in the subprocess ----------------------------------------------------------


def _worker(part: str) -> dict:  # noqa: C901 (one linear script of independent checks)
  """The measurements of ``part``: ``"default"`` (float64 steps, refusals) or ``"slow"``."""
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
    keys = jax.random.split(jax.random.key(1), 2)
    params = {"a": {"kernel": jax.random.normal(keys[0], (fan_in, hidden), dtype) / 2,
                    "bias": jnp.zeros(hidden, dtype)},
              "b": {"w": jax.random.normal(keys[1], (hidden, classes), dtype) / 2,
                    "c": jnp.zeros(classes, dtype)}}
    return params, d, lambda p: (plain, {"params": p}), squares, riemod.metrics.identity()

  def optimizer(structure, dtype):
    make = riemod.natural_gradient if structure == "full" else riemod.layerwise_natural_gradient
    return make(0.5, geometry=riemod.Geometry(mass=MASS[dtype], structure=structure))

  def make_step(frontend, structure, dtype, axis_name=None, **kwargs):
    params, d, apply, loss, metric = problem(frontend, dtype)
    tx = optimizer(structure, dtype)

    def step(params, state, d):
      model, extra = apply(params)
      value, grads, curv = riemod.value_grad_and_curvature(
          model, d["x"], lambda y: loss(y, d), metric, axis_name=axis_name, **extra, **kwargs)
      updates, state = tx.update(grads, state, params, curvature=curv)
      return optax.apply_updates(params, updates), state, value, curv

    return params, tx.init(params), d, step

  def sharded(step, check_vma=True):
    """The step inside shard_map; parameters come back stacked from every device."""
    def body(params, state, d):
      params, state, value, curv = step(params, state, d)
      return jax.tree.map(lambda a: a[None], params), state, value, curv
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("batch")),
                                 out_specs=(P("batch"), P(), P(), P()), check_vma=check_vma))

  references = {}

  def reference(frontend, structure, dtype):
    """One device on the whole batch: ``[(params, loss, curvature) after step i]``."""
    if (frontend, structure, dtype) not in references:
      params, state, d, step_one = make_step(frontend, structure, dtype)
      one, trajectory = jax.jit(step_one), []
      for _ in range(STEPS):
        params, state, loss, curv = one(params, state, d)
        trajectory.append((params, loss, curv))
      references[frontend, structure, dtype] = trajectory
    return references[frontend, structure, dtype]

  def run_both(frontend, structure, dtype, check_vma=True):
    trajectory = reference(frontend, structure, dtype)
    params, state, d, step_many = make_step(frontend, structure, dtype, axis_name="batch")
    many = sharded(step_many, check_vma)
    pm, sm = params, state
    worst = {"params": 0.0, "loss": 0.0, "spread": 0.0, "curvature": 0.0}
    for i, (p1, l1, c1) in enumerate(trajectory):
      stacked, sm, lm, cm = many(pm, sm, d)
      copies = [jax.tree.map(lambda a, j=j: a[j], stacked) for j in range(DEVICES)]
      pm = copies[0]
      worst["params"] = max(worst["params"], tree_rel(pm, p1))
      worst["loss"] = max(worst["loss"], rel(lm, l1))
      worst["spread"] = max(worst["spread"], max(tree_rel(c, pm) for c in copies[1:]))
      if i == 0:  # every array of the curvature (rows, features, coordinates), element-wise
        worst["curvature"] = tree_rel(cm, c1)
        worst["num_rows"] = [cm.num_rows, c1.num_rows]
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
        out[f"step/{frontend}/{structure}/float64"] = run_both(frontend, structure, "float64")
    # check_vma=False with axis_name= is the same computation without JAX's type checks.
    out["step/function/full/float64/check_vma=False"] = run_both(
        "function", "full", "float64", check_vma=False)
    # jax.jit with the batch sharded over the mesh (no shard_map, no axis_name).
    p1, l1, _ = reference("function", "full", "float64")[0]
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
  stacked, _, _, cm = sharded(step_many)(params, state, d)
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
    p1, l1, _ = reference(frontend, structure, "float32")[0]
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
def measured_slow() -> dict:
  """float32 steps, curvature_batch, per-device models, jax.jit on a sharded float32 batch."""
  return _run("slow")


def _check_step(worst: dict, dtype: str) -> None:  # The factor rows, features and coordinates of the whole batch, on every device.
  assert worst["num_rows"][0] == worst["num_rows"][1]
  assert worst["curvature"] <= TOLERANCE[dtype], worst
  assert worst["loss"] <= TOLERANCE[dtype], worst
  assert worst["params"] <= TOLERANCE[dtype], worst
  # Replicated parameters stay identical on every device (bit for bit).
  assert worst["spread"] == 0.0, worst


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("frontend", FRONTENDS)
def test_shard_map_step_equals_one_device(measured, frontend, structure):
  _check_step(measured[f"step/{frontend}/{structure}/float64"], "float64")


@pytest.mark.slow
@pytest.mark.parametrize("frontend,structure", FLOAT32)
def test_shard_map_step_equals_one_device_float32(measured_slow, frontend, structure):
  _check_step(measured_slow[f"step/{frontend}/{structure}/float32"], "float32")


def test_shard_map_without_type_checks(measured):
  worst = measured["step/function/full/float64/check_vma=False"]
  assert worst["params"] <= TOLERANCE["float64"] and worst["curvature"] <= TOLERANCE["float64"]
  assert worst["spread"] == 0.0, worst


@pytest.mark.slow
def test_curvature_batch_counts_samples_per_device(measured_slow):
  worst = measured_slow["curvature_batch"]
  assert worst["num_rows"] == [3 * 2 * DEVICES] * 2, worst
  assert worst["curvature"] <= TOLERANCE["float64"] and worst["params"] <= TOLERANCE["float64"]


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

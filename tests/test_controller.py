"""The certified step-size controller and the Gauss-Newton verdict of ``certify()``.

References are dense: ``scipy.linalg.eigh(H, G)`` with ``H`` from ``jax.hessian`` / ``jax.jacrev``
and ``G`` built by definition (``J^T J / B + mass I`` for the whole-network metric) or, for the
layerwise and adaptive metrics, column by column from the optimizer's own geometry state. Runs
are float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

import riemod
from riemod.certify import (ControllerState, certified_layerwise_natural_gradient,
                            certified_natural_gradient, certify, controlled)
from test_certify_verdict import B as N
from test_certify_verdict import _net, _problem, _run

MASS = 1e-2
B = 16


# --------------------------------------------------------------------------- least squares
def _least_squares(seed=0):
  """A linear model with two parameter leaves (one generic module, so the layerwise G is one
  block here; the momentum test builds two dense modules): H = H_GN."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, 3)) * np.array([3.0, 1.0, 0.3]))
  t = jnp.asarray(rng.normal(size=(B, 2)))
  f = lambda p, v: v @ p["a"] + jnp.tanh(v) @ p["b"]
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
  params = {"a": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=(3, 2)))}
  return f, x, loss_fn, params


def _dense_h(f, x, loss_fn, params):
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.hessian(lambda v: loss_fn(f(unravel(v), x)))(flat))


def _dense_g(geometry, curvature, geometry_state, params):
  """G column by column from the geometry's own matvec (the optimizer's G)."""
  flat, unravel = ravel_pytree(params)
  metric = geometry.compose(curvature, geometry_state)
  cols = [ravel_pytree(metric.matvec(unravel(e)))[0] for e in np.eye(flat.shape[0])]
  return np.asarray(jnp.stack(cols, 1))


def _update(tx, state, f, x, loss_fn, params):
  loss, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                  params=params)
  u, state = tx.update(g, state, params, curvature=curv, value=loss,
                       apply_fn=lambda p: f(p, x), loss_fn=loss_fn)
  return u, state, loss, g, curv


def _stepper(tx, f, x, loss_fn):
  """The jitted ``(state, params) -> (updates, state, loss, grads, curvature)``."""
  return jax.jit(lambda state, params: _update(tx, state, f, x, loss_fn, params))


def test_lam_max_and_learning_rate_match_eigh_full_metric_by_definition():
  with jax.enable_x64(True):
    f, x, loss_fn, params = _least_squares()
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacrev(lambda v: f(unravel(v), x).ravel())(flat))
    g_dense = jac.T @ jac / B + MASS * np.eye(flat.shape[0])
    h = _dense_h(f, x, loss_fn, params)
    np.testing.assert_allclose(h, jac.T @ jac / B, atol=1e-12)   # linear model: H = H_GN
    expected = scipy.linalg.eigh(h, g_dense, eigvals_only=True)[-1]
    tx = certified_natural_gradient(geometry=riemod.Geometry(MASS, structure="full"), fraction=0.4, num_steps=flat.shape[0])
    u, state, _, g, curv = _update(tx, tx.init(params), f, x, loss_fn, params)
    np.testing.assert_allclose(float(state.lam_max), expected, rtol=1e-6)
    np.testing.assert_allclose(float(state.learning_rate), 0.4 * 2 / expected, rtol=1e-6)
    # The update is the certified rate times the natural-gradient step -G^{-1} g.
    step = -np.linalg.solve(g_dense, ravel_pytree(g)[0])
    np.testing.assert_allclose(ravel_pytree(u)[0], 0.8 / expected * step, rtol=1e-6)


@pytest.mark.parametrize("policy", ["constant", "adaptive"])
def test_layerwise_and_adaptive_metric_estimate_matches_eigh(policy):
  """The estimate uses the G the inner step was solved with: layerwise blocks, and the adaptive
  mass's moments after several steps (a fresh geometry state would give another pencil)."""
  with jax.enable_x64(True):
    f, x, loss_fn, params = _least_squares(1)
    mass_policy = riemod.masses.adaptive() if policy == "adaptive" else riemod.masses.constant()
    geometry = riemod.Geometry(mass=MASS, mass_policy=mass_policy)
    n = ravel_pytree(params)[0].shape[0]
    tx = controlled(riemod.layerwise_natural_gradient(1.0, geometry=geometry), geometry,
                    every=1, num_steps=n)
    state, step, p = tx.init(params), _stepper(tx, f, x, loss_fn), params
    for _ in range(5):
      u, state, _, _, curv = step(state, p)
      last = p
      p = optax.apply_updates(p, u)
    geometry_state = riemod.find_state(state, riemod.MetricState).geometry
    expected = scipy.linalg.eigh(_dense_h(f, x, loss_fn, last),
                                 _dense_g(geometry, curv, geometry_state, last),
                                 eigvals_only=True)[-1]
    np.testing.assert_allclose(float(state.lam_max), expected, rtol=1e-6)
    np.testing.assert_allclose(float(state.learning_rate), 2 * 0.5 / expected, rtol=1e-6)
    if policy == "adaptive":   # the moments moved G away from a fresh state's
      fresh = scipy.linalg.eigh(_dense_h(f, x, loss_fn, last),
                                _dense_g(geometry, curv, geometry.init(params), last),
                                eigvals_only=True)[-1]
      assert abs(fresh - expected) > 1e-4 * expected   # far outside the 1e-6 tolerance


def test_warm_start_reaches_eigh_with_two_lanczos_steps():
  """Repeated 2-step estimates, each warm-started from the last Ritz vector, converge to the top
  eigenvalue of the pencil (H, G) (layerwise G, fixed parameters)."""
  with jax.enable_x64(True):
    f, x, loss_fn, params = _least_squares(1)
    # A mass of the order of the Gram's eigenvalues spreads the pencil's spectrum (at 1e-2 the top
    # ones crowd below 1 and any restarted iteration converges slowly).
    geometry = riemod.Geometry(mass=1.0)
    tx = controlled(riemod.layerwise_natural_gradient(1.0, geometry=geometry), geometry,
                    every=1, num_steps=2)
    state, step = tx.init(params), _stepper(tx, f, x, loss_fn)
    h = _dense_h(f, x, loss_fn, params)
    first = None
    for _ in range(40):
      # The parameters stay put (H and the curvature stay fixed); the state moves on.
      _, state, _, _, curv = step(state, params)
      first = float(state.lam_max) if first is None else first
    geometry_state = riemod.find_state(state, riemod.MetricState).geometry
    expected = scipy.linalg.eigh(h, _dense_g(geometry, curv, geometry_state, params),
                                 eigvals_only=True)[-1]
    np.testing.assert_allclose(float(state.lam_max), expected, rtol=1e-6)
    np.testing.assert_allclose(float(state.learning_rate), 2 * 0.5 / expected, rtol=1e-6)
    assert first < (1 - 1e-3) * expected   # two cold Lanczos steps alone are not there
    assert int(state.estimates) == 40


@pytest.mark.slow  # 54 s in make test (2 workers); the estimate itself is tested against eigh above
def test_estimates_every_k_steps_and_jit_equals_eager():
  with jax.enable_x64(True):
    f, x, loss_fn, params = _least_squares()
    tx = certified_layerwise_natural_gradient(geometry=riemod.Geometry(MASS), every=3, warmup=0, num_steps=4)

    def run(step_fn, n):
      p, state = params, tx.init(params)
      lams = []
      for _ in range(n):
        u, state = step_fn(p, state)
        p = optax.apply_updates(p, u)
        lams.append(float(state.lam_max))
      return p, state, lams

    def step(p, state):
      return _update(tx, state, f, x, loss_fn, p)[:2]

    p_eager, s_eager, lams = run(step, 7)
    p_jit, s_jit, _ = run(jax.jit(step), 7)
    assert isinstance(s_jit, ControllerState)
    assert int(s_eager.estimates) == 3           # steps 0, 3, 6
    assert lams[0] == lams[1] == lams[2] and lams[3] == lams[4] == lams[5]
    for a, b in zip(jax.tree.leaves((p_eager, s_eager)), jax.tree.leaves((p_jit, s_jit))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    # An explicit warm-up estimates at each of its steps, then every `every`.
    tx = certified_layerwise_natural_gradient(geometry=riemod.Geometry(MASS), every=3, warmup=3,
                                              num_steps=4)
    assert int(run(step, 7)[1].estimates) == 5     # steps 0, 1, 2, 3, 6


def _entry_choleskys(tx, f, x, loss_fn, params) -> int:
  """LAPACK Cholesky calls in the compiled step's top level (the factorisations every step runs;
  the failure branches' refactorisations live in their own computations)."""
  hlo = _stepper(tx, f, x, loss_fn).lower(tx.init(params), params).compile().as_text()
  entry = [c for c in hlo.split("\n\n") if c.startswith("ENTRY")]
  assert len(entry) == 1
  return entry[0].count("potrf")


def _direct(jaxpr, name) -> int:
  """Equations ``name`` in ``jaxpr`` outside any cond/while (through jit and custom-JVP calls)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    if eqn.primitive.name not in ("cond", "while"):
      for sub in jax.core.jaxprs_in_params(eqn.params):
        count += _direct(sub, name)
  return count


def _estimate_branch_choleskys(tx, f, x, loss_fn, params) -> list[int]:
  """Cholesky factorisations directly in the estimate's branch (the cond branch holding the
  Lanczos ``eigh``), found at the step's top level."""
  jaxpr = jax.make_jaxpr(lambda s, p: _update(tx, s, f, x, loss_fn, p))(tx.init(params), params)
  found = []

  def visit(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "cond":
        for branch in eqn.params["branches"]:
          if _direct(branch.jaxpr, "eigh"):
            found.append(_direct(branch.jaxpr, "cholesky"))
      elif eqn.primitive.name != "while":
        for sub in jax.core.jaxprs_in_params(eqn.params):
          visit(sub)

  visit(jaxpr.jaxpr)
  return found


def test_estimate_shares_the_inner_steps_factorisation():
  """The estimate's G is the inner step's, factored once per step: the estimate's branch factors
  nothing itself, the compiled step runs exactly the inner step's factorisations (XLA merges the
  two compositions of the same G), and the estimate is the pencil's top eigenvalue (eigh). Fails
  when the estimate composes its own G inside the cond (one more factorisation per block on
  estimate steps)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(B, 3)))
    t = jnp.asarray(rng.normal(size=(B, 2)))
    f = lambda p, v: riemod.nn.dense(p["b"], jnp.tanh(riemod.nn.dense(p["a"], v)))
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)))},
              "b": {"kernel": jnp.asarray(rng.normal(size=(4, 2)))}}
    n = ravel_pytree(params)[0].shape[0]
    for geometry in (riemod.Geometry(MASS), riemod.certify.certified_geometry()):
      inner = riemod.layerwise_natural_gradient(1.0, geometry=geometry)
      plain = _entry_choleskys(inner, f, x, loss_fn, params)
      assert plain >= 2                                         # two blocks, factored
      tx = controlled(inner, geometry, num_steps=n)
      assert _estimate_branch_choleskys(tx, f, x, loss_fn, params) == [0]
      assert _entry_choleskys(tx, f, x, loss_fn, params) == plain
      _assert_first_estimate_is_eigh(tx, geometry, f, x, loss_fn, params)


def _assert_first_estimate_is_eigh(tx, geometry, f, x, loss_fn, params):
  """The first step's estimate is the top eigenvalue of the pencil (H_GN, G), G the optimizer's."""
  _, state, _, _, curv = _stepper(tx, f, x, loss_fn)(tx.init(params), params)
  geometry_state = riemod.find_state(state, riemod.MetricState).geometry
  expected = scipy.linalg.eigh(_dense_gauss_newton(f, x, loss_fn, params),
                               _dense_g(geometry, curv, geometry_state, params),
                               eigvals_only=True)[-1]
  np.testing.assert_allclose(float(state.lam_max), expected, rtol=1e-6)


def _dense_gauss_newton(f, x, loss_fn, params):
  flat, unravel = ravel_pytree(params)
  y = f(params, x)
  jac = np.asarray(jax.jacrev(lambda v: f(unravel(v), x).ravel())(flat))
  out = np.asarray(jax.hessian(lambda z: loss_fn(z.reshape(y.shape)))(y.ravel()))
  return jac.T @ out @ jac


def _conv_net(dtype):
  """Two convolutions (the second strided) and a dense head on 6x6 images, cross-entropy."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(8, 6, 6, 1)), dtype)
  labels = jnp.asarray(rng.integers(0, 3, size=8))

  def f(p, v):
    h = jnp.tanh(riemod.nn.conv(p["c1"], v))
    h = jnp.tanh(riemod.nn.conv(p["c2"], h, strides=2))
    return riemod.nn.dense(p["head"], h.reshape(h.shape[0], -1))

  loss_fn = lambda y: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(y), labels[:, None], 1))
  shapes = {"c1": (3, 3, 1, 2), "c2": (3, 3, 2, 3), "head": (27, 3)}
  params = {k: {"kernel": jnp.asarray(0.5 * rng.normal(size=s), dtype),
                "bias": jnp.asarray(0.1 * rng.normal(size=s[-1:]), dtype)}
            for k, s in shapes.items()}
  return f, x, loss_fn, params


def test_estimate_on_a_convolutional_net_matches_eigh_with_fast_convolutions():
  """On a CNN the estimate's Gauss-Newton products run inside a cond, where XLA:CPU does not put
  convolutions into its fast layout; the controller does. Checked: every convolution of the
  compiled step (estimate branch included) is in the canonical layout (fails without the
  rewrite: the transposed convolutions of J^T keep batch/feature-swapped layouts), the rewritten
  product equals the plain one, and lam_max equals eigh(H_GN, G) with G from the optimizer."""
  from riemod.certify.contraction import gauss_newton_product
  from riemod._convolutions import fast_convolutions_on_cpu

  f, x, loss_fn, params = _conv_net(jnp.float32)
  geometry = riemod.Geometry(MASS)
  tx = controlled(riemod.layerwise_natural_gradient(1.0, geometry=geometry), geometry)
  hlo = _stepper(tx, f, x, loss_fn).lower(tx.init(params), params).compile().as_text()
  labels = [line.split("dim_labels=")[1].split(",")[0] for line in hlo.splitlines()
            if " convolution(" in line]
  assert len(labels) >= 8          # forward, jvp and J^T convolutions of the step and estimate
  assert set(labels) == {"b01f_01io->b01f"}, sorted(set(labels))
  with jax.enable_x64(True):
    f, x, loss_fn, params = _conv_net(jnp.float64)
    flat, unravel = ravel_pytree(params)
    product = gauss_newton_product(lambda w: f(unravel(w), x), flat, loss_fn)
    v = jnp.asarray(np.random.default_rng(6).normal(size=flat.shape))
    np.testing.assert_allclose(jax.jit(fast_convolutions_on_cpu(product))(v), product(v),
                               rtol=1e-12, atol=1e-12)
    n = flat.shape[0]
    tx = controlled(riemod.layerwise_natural_gradient(1.0, geometry=geometry), geometry,
                    num_steps=n)
    _assert_first_estimate_is_eigh(tx, geometry, f, x, loss_fn, params)


_MESH_SCRIPT = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np, optax
jax.config.update("jax_enable_x64", True)
from jax.sharding import NamedSharding, PartitionSpec as P
import riemod
from riemod.certify import controlled
rng = np.random.default_rng(0)
x, t = jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=(8, 2)))
f = lambda p, v: riemod.nn.dense(p["b"], jnp.tanh(riemod.nn.dense(p["a"], v)))
params = {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)))},
          "b": {"kernel": jnp.asarray(rng.normal(size=(4, 2)))}}
geometry = riemod.Geometry(1e-2)
tx = controlled(riemod.layerwise_natural_gradient(1.0, geometry=geometry), geometry, num_steps=12)
mesh = jax.make_mesh((2,), ("batch",))

def steps(p, s, xs, ts, axis_name=None):
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - ts) ** 2, -1))
  for _ in range(2):
    value, g, curv = riemod.value_grad_and_curvature(f, xs, loss_fn, riemod.metrics.identity(),
                                                     params=p, axis_name=axis_name)
    u, s = tx.update(g, s, p, curvature=curv, value=value, apply_fn=lambda q: f(q, xs),
                     loss_fn=loss_fn)
    p = optax.apply_updates(p, u)
  return p, s.lam_max

one = jax.jit(steps)(params, tx.init(params), x, t)
xs, ts = (jax.device_put(a, NamedSharding(mesh, P("batch"))) for a in (x, t))
out = {"lam_one": float(one[1])}
for vma in (True, False):
  body = lambda p, s, a, b: jax.tree.map(lambda z: z[None], steps(p, s, a, b, "batch"))
  got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
                              out_specs=P("batch"), check_vma=vma))(params, tx.init(params), xs, ts)
  diff = max(float(np.max(np.abs(np.asarray(a)[d] - np.asarray(b))) / np.max(np.abs(np.asarray(b))))
             for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(one[0])) for d in range(2))
  out[str(vma)] = {"lam": np.asarray(got[1]).tolist(), "params": diff}
print(json.dumps(out))
"""


def test_estimate_on_a_mesh_is_the_whole_batchs():
  """Inside shard_map (2 host devices, a subprocess: the device count is fixed when JAX starts)
  each device's apply_fn/loss_fn see its shard of the batch; the estimate is the whole batch's,
  the same on every device, so two controlled steps equal one device's, with check_vma on and
  off. Fails without the devices' products combined: the devices' sum with check_vma=True (3.84
  against 1.97), each device its own shard's estimate with check_vma=False."""
  import json
  import os
  import subprocess
  import sys
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  run = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  for vma in ("True", "False"):
    np.testing.assert_allclose(out[vma]["lam"], [out["lam_one"]] * 2, rtol=1e-10)
    assert out[vma]["params"] < 1e-10, out


def test_default_warmup_estimates_at_doubling_steps():
  """warmup=None: steps 0, 1, 3, 7, 15 below `every` (count + 1 a power of two), then every
  `every`; fails with the old every-step warm-up (10 + 1 estimates) or none (2)."""
  f, x, loss_fn, params = _least_squares()
  tx = certified_layerwise_natural_gradient(geometry=riemod.Geometry(MASS), every=20,
                                            recheck_rise=None, num_steps=2)
  stepper = _stepper(tx, f, x, loss_fn)
  state, counts = tx.init(params), []
  for _ in range(22):
    state = stepper(state, params)[1]
    counts.append(int(state.estimates))
  due = [i for i in range(22) if counts[i] > (counts[i - 1] if i else 0)]
  assert due == [0, 1, 3, 7, 15, 20]


def test_a_rising_loss_is_estimated_at_once():
  f, x, loss_fn, params = _least_squares()
  tx = certified_layerwise_natural_gradient(geometry=riemod.Geometry(MASS), every=100, warmup=0, num_steps=3)
  loss, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                  params=params)
  step = jax.jit(lambda state, value: tx.update(
      g, state, params, curvature=curv, value=value, apply_fn=lambda p: f(p, x),
      loss_fn=loss_fn)[1])
  state = tx.init(params)
  counts = []
  # Batch-to-batch noise (0.9 after 0.5 is a 1.8x rise) stays under 1.5x the moving average
  # (0.95, 0.945, 0.90); the sustained rise to 2.0 does not (1.5 x 0.90 = 1.35).
  for value in (1.0, 0.5, 0.9, 0.5, 0.9, 2.0):
    state = step(state, jnp.asarray(value))
    counts.append(int(state.estimates))
  assert counts == [1, 1, 1, 1, 1, 2]            # the first step, then the rise past 1.5x
  np.testing.assert_allclose(float(state.smoothed_value),
                             0.9 * (0.9 * (0.9 * (0.9 * 0.95 + 0.09) + 0.05) + 0.09) + 0.2,
                             rtol=1e-6)                      # float32 arithmetic
  no_recheck = certified_layerwise_natural_gradient(geometry=riemod.Geometry(MASS), every=100, warmup=0,
                                                    recheck_rise=None)
  state = no_recheck.init(params)
  for value in (1.0, 3.5):
    state = no_recheck.update(g, state, params, curvature=curv, value=jnp.asarray(value),
                              apply_fn=lambda p: f(p, x), loss_fn=loss_fn)[1]
  assert int(state.estimates) == 1


def test_diverging_learning_rate_is_brought_back():
  with jax.enable_x64(True):
    f, x, loss_fn, params = _least_squares()
    geometry = riemod.Geometry(mass=MASS)
    probe = controlled(riemod.layerwise_natural_gradient(1.0, geometry=geometry), geometry,
                       num_steps=12)
    _, state, *_ = _update(probe, probe.init(params), f, x, loss_fn, params)
    too_large = 10 * 2 / float(state.lam_max)                     # 10x the edge of stability

    def losses(tx, n=30):
      p, st, out, step = params, tx.init(params), [], _stepper(tx, f, x, loss_fn)
      for _ in range(n):
        u, st, loss, *_ = step(st, p)
        out.append(float(loss))
        p = optax.apply_updates(p, u)
      return out, st

    plain, _ = losses(riemod.layerwise_natural_gradient(too_large, geometry=geometry,
                                                        on_nonfinite="ignore"))
    assert not np.isfinite(plain[-1]) or plain[-1] > 1e3 * plain[0]          # it diverges
    capped, st = losses(controlled(riemod.layerwise_natural_gradient(1.0, geometry=geometry),
                                   geometry, learning_rate=too_large, num_steps=12))
    np.testing.assert_allclose(float(st.learning_rate), 2 * 0.5 / float(st.lam_max), rtol=1e-9)
    optimum = losses(riemod.natural_gradient(1.0, 1e-12), 3)[0][-1]   # least squares: one step
    # ... and now it converges: monotonically, to within 1% of the initial gap in 30 steps.
    assert np.all(np.diff(capped) < 0)
    assert capped[-1] - optimum < 1e-2 * (capped[0] - optimum)
    # A learning rate below the certified one is left alone.
    small, st = losses(controlled(riemod.layerwise_natural_gradient(1.0, geometry=geometry),
                                  geometry, learning_rate=1e-3, num_steps=12), 2)
    assert float(st.learning_rate) == pytest.approx(1e-3)


def _step_map_radius(geometry, learning_rate, momentum, f, x, loss_fn, params):
  """Spectral radius of riemod's step map ``(w, phi) -> (w', phi')`` (affine here: a model
  linear in its parameters on a fixed batch), from its Jacobian."""
  flat, unravel = ravel_pytree(params)
  n = flat.shape[0]
  tx = riemod.layerwise_natural_gradient(learning_rate, geometry=geometry, momentum=momentum,
                                         on_nonfinite="ignore", max_loss_growth=None)

  def step_map(z):
    p, state = unravel(z[:n]), tx.init(unravel(z[:n]))
    if momentum is not None:
      state = _with_momentum(state, unravel(z[n:]))
    _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                 params=p)
    u, state = tx.update(g, state, p, curvature=curv)
    phi = riemod.find_state(state, riemod.MetricState).momentum
    return jnp.concatenate([z[:n] + ravel_pytree(u)[0]]
                           + ([] if momentum is None else [ravel_pytree(phi)[0]]))

  z = flat if momentum is None else jnp.concatenate([flat, jnp.zeros_like(flat)])
  jac = np.asarray(jax.jacfwd(step_map)(z))
  return np.max(np.abs(np.linalg.eigvals(jac)))


def _with_momentum(state, phi):
  def visit(node):
    return node._replace(momentum=phi) if isinstance(node, riemod.MetricState) else node
  return jax.tree.map(visit, state, is_leaf=lambda n: isinstance(n, riemod.MetricState))


def test_spring_momentum_is_stable_below_the_certified_edge():
  """The certified rate needs no change for SPRING momentum: every eigenvalue ``z`` of the step
  map (eigenvector ``x``) solves ``z^2 - z (1 + mu a - lr b) + mu a = 0`` with
  ``a = x*Dx / x*Gx`` in [0, 1] and ``b = x*Hx / x*Gx <= lam_max(G^-1 H)``: heavy ball with
  momentum ``mu a``, inside the unit disc whenever ``lr b < 2``. Checked on riemod's own step
  map with the layerwise ``G``, which does not commute with ``H``."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(B, 3)) * np.array([3.0, 1.0, 0.3]))
    t = jnp.asarray(rng.normal(size=(B, 2)))
    # Two dense modules (two layerwise blocks), the model linear in its parameters.
    f = lambda p, v: riemod.nn.dense(p["a"], v) + riemod.nn.dense(p["b"], jnp.tanh(v))
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
    params = {k: {"kernel": jnp.asarray(rng.normal(size=(3, 2)))} for k in "ab"}
    geometry = riemod.Geometry(mass=0.3)   # a mass of the order of the Gram's eigenvalues
    _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                 params=params)
    g_dense = _dense_g(geometry, curv, geometry.init(params), params)
    h = _dense_h(f, x, loss_fn, params)
    assert np.linalg.norm(g_dense @ h - h @ g_dense) > 0.1 * np.linalg.norm(h)  # not commuting
    lam = scipy.linalg.eigh(h, g_dense, eigvals_only=True)[-1]
    for mu in (None, 0.5, 0.9, 0.99):
      radius = _step_map_radius(geometry, 0.99 * 2 / lam, mu, f, x, loss_fn, params)
      assert radius < 1.0, (mu, radius)
    # The edge is real: just past it the plain step diverges ...
    assert _step_map_radius(geometry, 1.05 * 2 / lam, None, f, x, loss_fn, params) > 1.0
    # ... and so does momentum past the heavy-ball edge 2 (1 + mu) / lam.
    assert _step_map_radius(geometry, 1.05 * 2 * 1.5 / lam, 0.5, f, x, loss_fn, params) > 1.0


def test_memory_keeps_the_rate_of_the_sharpest_recent_batch():
  """With ``memory``, the rate is set from ``max(new estimate, memory * previous reference)``: a
  flat batch after a sharp one does not raise the rate past what the sharp one allowed."""
  with jax.enable_x64(True):
    f, x, loss_fn, params = _least_squares()
    n = ravel_pytree(params)[0].shape[0]
    lams = []
    for scale in (3.0, 1.0):   # the same model on a sharp batch (3x the inputs), then a flat one
      h = _dense_h(f, scale * x, loss_fn, params)
      _, _, curv = riemod.value_grad_and_curvature(f, scale * x, loss_fn,
                                                   riemod.metrics.identity(), params=params)
      geometry = riemod.Geometry(mass=100.0)   # so that lam_max follows the batch's scale
      lams.append(scipy.linalg.eigh(h, _dense_g(geometry, curv, geometry.init(params), params),
                                    eigvals_only=True)[-1])
    assert lams[1] < 0.5 * lams[0]
    for memory, reference in ((0.0, lams[1]), (0.5, max(lams[1], 0.5 * lams[0]))):
      tx = certified_layerwise_natural_gradient(geometry=riemod.Geometry(100.0), every=1, num_steps=n, memory=memory)
      state = tx.init(params)
      for scale in (3.0, 1.0):   # parameters kept: the curvature is that of each batch
        _, state, *_ = _update(tx, state, f, scale * x, loss_fn, params)
      np.testing.assert_allclose(float(state.lam_max), lams[1], rtol=1e-6)  # the latest estimate
      np.testing.assert_allclose(float(state.edge_lam), reference, rtol=1e-6)
      np.testing.assert_allclose(float(state.learning_rate), 2 * 0.5 / reference, rtol=1e-6)


def test_full_hessian_option_matches_eigh_on_a_nonlinear_net():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x, t = jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=(8, 2)))
    f = lambda p, v: jnp.tanh(v @ p["w1"]) @ p["w2"]
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
    params = {"w1": jnp.asarray(rng.normal(size=(3, 4))),
              "w2": jnp.asarray(rng.normal(size=(4, 2)))}
    flat, unravel = ravel_pytree(params)
    n = flat.shape[0]
    jac = np.asarray(jax.jacrev(lambda v: f(unravel(v), x).ravel())(flat))
    g_dense = jac.T @ jac / 8 + MASS * np.eye(n)
    h = _dense_h(f, x, loss_fn, params)
    for hessian, matrix in (("full", h), ("gauss_newton", jac.T @ jac / 8)):
      tx = certified_natural_gradient(geometry=riemod.Geometry(MASS, structure="full"), num_steps=n, hessian=hessian)
      _, state, *_ = _update(tx, tx.init(params), f, x, loss_fn, params)
      expected = scipy.linalg.eigh(matrix, g_dense, eigvals_only=True)[-1]
      np.testing.assert_allclose(float(state.lam_max), expected, rtol=1e-6)


def test_clear_errors():
  f, x, loss_fn, params = _least_squares()
  with pytest.raises(ValueError, match="fraction"):
    certified_layerwise_natural_gradient(fraction=1.5)
  with pytest.raises(ValueError, match="every"):
    certified_layerwise_natural_gradient(every=0)
  with pytest.raises(ValueError, match="hessian"):
    certified_layerwise_natural_gradient(hessian="fisher")
  with pytest.raises(ValueError, match="scale_by_metric"):
    controlled(optax.sgd(0.1), riemod.Geometry()).init(params)
  tx = certified_layerwise_natural_gradient()
  loss, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                  params=params)
  with pytest.raises(ValueError, match="apply_fn"):
    tx.update(g, tx.init(params), params, curvature=curv, value=loss)


# --------------------------------------------------------------------------- certify() verdicts
# The 20-parameter tanh network of test_certify_verdict and its exact natural-gradient runs.


def test_certify_alone_judges_the_step_on_the_gauss_newton_edge():
  """certify() without any extra call: a converging run is not "unstable", 10x its step is."""
  with jax.enable_x64(True):
    x, loss_fn, w = _problem()
    jac = np.asarray(jax.jacrev(lambda v: _net({"w": v}, x).ravel())(w))
    g = jac.T @ jac / N + MASS * np.eye(w.shape[0])
    gn = scipy.linalg.eigh(jac.T @ jac / N, g, eigvals_only=True)
    certified = lambda lr: certify(_net, x, loss_fn, riemod.metrics.identity(), learning_rate=lr,
                                   params={"w": w}, num_lanczos=w.shape[0],
                                   num_power_iterations=5)
    converging = _run(x, loss_fn, w, 1.0, 40)
    assert converging[-1] < 0.01 * converging[0]
    report = certified(1.0)
    np.testing.assert_allclose(report.network["gauss_newton"]["lam_max"], gn[-1], rtol=1e-6)
    assert not report.verdict.startswith("unstable")
    assert report.verdict_detail.gauss_newton_edge_ratio < 1
    diverging = _run(x, loss_fn, w, 10.0, 15)
    assert max(diverging[1:]) > 10 * diverging[0]
    report = certified(10.0)
    assert report.verdict.startswith("unstable") and "Gauss-Newton" in report.verdict
    assert "Gauss-Newton model" in report.table()


def _exponential_fit(n=40):
  """An exponential-sum fit with an ill-conditioned Gauss-Newton Gramian (float64)."""
  x = jnp.linspace(0.0, 1.0, n)
  f = lambda p, x: (p["a"][0] * jnp.exp(p["b"][0] * x) + p["a"][1] * jnp.exp(p["b"][1] * x)
                    + p["c"] * x ** 3)
  target = 2.0 * jnp.exp(-x) + 0.5 * jnp.exp(-1.1 * x) + 0.1 * x ** 3
  loss_fn = lambda y: 0.5 * jnp.mean((y - target) ** 2)
  params = {"a": jnp.array([1.0, 0.3]), "b": jnp.array([-0.5, -1.0]), "c": jnp.asarray(0.0)}
  return f, x, loss_fn, params


def test_precision_cutoff_keeps_what_the_precision_check_accepts():
  from riemod.composer import precision_cutoff
  with jax.enable_x64(True):
    # A degree-11 polynomial fit on [0, 1]: the Gramian's eigenvalues span ~17 decades.
    x = jnp.linspace(0.0, 1.0, 40)
    f = lambda p, x: jnp.vander(x, 12) @ p["w"]
    loss_fn = lambda y: 0.5 * jnp.mean((y - jnp.sin(3.0 * x)) ** 2)
    params = {"w": jnp.zeros(12)}
    gram = np.asarray(jnp.vander(x, 12).T @ jnp.vander(x, 12) / x.shape[0])
    s = np.linalg.eigvalsh(gram)
    cut = precision_cutoff(1e-2)
    assert cut == pytest.approx(4 * np.finfo(np.float64).eps / 1e-2)
    assert s[0] < 1e-3 * cut * s[-1]  # directions far below the cut-off exist

    def step(cutoff):
      geometry = riemod.Geometry(mass=cutoff * 1e-6, structure="full", cutoff=cutoff)
      tx = riemod.natural_gradient(1.0, geometry=geometry, max_error=1e-2)
      loss, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                      params=params)
      u, _ = tx.update(g, tx.init(params), params, curvature=curv)
      return np.asarray(g["w"]), np.asarray(u["w"])

    g, u = step(cut)
    # Dense reference: the minimum-norm least-squares step with the same relative cut-off
    # (the mass, 1e-6 of the smallest kept eigenvalue, changes it below the tolerance).
    expected = -np.linalg.lstsq(gram, g, rcond=cut)[0]
    np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # A 100x smaller cut-off keeps directions the check cannot trust: refused.
    with pytest.raises(riemod.StepRefusedError, match="relative error"):
      step(cut / 100)


def test_certified_gauss_newton_first_step_is_the_searched_least_squares_step():
  from riemod.composer import precision_cutoff
  with jax.enable_x64(True):
    f, x, loss_fn, params = _exponential_fit()
    tx = riemod.certify.certified_gauss_newton()
    cut = precision_cutoff(1e-2)
    loss, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                    params=params)
    value_fn = lambda p: loss_fn(f(p, x))
    u, state = tx.update(g, tx.init(params), params, curvature=curv, value=loss,
                         value_fn=value_fn, apply_fn=lambda p: f(p, x), loss_fn=loss_fn)
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacrev(lambda v: f(unravel(v), x))(flat))
    gram = jac.T @ jac / x.shape[0]
    # The Gauss-Newton direction on the kept eigenvalues lam >= cut lam_max, each damped by the
    # mass (= the cut-off): sum v v^T g / (lam + mass) ...
    lam, vec = np.linalg.eigh(gram)
    keep = lam >= cut * lam[-1]
    coefficients = vec.T @ np.asarray(ravel_pytree(g)[0]) / (lam + cut)
    direction = -vec[:, keep] @ coefficients[keep]
    # ... at the certified rate 2 * 0.5 / lam_max(G^+ H_GN) = 1 ...
    controller = riemod.find_state(state, ControllerState)
    assert float(controller.lam_max) == pytest.approx(1.0, abs=1e-8)
    assert float(controller.learning_rate) == pytest.approx(1.0, abs=1e-8)
    # ... scaled by the grid point 2 * 0.5^k with the lowest loss (ties to the larger).
    losses = [float(value_fn(unravel(flat + 2.0 * 0.5 ** k * direction))) for k in range(31)]
    best = 2.0 * 0.5 ** int(np.argmin(losses))
    # (eps times the Gramian's condition ~1e10: agreement to ~1e-6 of the step's size.)
    np.testing.assert_allclose(np.asarray(ravel_pytree(u)[0]), best * direction, rtol=0,
                               atol=1e-5 * np.abs(best * direction).max())
    lm = riemod.find_state(state, riemod.certify.LevenbergMarquardtState)
    assert np.isfinite(float(lm.ratio))
    # Training reaches the fit's noise-free optimum.
    @jax.jit
    def step(p, s):
      value, grads, curvature = riemod.value_grad_and_curvature(
          f, x, loss_fn, riemod.metrics.identity(), params=p)
      u, s = tx.update(grads, s, p, curvature=curvature, value=value, value_fn=value_fn,
                       apply_fn=lambda q: f(q, x), loss_fn=loss_fn)
      return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(40):
      p, s = step(p, s)
    assert float(value_fn(p)) < 1e-12


def test_certified_gauss_newton_clear_errors():
  with pytest.raises(ValueError, match="fraction"):
    riemod.certify.certified_gauss_newton(fraction=1.5)
  with pytest.raises(ValueError, match="num="):
    riemod.certify.certified_gauss_newton(num=0)
  with pytest.raises(ValueError, match="max_error"):
    riemod.certify.certified_gauss_newton(max_error=0.0)

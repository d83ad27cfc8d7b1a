"""Steps against dense damped Gauss-Newton solves; optax, NNX, Linen and plain-function paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import riemod
from conftest import assert_close, dense_factor_rows, dense_metric, flat


class _MLP(linen.Module):
  @linen.compact
  def __call__(self, x):
    hidden = jnp.tanh(linen.Dense(5)(x))
    return linen.Dense(3)(hidden)


def _problem(dtype, batch=6):
  x = jax.random.normal(jax.random.key(1), (batch, 4), dtype)
  targets = jax.random.normal(jax.random.key(2), (batch, 3), dtype)
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - targets) ** 2, -1))
  variables = jax.tree.map(lambda a: a.astype(dtype), _MLP().init(jax.random.key(0), x))
  return x, loss_fn, variables


def _dense_reference(variables, x, loss_fn, masses, structure):
  apply = _MLP().apply
  outputs = apply(variables, x)
  rows = riemod.metrics.identity()(outputs) / jnp.sqrt(jnp.asarray(x.shape[0], outputs.dtype))
  k = dense_factor_rows(apply, variables, x, rows)
  g = flat(jax.grad(lambda p: loss_fn(apply(p, x)))(variables))
  leaves = jax.tree.leaves(variables)
  inv = [jnp.asarray(1.0 / m, leaf.dtype) for m, leaf in zip(masses, leaves)]
  if structure == "full":
    return jnp.linalg.solve(dense_metric(k, inv), g)
  # Layerwise: one block per module (bias + kernel of each Dense), solved separately.
  out, start = [], 0
  for block in ((0, 1), (2, 3)):
    size = sum(leaves[i].size for i in block)
    gm = dense_metric([k[i] for i in block], [inv[i] for i in block])
    out.append(jnp.linalg.solve(gm, g[start:start + size]))
    start += size
  return jnp.concatenate(out)


@pytest.mark.parametrize("structure", ["layerwise", "full"])
@pytest.mark.parametrize("space", ["sample", "parameter"])
def test_step_equals_dense_damped_gauss_newton(structure, space, dtype):
  x, loss_fn, variables = _problem(dtype)

  def step(tx):
    _, grads, curv = riemod.value_grad_and_curvature(
        _MLP().apply, x, loss_fn, riemod.metrics.identity(), params=variables)
    return tx.update(grads, tx.init(variables), variables, curvature=curv)

  updates, state = jax.jit(lambda: step(riemod.scale_by_metric(
      riemod.Geometry(mass=0.3, structure=structure, space=space), residuals=True)))()
  expected = _dense_reference(variables, x, loss_fn, [0.3] * 4, structure)
  assert_close(flat(updates), expected, dtype)
  assert float(np.nanmax(state.report.residual)) < (1e-4 if dtype == jnp.float32 else 1e-10)
  g = flat(jax.grad(lambda p: loss_fn(_MLP().apply(p, x)))(variables))
  assert_close(state.report.metric_grad_norm_sq, jnp.vdot(g, expected), dtype)
  # Iterative refinement of the small solves solves the same system, with a residual against
  # the operator as small.
  refined, state = jax.jit(lambda: step(riemod.scale_by_metric(riemod.Geometry(
      mass=0.3, structure=structure, space=space, refinement_steps=1), residuals=True)))()
  assert_close(flat(refined), expected, dtype)
  assert float(np.nanmax(state.report.residual)) < (1e-4 if dtype == jnp.float32 else 1e-10)


def test_per_parameter_masses_match_dense(dtype):
  x, loss_fn, variables = _problem(dtype)
  leaves = jax.tree.leaves(variables)
  masses = [np.linspace(0.1, 2.0, leaf.size).reshape(leaf.shape) for leaf in leaves]
  names = jax.tree.map(lambda _: None, variables)
  del names
  declarations = {
      "params/Dense_0": {"mass": {"bias": masses[0], "kernel": masses[1]}},
      "params/Dense_1": {"mass": {"bias": masses[2], "kernel": masses[3]}},
  }
  tx = riemod.scale_by_metric(riemod.Geometry(mass=1.0))
  _, grads, curv = jax.jit(lambda p: riemod.value_grad_and_curvature(
      _MLP().apply, x, loss_fn, riemod.metrics.identity(), params=p,
      declarations=declarations))(variables)
  updates, _ = tx.update(grads, tx.init(variables), variables, curvature=curv)
  expected = _dense_reference(variables, x, loss_fn, [jnp.asarray(m, dtype) for m in masses],
                              "layerwise")
  assert_close(flat(updates), expected, dtype)


def test_kinds_euclidean_frozen_and_large_mass_is_sgd():
  rngs = nnx.Rngs(0)
  model = riemod.nn.Sequential(
      riemod.nn.Dense(4, 5, rngs=rngs), jnp.tanh,
      riemod.nn.Dense(5, 5, kind="euclidean", mass=4.0, rngs=rngs),
      riemod.nn.Dense(5, 3, kind="frozen", rngs=rngs))
  x = jax.random.normal(jax.random.key(1), (6, 4))
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum(y**2, -1))
  _, grads, curv = riemod.value_grad_and_curvature(model, x, loss_fn, riemod.metrics.identity())
  pure = nnx.as_pure(grads)
  tx = riemod.layerwise_natural_gradient(learning_rate=0.5, mass=1e-2)
  updates, _ = tx.update(pure, tx.init(pure), curvature=curv)
  np.testing.assert_allclose(updates["layers"][2]["kernel"], -0.5 * pure["layers"][2]["kernel"] / 4.0,
                             rtol=1e-6)
  assert not np.any(updates["layers"][3]["kernel"]) and not np.any(updates["layers"][3]["bias"])
  # mass -> infinity: the Riemannian step becomes SGD with learning rate lr / mass.
  big = 1e6
  tx = riemod.layerwise_natural_gradient(learning_rate=0.5, mass=big)
  updates, _ = tx.update(pure, tx.init(pure), curvature=curv)
  sgd = jax.tree.map(lambda g: -0.5 / big * g, pure["layers"][0])
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(updates["layers"][0][name], sgd[name], rtol=1e-4)


def test_nnx_linen_and_plain_function_give_the_same_update():
  x, loss_fn, variables = _problem(jnp.float32)
  dense0, dense1 = variables["params"]["Dense_0"], variables["params"]["Dense_1"]

  class NNXMLP(nnx.Module):
    def __init__(self):
      self.a = riemod.nn.Dense(4, 5, rngs=nnx.Rngs(0))
      self.b = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
      self.a.kernel.value, self.a.bias.value = dense0["kernel"], dense0["bias"]
      self.b.kernel.value, self.b.bias.value = dense1["kernel"], dense1["bias"]

    def __call__(self, x):
      return self.b(jnp.tanh(self.a(x)))

  def plain(p, x):
    h = jnp.tanh(x @ p["params"]["Dense_0"]["kernel"] + p["params"]["Dense_0"]["bias"])
    return h @ p["params"]["Dense_1"]["kernel"] + p["params"]["Dense_1"]["bias"]

  tx = riemod.natural_gradient(learning_rate=0.1, mass=0.05)
  results = []
  for model, params in ((_MLP().apply, variables), (plain, variables)):
    _, grads, curv = riemod.value_grad_and_curvature(model, x, loss_fn, riemod.metrics.identity(),
                                                     params=params)
    updates, _ = tx.update(grads, tx.init(params), params, curvature=curv)
    u = updates["params"]
    results.append(jnp.concatenate([u["Dense_0"]["bias"], u["Dense_0"]["kernel"].ravel(),
                                    u["Dense_1"]["bias"], u["Dense_1"]["kernel"].ravel()]))
  model = NNXMLP()
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))

  @nnx.jit
  def train_step(model, opt, x):
    _, grads, curv = riemod.value_grad_and_curvature(model, x, loss_fn, riemod.metrics.identity())
    opt.update(model, grads, curvature=curv)

  train_step(model, opt, x)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  u = jax.tree.map(lambda a, b: a - b, after, before)
  results.append(jnp.concatenate([u["a"]["bias"], u["a"]["kernel"].ravel(), u["b"]["bias"],
                                  u["b"]["kernel"].ravel()]))
  scale = float(jnp.abs(results[0]).max())
  np.testing.assert_allclose(results[1] / scale, results[0] / scale, atol=2e-5)
  np.testing.assert_allclose(results[2] / scale, results[0] / scale, atol=2e-5)


def test_jit_chain_inject_hyperparams_and_training_decreases_loss():
  x, loss_fn, variables = _problem(jnp.float32, batch=16)
  schedule = optax.linear_schedule(0.5, 0.2, 20)

  def run(tx, params):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      loss, grads, curv = riemod.value_grad_and_curvature(
          _MLP().apply, x, loss_fn, riemod.metrics.identity(), params=params)
      updates, state = tx.update(grads, state, params, curvature=curv, value=loss)
      return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(20):
      params, state, loss = step(params, state)
      losses.append(float(loss))
    return params, state, losses

  injected = optax.chain(optax.clip_by_global_norm(10.0), optax.add_decayed_weights(1e-4),
                         optax.inject_hyperparams(riemod.layerwise_natural_gradient)(
                             learning_rate=schedule, mass=0.1))
  direct = optax.chain(optax.clip_by_global_norm(10.0), optax.add_decayed_weights(1e-4),
                       riemod.layerwise_natural_gradient(learning_rate=schedule, mass=0.1))
  params_a, state, losses = run(injected, variables)
  params_b, _, losses_b = run(direct, variables)
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert all(b <= a for a, b in zip(losses, losses[1:]))  # damped Gauss-Newton descends here
  inner = riemod.find_state(state, riemod.ActionState)
  assert int(inner.count) == 20
  assert float(inner.initial_loss) == pytest.approx(losses[0])
  assert float(inner.last_loss) == pytest.approx(losses[-1])
  assert float(inner.action) > 0


def test_missing_or_foreign_curvature_and_bad_arguments():
  x, loss_fn, variables = _problem(jnp.float32)
  tx = riemod.layerwise_natural_gradient(0.1)
  state = tx.init(variables)
  grads = jax.tree.map(jnp.ones_like, variables)
  with pytest.raises(ValueError, match="curvature"):
    tx.update(grads, state, variables)
  other = {"w": jnp.ones((4, 2))}
  _, _, foreign = riemod.value_grad_and_curvature(
      lambda p, x: x @ p["w"], x, lambda y: jnp.mean(y**2), riemod.metrics.identity(), params=other)
  with pytest.raises(ValueError, match="that the curvature does not have"):
    tx.update(grads, state, variables, curvature=foreign)
  for bad in (dict(mass=0.0), dict(mass=-2.0), dict(mass=float("inf"))):
    with pytest.raises(ValueError, match="mass"):
      riemod.layerwise_natural_gradient(0.1, **bad)
  with pytest.raises(ValueError, match="on_nonfinite"):
    riemod.layerwise_natural_gradient(0.1, on_nonfinite="warn")


def test_nonfinite_error_and_skip():
  x, loss_fn, variables = _problem(jnp.float32)
  _, grads, curv = riemod.value_grad_and_curvature(
      _MLP().apply, x, loss_fn, riemod.metrics.identity(), params=variables)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)

  tx = riemod.layerwise_natural_gradient(0.1)
  update = jax.jit(lambda g, s: tx.update(g, s, variables, curvature=curv))
  with pytest.raises(Exception, match="non-finite values in the gradient"):
    jax.block_until_ready(update(bad, tx.init(variables)))

  # The check also works under jax.vmap: finite lanes pass, a non-finite lane raises.
  state0 = tx.init(variables)
  batched = jax.jit(jax.vmap(lambda g: tx.update(g, state0, variables, curvature=curv)[0]))
  two = jax.tree.map(lambda a, b: jnp.stack([a, b]), grads, grads)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(batched(two)))
  with pytest.raises(Exception, match="non-finite values in the gradient"):
    jax.block_until_ready(batched(jax.tree.map(lambda a, b: jnp.stack([a, b]), grads, bad)))

  tx = riemod.layerwise_natural_gradient(0.1, on_nonfinite="skip")
  update = jax.jit(lambda g, s: tx.update(g, s, variables, curvature=curv))
  state = tx.init(variables)
  updates, state = update(bad, state)
  assert all(not np.any(u) for u in jax.tree.leaves(updates))
  count = lambda s: int(riemod.find_state(s, riemod.ActionState).count)
  assert int(state.skipped_steps) == 1 and count(state) == 0
  updates, state = update(grads, state)
  assert int(state.skipped_steps) == 1 and count(state) == 1
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_module_diagnostics_report_each_module():
  x, loss_fn, variables = _problem(jnp.float32)
  _, grads, curv = riemod.value_grad_and_curvature(
      _MLP().apply, x, loss_fn, riemod.metrics.identity(), params=variables)
  tx = riemod.layerwise_natural_gradient(0.1, mass=0.01, residuals=True)
  _, state = tx.update(grads, tx.init(variables), variables, curvature=curv)
  diag = riemod.module_diagnostics(state, curv)
  assert set(diag) == {"params/Dense_0", "params/Dense_1"}
  for entry in diag.values():
    assert entry["condition"] >= 1.0 and entry["residual"] < 1e-4 and 0 < entry["error"] < 1e-3
  # Without residuals=True the residual is not measured, and says so.
  plain = riemod.layerwise_natural_gradient(0.1, mass=0.01)
  _, state = plain.update(grads, plain.init(variables), variables, curvature=curv)
  assert all(np.isnan(e["residual"]) for e in riemod.module_diagnostics(state, curv).values())


def _dense_gauss_newton(variables, x, structure):
  """``K^T K`` of ``_MLP`` (identity output metric) as a dense float64 matrix: per-module diagonal
  blocks for ``"layerwise"``, the whole matrix for ``"full"``."""
  outputs = _MLP().apply(variables, x)
  rows = riemod.metrics.identity()(outputs) / jnp.sqrt(jnp.asarray(x.shape[0], outputs.dtype))
  k = dense_factor_rows(_MLP().apply, variables, x, rows)
  sizes = [leaf.size for leaf in jax.tree.leaves(variables)]
  blocks = [(0, 1), (2, 3)] if structure == "layerwise" else [(0, 1, 2, 3)]
  kk = np.zeros((sum(sizes), sum(sizes)))
  offsets = np.cumsum([0] + sizes)
  for block in blocks:
    kb = np.concatenate([np.asarray(k[i], np.float64).reshape(k[i].shape[0], -1) for i in block],
                        axis=1)
    lo, hi = offsets[block[0]], offsets[block[-1] + 1]
    kk[lo:hi, lo:hi] = kb.T @ kb
  return kk


@pytest.mark.parametrize("structure, space", [("layerwise", "auto"), ("full", "sample"),
                                              ("full", "parameter")])
def test_spring_momentum_matches_its_defining_formula(structure, space, dtype):
  """``phi_k = mu phi_{k-1} + G^{-1}(g_k - mu K^T K phi_{k-1})`` with dense matrices."""
  x, loss_fn, variables = _problem(dtype)
  mu, mass = 0.7, 0.2
  _, _, curv = jax.jit(lambda p: riemod.value_grad_and_curvature(
      _MLP().apply, x, loss_fn, riemod.metrics.identity(), params=p))(variables)
  tx = riemod.scale_by_metric(riemod.Geometry(mass=mass, structure=structure, space=space),
                              momentum=mu)
  update = jax.jit(lambda g, s: tx.update(g, s, variables, curvature=curv))
  kk = _dense_gauss_newton(variables, x, structure)
  g_matrix = kk + np.eye(len(kk)) * mass
  state, phi = tx.init(variables), np.zeros(len(kk))
  for step in range(3):
    g_tree = jax.tree.map(lambda v, s=step: jax.random.normal(jax.random.key(10 + s), v.shape, dtype),
                          variables)
    updates, state = update(g_tree, state)
    g = np.asarray(flat(g_tree), np.float64)
    phi = mu * phi + np.linalg.solve(g_matrix, g - mu * kk @ phi)
    assert_close(flat(updates), phi, dtype)
    assert_close(state.report.metric_grad_norm_sq, g @ np.linalg.solve(g_matrix, g), dtype)
  with pytest.raises(ValueError, match="momentum"):
    riemod.layerwise_natural_gradient(0.1, momentum=1.0)


def test_mass_schedule_uses_the_mass_of_each_step(dtype):
  x, loss_fn, variables = _problem(dtype)
  _, grads, curv = riemod.value_grad_and_curvature(
      _MLP().apply, x, loss_fn, riemod.metrics.identity(), params=variables)
  schedule = optax.exponential_decay(1e-1, transition_steps=1, decay_rate=0.1)
  tx = riemod.layerwise_natural_gradient(0.5, mass=schedule)
  state = tx.init(variables)
  for step in range(3):
    updates, state = tx.update(grads, state, variables, curvature=curv)
    # The schedule's value at the int32 step count, as the transform evaluates it.
    fixed = riemod.layerwise_natural_gradient(
        0.5, mass=float(schedule(jnp.asarray(step, jnp.int32))))
    expected, _ = fixed.update(grads, fixed.init(variables), variables, curvature=curv)
    assert_close(flat(updates), flat(expected), dtype)
  # A schedule is not a fixed mass: the three steps above differ.
  first, _ = tx.update(grads, tx.init(variables), variables, curvature=curv)
  assert not np.allclose(flat(first), flat(updates))


def _rms_masses(grads_seq, variables, mass, decay, eps, dense):
  """The adaptive masses by their definition (numpy): bias-corrected EMA of g^2, then
  ``mass * a (x) b`` (rank one) for dense kernels and ``mass * (sqrt(v) + eps)`` elsewhere."""
  v = [np.zeros(np.shape(leaf)) for leaf in jax.tree.leaves(variables)]
  for step, grads in enumerate(grads_seq, start=1):
    v = [decay * vi + (1 - decay) * np.asarray(g, np.float64) ** 2
         for vi, g in zip(v, jax.tree.leaves(grads))]
  v = [vi / (1 - decay**step) for vi in v]
  if not dense:
    return [mass * (np.sqrt(vi) + eps) for vi in v]
  masses = []
  for bias, kernel in zip(v[0::2], v[1::2]):  # leaves per Dense: bias, kernel
    rows, cols = kernel.mean(1), kernel.mean(0)
    a = np.sqrt((rows + eps**2) / (rows.mean() + eps**2))
    b = np.sqrt(cols) + eps
    s = np.mean(np.sqrt(bias) + eps) / b.mean()
    masses += [mass * s * b, mass * np.outer(a, b)]
  return masses


@pytest.mark.parametrize("structure", ["layerwise", "full"])
@pytest.mark.parametrize("momentum", [None, 0.6])
def test_rms_mass_matches_dense_solve_with_its_diagonal(structure, momentum, dtype):
  """Dense layers: rank-one second-moment mass, solved by a change of variables; checked
  against ``(K^T K + D)^{-1}`` (SPRING: ``G^{-1}(g + mu D phi)``) with the dense diagonal."""
  x, loss_fn, variables = _problem(dtype)
  mass, decay, eps = 0.05, 0.9, 1e-6
  _, _, curv = jax.jit(lambda p: riemod.value_grad_and_curvature(
      _MLP().apply, x, loss_fn, riemod.metrics.identity(), params=p))(variables)
  tx = riemod.scale_by_metric(riemod.Geometry(
      mass=mass, structure=structure, mass_policy=riemod.masses.adaptive(decay, eps)),
      momentum=momentum)
  update = jax.jit(lambda g, s: tx.update(g, s, variables, curvature=curv))
  kk = _dense_gauss_newton(variables, x, structure)
  state, phi, seen = tx.init(variables), np.zeros(len(kk)), []
  for step in range(3):
    g_tree = jax.tree.map(
        lambda v, s=step: jax.random.normal(jax.random.key(20 + s), v.shape, dtype), variables)
    seen.append(g_tree)
    updates, state = update(g_tree, state)
    d = np.concatenate([m.ravel() for m in
                        _rms_masses(seen, variables, mass, decay, eps, dense=True)])
    g_matrix, g = kk + np.diag(d), np.asarray(flat(g_tree), np.float64)
    phi = np.linalg.solve(g_matrix, g + (momentum or 0.0) * d * phi)
    assert_close(flat(updates), phi, dtype)
    assert_close(state.report.metric_grad_norm_sq, g @ np.linalg.solve(g_matrix, g), dtype)


def test_rms_mass_on_the_generic_path_and_euclidean_modules(dtype):
  """Generic modules take the full diagonal ``mass (sqrt(v) + eps)``; a euclidean module without
  a declared mass then steps by ``g / (mass (|g| + eps))`` on its first step (Adam's sign step);
  declared masses are kept."""
  def apply(p, x):
    return jnp.tanh(x @ p[0]["w"]) @ p[1]["w"]
  x, loss_fn, _ = _problem(dtype)
  params = [{"w": jax.random.normal(jax.random.key(3), (4, 5), dtype)},
            {"w": jax.random.normal(jax.random.key(4), (5, 3), dtype)}]
  mass, decay, eps = 0.1, 0.95, 1e-7
  _, grads, curv = riemod.value_grad_and_curvature(apply, x, loss_fn, riemod.metrics.identity(),
                                                   params=params)
  tx = riemod.scale_by_metric(riemod.Geometry(
      mass=mass, structure="full", mass_policy=riemod.masses.adaptive(decay, eps)))
  updates, state = tx.update(grads, tx.init(params), params, curvature=curv)
  outputs = apply(params, x)
  rows = riemod.metrics.identity()(outputs) / jnp.sqrt(jnp.asarray(x.shape[0], dtype))
  k = dense_factor_rows(apply, params, x, rows)
  masses = _rms_masses([grads], params, mass, decay, eps, dense=False)
  expected = jnp.linalg.solve(dense_metric(k, [jnp.asarray(1.0 / m, dtype) for m in masses]),
                              flat(grads))
  assert_close(flat(updates), expected, dtype)
  assert state.geometry.moments is not None

  rngs = nnx.Rngs(0)
  model = riemod.nn.Sequential(
      riemod.nn.Dense(4, 5, rngs=rngs), jnp.tanh,
      riemod.nn.Dense(5, 5, kind="euclidean", rngs=rngs),
      riemod.nn.Dense(5, 3, kind="euclidean", mass=4.0, rngs=rngs))
  _, grads, curv = riemod.value_grad_and_curvature(model, x, loss_fn, riemod.metrics.identity())
  pure = nnx.as_pure(grads)
  tx = riemod.layerwise_natural_gradient(learning_rate=1.0, geometry=riemod.Geometry(
      mass=mass, mass_policy=riemod.masses.adaptive(decay, eps)))
  updates, _ = tx.update(pure, tx.init(pure), curvature=curv)
  g = pure["layers"][2]["kernel"]  # riemod.nn layers hold float32 parameters in either mode
  assert_close(updates["layers"][2]["kernel"], -g / (mass * (jnp.abs(g) + eps)), jnp.float32)
  assert_close(updates["layers"][3]["kernel"], -pure["layers"][3]["kernel"] / 4.0, jnp.float32)
  with pytest.raises(ValueError, match="decay"):
    riemod.masses.adaptive(decay=1.0)

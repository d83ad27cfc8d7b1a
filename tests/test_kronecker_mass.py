"""The Kronecker mass policy against dense references built by hand.

``G = K^T K + mass (A (x) S)`` per dense module, with ``K`` from ``jax.jacrev`` of the per-sample
outputs, ``A`` from the layer inputs of a hand-written forward pass, ``S`` from the bias rows of the
dense ``K`` (a bias row of a dense layer is its pulled-back cotangent), and the factored damping
written out again here.
"""

from __future__ import annotations

import dataclasses
import warnings

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import riemod
from riemod.curvature.factors import DenseFactor

MASS, DAMPING, DECAY = 0.7, 3e-2, 0.9


def _model(dtype, conv=False):
  rngs = nnx.Rngs(0)
  if conv:
    return nnx.Sequential(
        nnx.Conv(2, 3, (2, 2), padding="VALID", rngs=rngs, param_dtype=dtype), jnp.tanh,
        lambda h: h.reshape(h.shape[0], -1),
        nnx.Linear(18, 2, rngs=rngs, param_dtype=dtype))
  # The middle layer is square without a bias (A and S both 4 x 4): swapping its A and S would
  # go unnoticed by shapes.
  return nnx.Sequential(nnx.Linear(3, 4, rngs=rngs, param_dtype=dtype), jnp.tanh,
                        nnx.Linear(4, 4, use_bias=False, rngs=rngs, param_dtype=dtype), jnp.tanh,
                        nnx.Linear(4, 2, rngs=rngs, param_dtype=dtype))


def _data(dtype, conv=False, batch=6, seed=1):
  kx, ky = jax.random.split(jax.random.key(seed))
  shape = (batch, 3, 4, 2) if conv else (batch, 3)
  return jax.random.normal(kx, shape, dtype), jax.random.normal(ky, (batch, 2), dtype)


def _layer_inputs(model, x):
  """Inputs of every nnx.Linear/nnx.Conv, from a forward pass written out here."""
  inputs, h = [], x
  for layer in model.layers:
    if isinstance(layer, (nnx.Linear, nnx.Conv)):
      inputs.append(h)
    h = layer(h)
  return inputs


def _dense_layers(model):
  return [(i, layer) for i, layer in enumerate(model.layers)
          if isinstance(layer, (nnx.Linear, nnx.Conv))]


def _reference_factors(model, x, rows_k, index_tree):
  """Per layer ``(A, S, has_bias)``: ``A`` from the inputs (bias entry first), ``S = c^T c``."""
  out = []
  for (i, layer), h in zip(_dense_layers(model), _layer_inputs(model, x)):
    if isinstance(layer, nnx.Conv):
      kh, kw = layer.kernel.value.shape[:2]
      patches = jax.lax.conv_general_dilated_patches(
          h, (kh, kw), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      feats = np.asarray(patches).reshape(-1, patches.shape[-1])
    else:
      feats = np.asarray(h).reshape(-1, h.shape[-1])
    has_bias = getattr(layer, "bias", None) is not None and layer.bias.value is not None
    if has_bias:
      feats = np.concatenate([np.ones((feats.shape[0], 1)), feats], axis=1)
    a = feats.T @ feats / feats.shape[0]
    if isinstance(layer, nnx.Conv):
      # Cotangents at every output position: the rows pulled back to the conv's output.
      z = layer(h)
      rest = lambda z1: nnx.Sequential(*model.layers[i + 1:])(z1[None])[0]
      jac = jax.vmap(jax.jacrev(rest))(z)  # (B, out, H', W', C)
      c = np.asarray(jnp.moveaxis(jac, 1, 0)).reshape(-1, jac.shape[-1]) / np.sqrt(h.shape[0])
      s = c.T @ c
    elif has_bias:
      # For a dense layer the bias rows of K are the cotangents (one position).
      c = rows_k[:, np.asarray(index_tree["layers"][i]["bias"])]
      s = c.T @ c
    else:
      # No bias: recover c from the kernel rows, k_rs = x_s (x) c_rs, via the inputs.
      kernel_idx = np.asarray(index_tree["layers"][i]["kernel"])  # (in, out)
      batch = h.shape[0]
      k = rows_k[:, kernel_idx].reshape(rows_k.shape[0], *kernel_idx.shape)
      xs = np.tile(np.asarray(h), (rows_k.shape[0] // batch, 1))
      c = np.einsum("di,dio->do", xs, k) / np.sum(xs * xs, axis=1, keepdims=True)
      s = c.T @ c
    out.append((a, s, has_bias))
  return out


def _damped(a, s, damping=DAMPING):
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(s) / s.shape[0]))
  return a + pi * np.sqrt(damping) * np.eye(len(a)), s + np.sqrt(damping) / pi * np.eye(len(s))


def _theta_indices(model, index_tree, i, has_bias):
  """Flat parameter indices of the layer's ``[bias; kernel]`` matrix (``(1 + fan_in, out)``)."""
  kernel = np.asarray(index_tree["layers"][i]["kernel"])
  kernel = kernel.reshape(-1, kernel.shape[-1])
  if isinstance(model.layers[i], nnx.Conv):
    # patches are channel-major: feature = c * kh * kw + i * kw + j
    k4 = np.asarray(index_tree["layers"][i]["kernel"])
    kernel = np.transpose(k4, (2, 0, 1, 3)).reshape(-1, k4.shape[-1])
  if has_bias:
    return np.concatenate([np.asarray(index_tree["layers"][i]["bias"])[None], kernel], axis=0)
  return kernel


def _dense_system(model, x, y, structure="full"):
  """``(g, G, D, blocks)`` over the flat parameter vector, float64, all built by hand."""
  params = nnx.state(model, nnx.Param)
  pure = nnx.as_pure(params)
  flat, unravel = ravel_pytree(pure)
  n = flat.size
  index_tree = unravel(jnp.arange(n, dtype=flat.dtype))
  index_tree = jax.tree.map(lambda a: np.asarray(a).astype(int), index_tree)
  graphdef = nnx.graphdef(model)

  def outputs(theta, xs):
    return nnx.merge(graphdef, nnx.State(unravel(theta)))(xs)

  batch = x.shape[0]
  jac = jax.jacrev(outputs)(flat, x)  # (B, out, n)
  # identity metric on a batch mean: rows r-major, (r, s), scaled by 1/sqrt(B)
  rows_k = np.asarray(jnp.moveaxis(jac, 1, 0).reshape(-1, n)) / np.sqrt(batch)
  g = np.asarray(jax.grad(lambda t: 0.5 * jnp.mean(jnp.sum((outputs(t, x) - y) ** 2, -1)))(flat))
  d_mat = np.zeros((n, n))
  blocks = []
  for (i, _), (a, s, has_bias) in zip(_dense_layers(model),
                                      _reference_factors(model, x, rows_k, index_tree)):
    a_d, s_d = _damped(a, s)
    idx = _theta_indices(model, index_tree, i, has_bias).reshape(-1)
    d_mat[np.ix_(idx, idx)] = MASS * np.kron(a_d, s_d)
    blocks.append((idx, a_d, s_d, has_bias, i))
  gram = rows_k.T @ rows_k
  if structure == "layerwise":
    mask = np.zeros((n, n), bool)
    for idx, *_ in blocks:
      mask[np.ix_(idx, idx)] = True
    gram = np.where(mask, gram, 0.0)
  return g, gram + d_mat, d_mat, blocks, unravel, flat


def _loss(y):
  return lambda out: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))


def _geometry(structure="full", update_every=1):
  return riemod.Geometry(mass=MASS, structure=structure, mass_policy=riemod.masses.kronecker(
      decay=DECAY, damping=DAMPING, update_every=update_every))


def _flat(tree):
  return np.asarray(ravel_pytree(nnx.as_pure(tree) if isinstance(tree, nnx.State) else tree)[0])


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("structure", ["full", "layerwise"])
@pytest.mark.parametrize("conv", [False, True])
def test_step_matches_dense_kronecker_metric_float64(x64, structure, conv):
  model = _model(jnp.float64, conv)
  x, y = _data(jnp.float64, conv)
  geometry = _geometry(structure)
  _, grads, curv = riemod.value_grad_and_curvature(model, x, _loss(y), riemod.metrics.identity())
  state = geometry.advance(geometry.init(nnx.state(model, nnx.Param)), grads, curv)
  metric = geometry.compose(curv, state)
  g, g_mat, d_mat, _, unravel, _ = _dense_system(model, x, y, structure)
  np.testing.assert_allclose(_flat(grads), g, rtol=1e-12, atol=1e-14)
  expected = np.linalg.solve(g_mat, g)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(_flat(metric.solve(grads)), expected, rtol=0, atol=1e-9 * scale)
  # The optimizer's range-aware step is the same G^{-1} g.
  direction, report = metric.step(grads)
  np.testing.assert_allclose(_flat(direction), expected, rtol=0, atol=1e-9 * scale)
  v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), grads)
  vf = _flat(v)
  np.testing.assert_allclose(_flat(metric.matvec(v)), g_mat @ vf, rtol=1e-9,
                             atol=1e-11 * np.max(np.abs(g_mat @ vf)))
  np.testing.assert_allclose(_flat(metric.mass_times(v)), d_mat @ vf, rtol=1e-9,
                             atol=1e-11 * np.max(np.abs(d_mat @ vf)))
  np.testing.assert_allclose(float(report.metric_grad_norm_sq), g @ expected, rtol=1e-9)


def test_without_batch_rows_it_is_the_damped_kfac_step(x64):
  model = _model(jnp.float64)
  x, y = _data(jnp.float64)
  geometry = _geometry("layerwise")
  _, grads, curv = riemod.value_grad_and_curvature(model, x, _loss(y), riemod.metrics.identity())
  state = geometry.advance(geometry.init(nnx.state(model, nnx.Param)), grads, curv)
  # No batch rows: K = 0 (the moments already hold this batch's factors).
  empty = dataclasses.replace(curv, coordinates=None, modules=tuple(
      dataclasses.replace(m, factor=dataclasses.replace(m.factor, cotangents=0 * m.factor.cotangents))
      for m in curv.modules))
  step = _flat(geometry.compose(empty, state).solve(grads))
  g, _, _, blocks, _, _ = _dense_system(model, x, y)
  for idx, a_d, s_d, _, _ in blocks:
    g_theta = g[idx].reshape(a_d.shape[0], s_d.shape[0])
    kfac = np.linalg.solve(a_d, g_theta) @ np.linalg.inv(s_d) / MASS
    np.testing.assert_allclose(step[idx].reshape(g_theta.shape), kfac, rtol=1e-10,
                               atol=1e-12 * np.max(np.abs(kfac)))


def test_moving_averages_and_amortised_refactoring(x64):
  """After k steps the state holds the bias-corrected average of the k batch factors; the
  Cholesky factors are refreshed at steps 1, 4, 7 (update_every=3) from the average then."""
  model = _model(jnp.float64)
  geometry = _geometry("layerwise", update_every=3)
  state = geometry.init(nnx.state(model, nnx.Param))
  batch_factors, roots = [], []
  for step in range(5):
    x, y = _data(jnp.float64, seed=10 + step)
    _, grads, curv = riemod.value_grad_and_curvature(model, x, _loss(y), riemod.metrics.identity())
    # undamped batch factors of the middle (square) layer, kernel leaf 2, from the references
    batch_factors.append(_reference_factors(model, x, *_rows(model, x))[1][:2])
    state = geometry.advance(state, grads, curv)
    roots.append(np.asarray(state.moments["2"].inputs_root))
    k = step + 1
    weights = np.array([(1 - DECAY) * DECAY ** (k - 1 - j) for j in range(k)]) / (1 - DECAY ** k)
    avg_a = sum(w * a for w, (a, _) in zip(weights, batch_factors))
    avg_s = sum(w * s for w, (_, s) in zip(weights, batch_factors))
    np.testing.assert_allclose(np.asarray(state.moments["2"].inputs) / (1 - DECAY ** k), avg_a,
                               rtol=1e-10)
    np.testing.assert_allclose(np.asarray(state.moments["2"].outputs) / (1 - DECAY ** k), avg_s,
                               rtol=1e-10, atol=1e-14)
    if step % 3 == 0:
      a_d, s_d = _damped(avg_a, avg_s)
      np.testing.assert_allclose(roots[-1], np.linalg.cholesky(a_d), rtol=1e-10)
      np.testing.assert_allclose(np.asarray(state.moments["2"].outputs_root),
                                 np.linalg.cholesky(s_d), rtol=1e-10, atol=1e-14)
      np.testing.assert_allclose(np.asarray(state.moments["2"].inputs_inverse),
                                 np.linalg.inv(np.linalg.cholesky(a_d)), rtol=1e-8, atol=1e-12)
    else:
      np.testing.assert_array_equal(roots[-1], roots[-2])


def _rows(model, x):
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  flat, unravel = ravel_pytree(params)
  index_tree = jax.tree.map(lambda a: np.asarray(a).astype(int),
                            unravel(jnp.arange(flat.size, dtype=flat.dtype)))
  graphdef = nnx.graphdef(model)
  jac = jax.jacrev(lambda t: nnx.merge(graphdef, nnx.State(unravel(t)))(x))(flat)
  return np.asarray(jnp.moveaxis(jac, 1, 0).reshape(-1, flat.size)) / np.sqrt(x.shape[0]), \
      index_tree


def test_float32_step_within_its_error_estimate():
  with jax.enable_x64(True):
    model64 = _model(jnp.float64)
    x, y = _data(jnp.float64, batch=16)
    g, g_mat, *_ = _dense_system(model64, x, y, "layerwise")
    expected = np.linalg.solve(g_mat, g)
    model64_layers = [np.asarray(l) for l in jax.tree.leaves(nnx.state(model64, nnx.Param))]
  model = _model(jnp.float32)
  for leaf, value in zip(jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(
      v, nnx.Variable)), model64_layers):
    leaf.value = jnp.asarray(value, jnp.float32)
  geometry = _geometry("layerwise")
  tx = riemod.scale_by_metric(geometry)
  opt_state = tx.init(nnx.state(model, nnx.Param))
  x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  _, grads, curv = riemod.value_grad_and_curvature(model, x32, _loss(y32),
                                                   riemod.metrics.identity())
  direction, opt_state = tx.update(grads, opt_state, curvature=curv)
  got = _flat(direction).astype(np.float64)
  # Per module: the measured float32 error against the float64 reference, and the estimate.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  _, unravel = ravel_pytree(params)
  errors = np.asarray(opt_state.report.error)
  for slot, key in enumerate(["0", "2", "4"]):
    got_m = ravel_pytree(unravel(jnp.asarray(got))["layers"][int(key)])[0]
    exp_m = ravel_pytree(unravel(jnp.asarray(expected))["layers"][int(key)])[0]
    measured = float(jnp.linalg.norm(got_m - exp_m) / jnp.linalg.norm(exp_m))
    assert np.isfinite(errors[slot])
    # The estimate bounds the float32 round-off (with a floor of a few eps of the inputs' own
    # float32 rounding, which the estimate of the solve does not see).
    assert measured <= max(errors[slot], 50 * np.finfo(np.float32).eps), (slot, measured,
                                                                          errors[slot])


@pytest.mark.slow  # 53 s in make test (2 workers)
def test_state_round_trip_jit_and_optimizer():
  geometry = _geometry("layerwise", update_every=2)
  tx = optax.chain(riemod.scale_by_metric(geometry, momentum=0.5), optax.scale(-0.1))
  # The same network as a plain function of a dict (riemod.nn.dense layers), so the optimizer
  # state is plain pytrees that flax.serialization handles.
  keys = jax.random.split(jax.random.key(3), 3)
  params = {f"l{i}": {"kernel": 0.5 * jax.random.normal(k, shape), "bias": jnp.zeros(shape[1])}
            for i, (k, shape) in enumerate(zip(keys, [(3, 4), (4, 4), (4, 2)]))}
  f = lambda p, xs: riemod.nn.dense(p["l2"], jnp.tanh(riemod.nn.dense(
      p["l1"], jnp.tanh(riemod.nn.dense(p["l0"], xs)))))

  @jax.jit
  def step(p, s, xs, ys):
    _, grads, curv = riemod.value_grad_and_curvature(f, xs, _loss(ys), riemod.metrics.identity(),
                                                     params=p)
    updates, s = tx.update(grads, s, p, curvature=curv)
    return optax.apply_updates(p, updates), s

  def run(p, s, seeds):
    for seed in seeds:
      xs, ys = _data(jnp.float32, seed=seed)
      p, s = step(p, s, xs, ys)
    return p, s

  state = tx.init(params)
  p_mid, s_mid = run(params, state, [1, 2, 3])
  restored = flax.serialization.from_bytes(tx.init(params), flax.serialization.to_bytes(s_mid))
  p_a, _ = run(p_mid, s_mid, [4, 5, 6])
  p_b, _ = run(p_mid, restored, [4, 5, 6])
  for a, b in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # jit = eager
  with jax.disable_jit():
    p_eager, _ = run(params, tx.init(params), [1, 2])
  p_jit, _ = run(params, tx.init(params), [1, 2])
  for a, b in zip(jax.tree.leaves(p_eager), jax.tree.leaves(p_jit)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_generic_modules_keep_a_constant_mass_in_the_constant_unit_and_curvature_is_required(x64):
  geometry = _geometry("layerwise")
  params = {"w": jnp.ones((3,))}
  f = lambda p, xs: jnp.sin(xs @ p["w"])[:, None]
  x = jnp.linspace(0.0, 1.0, 12).reshape(4, 3)
  _, grads, curv = riemod.value_grad_and_curvature(
      f, x, lambda out: 0.5 * jnp.mean(out ** 2), riemod.metrics.identity(), params=params)
  state = geometry.init(params)
  assert state.moments == {}
  with pytest.raises(ValueError, match="curvature"):
    geometry.advance(state, grads)
  state = geometry.advance(state, grads, curv)
  # The constant policy's unit: D = mass * 1e-2 I (A (x) S is relative, a constant mass is not).
  # Dense reference: G = J^T J / B + mass * 1e-2 I for the identity metric on the batch mean.
  jac = np.asarray(jax.jacrev(lambda w: f({"w": w}, x)[:, 0])(params["w"]))  # (B, 3)
  unit = riemod.masses.ConstantMass.default_mass / riemod.masses.KroneckerMass.default_mass
  g_mat = jac.T @ jac / x.shape[0] + MASS * unit * np.eye(3)
  expected = np.linalg.solve(g_mat, np.asarray(grads["w"]))
  np.testing.assert_allclose(np.asarray(geometry.compose(curv, state).solve(grads)["w"]),
                             expected, rtol=1e-12)
  assert not np.allclose(np.linalg.solve(jac.T @ jac / x.shape[0] + MASS * np.eye(3),
                                         np.asarray(grads["w"])), expected, rtol=1e-3)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="decay"):
    riemod.masses.kronecker(decay=1.0)
  with pytest.raises(ValueError, match="damping"):
    riemod.masses.kronecker(damping=0.0)
  with pytest.raises(ValueError, match="update_every"):
    riemod.masses.kronecker(update_every=0)


def test_attention_projections_take_the_kronecker_mass(x64):
  # Query/key/value kernels are (in, heads, head_dim): the Kronecker state must be sized from the
  # bias's shape (heads, head_dim), not from the kernel's last axis (they silently kept the
  # constant mass). Reference: G = K^T K + D, D = mass (A_d (x) S_d) on each dense module's
  # [bias; kernel] matrix (kernel flattened (fan_in, fan_out), row-major), mass * 1e-2 elsewhere
  # (embeddings, norms: the constant policy's unit); A and
  # S from the module's measured inputs and cotangents, the damping written out again.
  import test_sequence as seq  # pylint: disable=import-outside-toplevel

  model = seq.LM()
  ids, targets = seq._data()
  geometry = riemod.Geometry(mass=MASS, structure="full", mass_policy=riemod.masses.kronecker(
      decay=DECAY, damping=DAMPING))
  _, grads, curv = riemod.value_grad_and_curvature(model, ids, seq._ce(targets),
                                                   riemod.metrics.softmax_fisher())
  params = nnx.state(model, nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter("error")         # no module is left on the constant mass
    state = geometry.advance(geometry.init(params), grads, curv)
  k = seq._rows_matrix(curv)
  sizes = [int(np.prod(s)) for s in curv.leaf_shapes]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  unit = riemod.masses.ConstantMass.default_mass / riemod.masses.KroneckerMass.default_mass
  d_mat = MASS * unit * np.eye(offsets[-1])
  kronecker_modules = []
  for module in curv.modules:
    structure = getattr(module.factor, "structure", None)
    if not isinstance(module.factor, DenseFactor):
      continue
    leaf = dict(zip(module.leaf_names, module.leaf_indices))
    kernel = offsets[leaf["kernel"]] + np.arange(sizes[leaf["kernel"]]).reshape(
        structure.fan_in, structure.fan_out)
    x = np.asarray(module.factor.features).reshape(-1, structure.fan_in)
    c = np.asarray(module.factor.cotangents).reshape(-1, structure.fan_out)
    x1 = np.concatenate([np.ones((len(x), 1)), x], axis=1)
    a, s = x1.T @ x1 / len(x), c.T @ c
    idx = np.concatenate([offsets[leaf["bias"]] + np.arange(structure.fan_out)[None], kernel])
    a_d, s_d = _damped(a, s)
    idx = idx.reshape(-1)
    d_mat[np.ix_(idx, idx)] = MASS * np.kron(a_d, s_d)
    kronecker_modules.append(module.name)
  assert {"block/att/query", "block/att/key", "block/att/value"} <= set(kronecker_modules)
  g = _flat(grads)
  expected = np.linalg.solve(k.T @ k + d_mat, g)
  got = _flat(geometry.compose(curv, state).solve(grads))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * np.max(np.abs(expected)))


def test_a_general_dense_layer_without_bias_is_named_when_it_keeps_the_constant_mass():
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(nnx.LinearGeneral(3, (2, 2), use_bias=False, rngs=rngs),
                         lambda h: h.reshape(h.shape[0], -1), nnx.Linear(4, 2, rngs=rngs))
  x, y = _data(jnp.float32)
  geometry = _geometry()
  _, grads, curv = riemod.value_grad_and_curvature(model, x, _loss(y), riemod.metrics.identity())
  with pytest.warns(UserWarning, match=r"module layers/0 .* keeps the constant mass"):
    geometry.advance(geometry.init(nnx.state(model, nnx.Param)), grads, curv)

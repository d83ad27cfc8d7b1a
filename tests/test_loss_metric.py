"""``metrics.from_loss()``, the loss's own Gauss-Newton factor, against dense ``jax.jacrev`` /
``jax.hessian`` references (float64); the scale check that warns when a declared metric is a
constant multiple of the loss's factor (``.sum()`` losses, all-element means)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import riemod
from conftest import flat

BATCH, OUT = 5, 4


def _problem(seed=0, batch=BATCH, out=OUT, dtype=jnp.float64):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"a": {"kernel": jax.random.normal(k[0], (3, 6), dtype), "bias": 0.1 * jnp.ones(6, dtype)},
            "b": {"kernel": jax.random.normal(k[1], (6, out), dtype) / np.sqrt(6)}}
  x = jax.random.normal(k[2], (batch, 3), dtype)
  t = jax.random.normal(k[3], (batch, out), dtype)
  f = lambda p, x: jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
  return f, params, x, t


def _losses(t):
  labels = jnp.argmax(t, -1)
  ce = lambda y: -jnp.take_along_axis(jax.nn.log_softmax(y), labels[:, None], -1)[:, 0]
  huber = lambda r: jnp.where(jnp.abs(r) < 0.5, 0.5 * r**2, 0.5 * (jnp.abs(r) - 0.25))
  return {
      "squared_sample_mean": lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1)),
      "squared_all_mean": lambda y: jnp.mean((y - t) ** 2),
      "squared_sum": lambda y: 0.5 * jnp.sum((y - t) ** 2),
      "cross_entropy": lambda y: jnp.mean(ce(y)),
      "log_cosh": lambda y: jnp.mean(jnp.sum(jnp.log(jnp.cosh(2.0 * (y - t))), -1)),
      "huber": lambda y: jnp.mean(jnp.sum(huber(y - t), -1)),
  }


def _jacobian(f, params, x):
  """``J``: ``(B c, n)``, columns in the order of ``jax.tree.leaves(params)``."""
  jac = jax.jacrev(lambda p: f(p, x))(params)
  rows = x.shape[0] * OUT
  return np.concatenate([np.asarray(j).reshape(rows, -1) for j in jax.tree.leaves(jac)], axis=1)


def _output_hessian(loss_fn, y, clip=False):
  """The batch loss's Hessian w.r.t. the outputs, ``(B c, B c)``; ``clip``: negative eigenvalues
  of every sample's block set to 0 (the generalised Gauss-Newton matrix of a non-convex loss)."""
  batch, c = y.shape
  h = np.array(jax.hessian(loss_fn)(y)).reshape(batch * c, batch * c)
  if clip:
    for s in range(batch):
      block = slice(s * c, (s + 1) * c)
      lam, q = np.linalg.eigh(h[block, block])
      h[block, block] = (q * np.maximum(lam, 0)) @ q.T
  return h


def _rows(curvature, num_leaves):
  """``K`` of the curvature, ``(d, n)``, columns in leaf order (from the modules' own rows)."""
  columns = [None] * num_leaves
  for module in curvature.modules:
    rows = module.factor.rows()
    for name, index in zip(module.leaf_names, module.leaf_indices):
      columns[index] = np.asarray(rows[name]).reshape(curvature.num_rows, -1)
  return np.concatenate(columns, axis=1)


def _rel(a, b):
  return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


@pytest.mark.parametrize("loss", ["squared_sample_mean", "squared_all_mean", "squared_sum",
                                  "cross_entropy", "log_cosh", "huber"])
def test_from_loss_is_the_dense_gauss_newton_matrix(loss):
  """``K^T K = J^T H J`` (dense Jacobian, dense output Hessian) for every reduction and loss, and
  the coordinates reproduce the gradient, ``K^T e = g``, wherever the cotangent lies in the rows'
  span (every loss here but Huber, whose linear pieces have zero curvature)."""
  with jax.enable_x64(True):
    f, params, x, t = _problem()
    loss_fn = _losses(t)[loss]
    _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, params=params)  # the default
    assert curv.output_metric == "from_loss"
    j = _jacobian(f, params, x)
    expected = j.T @ _output_hessian(loss_fn, f(params, x)) @ j
    k = _rows(curv, len(jax.tree.leaves(params)))
    assert _rel(k.T @ k, expected) < 1e-12
    if loss != "huber":
      assert _rel(k.T @ np.asarray(curv.coordinates), flat(g)) < 1e-12


@pytest.mark.parametrize("loss", ["squared_all_mean", "squared_sum", "cross_entropy", "log_cosh",
                                  "huber"])
@pytest.mark.parametrize("structure", ["full", "layerwise"])
def test_step_through_geometry_is_the_dense_gauss_newton_solve(loss, structure):
  """The optimizer's direction ``(J^T H J + mass I)^{-1} g`` (block diagonal over the modules
  for the layerwise structure), against an explicit solve with the dense matrices."""
  with jax.enable_x64(True):
    f, params, x, t = _problem(seed=1)
    loss_fn = _losses(t)[loss]
    _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.from_loss(),
                                                 params=params)
    j = _jacobian(f, params, x)
    ggn = j.T @ _output_hessian(loss_fn, f(params, x)) @ j
    mass = 1e-6
    # Flat leaf order: a/bias (6), a/kernel (18), b/kernel (24).
    blocks = [slice(0, 24), slice(24, 48)] if structure == "layerwise" else [slice(0, 48)]
    expected = np.zeros(ggn.shape[0])
    for b in blocks:
      expected[b] = np.linalg.solve(ggn[b, b] + mass * np.eye(b.stop - b.start),
                                    np.asarray(flat(g))[b])
    geometry = riemod.Geometry(mass=mass, structure=structure)
    step, _ = geometry.compose(curv, geometry.init(params)).step(g)
    assert _rel(flat(step), expected) < 1e-9


def test_cross_entropy_is_the_exact_softmax_fisher():
  """For cross-entropy the loss's factor spans the same metric as ``softmax_fisher()``: per sample
  ``L^T L`` agree to 1e-13 and so do the steps (float64 and float32)."""
  with jax.enable_x64(True):
    f, params, x, t = _problem(seed=2)
    loss_fn = _losses(t)["cross_entropy"]
    y = f(params, x)
    ours = riemod.metrics.from_loss().bind(loss_fn, y)(y)
    fisher = riemod.metrics.softmax_fisher()(y)
    gram = lambda r: np.einsum("ski,skj->sij", r, r)
    assert _rel(gram(ours), gram(fisher)) < 1e-13
  for dtype, tol in ((jnp.float64, 1e-11), (jnp.float32, 1e-4)):
    with jax.enable_x64(dtype == jnp.float64):
      f, params, x, t = _problem(seed=2, dtype=dtype)
      loss_fn = _losses(t)["cross_entropy"]
      geometry = riemod.Geometry(mass=1e-3, structure="full")
      steps = []
      for metric in (riemod.metrics.from_loss(), riemod.metrics.softmax_fisher()):
        _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, metric, params=params)
        steps.append(flat(geometry.compose(curv, geometry.init(params)).step(g)[0]))
      assert _rel(steps[0], steps[1]) < tol


def test_a_non_convex_loss_gets_the_generalised_gauss_newton_matrix():
  """``cos`` of the residual has Hessian blocks of both signs: the negative eigenvalues are
  clipped to 0 per sample (``J^T H_+ J``), and the gradient's part along them is left to the
  Woodbury remainder, so the step still equals the dense solve."""
  with jax.enable_x64(True):
    f, params, x, t = _problem(seed=3)
    loss_fn = lambda y: jnp.mean(jnp.sum(jnp.cos(2.0 * (y - t)), -1))
    _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, params=params)
    j = _jacobian(f, params, x)
    h_full = _output_hessian(loss_fn, f(params, x))
    assert np.linalg.eigvalsh(h_full).min() < -1e-2   # the test means something
    expected = j.T @ _output_hessian(loss_fn, f(params, x), clip=True) @ j
    k = _rows(curv, len(jax.tree.leaves(params)))
    assert _rel(k.T @ k, expected) < 1e-12
    mass = 1e-4
    geometry = riemod.Geometry(mass=mass, structure="full")
    step, _ = geometry.compose(curv, geometry.init(params)).step(g)
    dense = np.linalg.solve(expected + mass * np.eye(expected.shape[0]), np.asarray(flat(g)))
    assert _rel(flat(step), dense) < 1e-9


def test_curvature_batch_and_jit():
  """With ``curvature_batch=m`` the rows estimate the same batch mean from the first ``m``
  samples: ``K^T K = (B / m) sum_{s < m} J_s^T H_s J_s``; under ``jax.jit`` the rows are the
  eager ones."""
  with jax.enable_x64(True):
    f, params, x, t = _problem(seed=4, batch=6)
    loss_fn = _losses(t)["log_cosh"]
    m = 4
    _, _, curv = riemod.value_grad_and_curvature(f, x, loss_fn, params=params, curvature_batch=m)
    j = _jacobian(f, params, x)[: m * OUT]
    h = _output_hessian(loss_fn, f(params, x))[: m * OUT, : m * OUT]
    k = _rows(curv, len(jax.tree.leaves(params)))
    assert _rel(k.T @ k, (6 / m) * j.T @ h @ j) < 1e-12
    jitted = jax.jit(lambda p: riemod.value_grad_and_curvature(
        f, x, loss_fn, params=p, curvature_batch=m)[2])(params)
    np.testing.assert_allclose(_rows(jitted, 3), k, rtol=1e-12, atol=1e-14)


def test_from_loss_refuses_what_it_cannot_do():
  y = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="bind"):
    riemod.metrics.from_loss()(y)
  with pytest.raises(ValueError, match="max_outputs=2"):
    riemod.metrics.from_loss(max_outputs=2).bind(lambda y: jnp.sum(y**2), y)
  with pytest.raises(ValueError, match="max_outputs"):
    riemod.metrics.from_loss(max_outputs=0)


# -- the scale check of declared metrics

@pytest.fixture
def fresh_warnings(monkeypatch):
  """Each test sees the check's first warning (it warns once per metric and loss)."""
  monkeypatch.setattr(riemod.metrics, "_warned", set())


def _measure(f, params, x, loss_fn, metric, mode, **kwargs):
  run = lambda p: riemod.value_grad_and_curvature(f, x, loss_fn, metric, params=p, **kwargs)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = (jax.jit(run) if mode == "jit" else run)(params)
    jax.block_until_ready(out)
    jax.effects_barrier()
  return [w for w in caught if issubclass(w.category, (riemod.metrics.MetricScaleWarning,
                                                        riemod.metrics.SampleCouplingWarning))]


CASES = [  # loss, metric, what the warning must say (None: no warning)
    ("squared_sample_mean", "identity", None),
    ("squared_all_mean", "identity", "factor 1/4"),
    ("squared_sum", "identity", "factor B = 5"),
    ("cross_entropy", "softmax_fisher", None),
    ("cross_entropy_sum", "softmax_fisher", "factor B = 5"),
    ("huber", "identity", None),        # another metric on purpose: not a constant multiple
    ("squared_sum", "from_loss", None),  # the loss's own factor is right for any reduction
]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("loss, metric, message", CASES)
def test_scale_check_warns_exactly_when_the_metric_is_a_multiple(fresh_warnings, mode, loss,
                                                                  metric, message):
  f, params, x, t = _problem(seed=5, dtype=jnp.float32)
  losses = _losses(t)
  losses["cross_entropy_sum"] = lambda y: BATCH * losses["cross_entropy"](y)
  caught = _measure(f, params, x, losses[loss], getattr(riemod.metrics, metric)(), mode)
  if message is None:
    assert not caught
  else:
    assert len(caught) == 1
    text = str(caught[0].message)
    assert message in text and "from_loss()" in text and "check_metric=False" in text


def test_scale_check_names_the_factor_and_warns_once(fresh_warnings):
  """The measured factor is in the message (1/C for an all-element mean with the 0.5: 0.25);
  a second call with the same loss, even a re-created lambda, does not warn again."""
  f, params, x, t = _problem(seed=6, dtype=jnp.float32)
  caught = []
  for step in range(2):
    loss_fn = lambda y: 0.5 * jnp.mean((y - t) ** 2)
    caught += _measure(f, params, x, loss_fn, riemod.metrics.identity(), "eager")
  assert len(caught) == 1
  assert "0.25 times this metric" in str(caught[0].message)


def test_scale_check_disabled_costs_nothing(fresh_warnings):
  """``check_metric=False``: no warning, and neither the probe nor the callback is in the
  computation (the jaxpr)."""
  f, params, x, t = _problem(seed=7, dtype=jnp.float32)
  loss_fn = _losses(t)["squared_sum"]
  assert not _measure(f, params, x, loss_fn, riemod.metrics.identity(), "jit", check_metric=False)
  jaxpr = lambda check: str(jax.make_jaxpr(lambda p: riemod.value_grad_and_curvature(
      f, x, loss_fn, riemod.metrics.identity(), params=p, check_metric=check))(params))
  assert "debug_callback" in jaxpr(True)
  assert "debug_callback" not in jaxpr(False)


def test_structured_layers_take_the_loss_factor_too():
  """Layers written with ``riemod.nn.dense`` (Gram-Hadamard kernels, rows never materialised):
  the step with the default metric is the dense Gauss-Newton solve of a log-cosh loss."""
  with jax.enable_x64(True):
    _, params, x, t = _problem(seed=8)
    params["b"]["bias"] = jnp.zeros(OUT)
    f = lambda p, x: riemod.nn.dense(p["b"], jnp.tanh(riemod.nn.dense(p["a"], x)))
    loss_fn = _losses(t)["log_cosh"]
    _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, params=params)
    assert {type(m.factor).__name__ for m in curv.modules} == {"DenseFactor"}
    j = _jacobian(f, params, x)
    ggn = j.T @ _output_hessian(loss_fn, f(params, x)) @ j
    mass = 1e-6
    geometry = riemod.Geometry(mass=mass, structure="full")
    step, _ = geometry.compose(curv, geometry.init(params)).step(g)
    expected = np.linalg.solve(ggn + mass * np.eye(ggn.shape[0]), np.asarray(flat(g)))
    assert _rel(flat(step), expected) < 1e-9


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_a_loss_that_couples_samples_is_named(fresh_warnings, mode):
  """A loss with batch statistics (residuals centred over the batch) has a Hessian that is not
  block diagonal over samples: ``from_loss()`` warns once (one more Hessian product), and not
  with ``check_metric=False``; per-sample losses above never warn (the scale-check cases)."""
  f, params, x, t = _problem(seed=9, dtype=jnp.float32)
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - y.mean(0) - t) ** 2, -1))
  metric = riemod.metrics.from_loss()
  assert not _measure(f, params, x, loss_fn, metric, mode, check_metric=False)
  caught = _measure(f, params, x, loss_fn, metric, mode) + _measure(f, params, x, loss_fn,
                                                                     metric, mode)
  assert len(caught) == 1 and caught[0].category is riemod.metrics.SampleCouplingWarning
  assert "couples the samples" in str(caught[0].message)

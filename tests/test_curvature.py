"""``K_a`` rows and gradients against ``L_o`` times the dense ``jax.jacrev`` Jacobian."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import riemod
from conftest import assert_close, dense_factor_rows


def _nnx_apply(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return params, lambda p, x: nnx.merge(graphdef, p, rest)(x)


def _check_rows_and_grads(model, x, loss_fn, metric, dtype, key=None, params=None,
                          expect_factor=None):
  if params is None:
    params, apply = _nnx_apply(model)
  else:
    apply = model
  if isinstance(model, nnx.Module):
    loss, grads, curv = nnx.jit(lambda m, x: riemod.value_grad_and_curvature(
        m, x, loss_fn, metric, key=key))(model, x)
  else:
    loss, grads, curv = jax.jit(lambda p, x: riemod.value_grad_and_curvature(
        model, x, loss_fn, metric, key=key, params=p))(params, x)
  outputs = apply(params, x)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(apply(p, x))))(params)
  assert_close(loss, ref_loss, dtype)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert_close(g, r, dtype)
  rows = metric(outputs, key) / jnp.sqrt(jnp.asarray(x.shape[0], outputs.dtype))
  reference = jax.jit(lambda p: dense_factor_rows(apply, p, x, rows))(params)
  assert curv.num_rows == rows.shape[0] * rows.shape[1]
  covered = set()
  for module in curv.modules:
    assert module.factor is not None
    if expect_factor is not None:
      assert type(module.factor).__name__ == expect_factor.get(module.name, "DenseFactor"), (
          module.name)
    ours = module.factor.rows()
    for name, index in zip(module.leaf_names, module.leaf_indices):
      assert ours[name].dtype == dtype
      assert_close(ours[name], reference[index], dtype)
      covered.add(index)
  assert covered == set(range(len(jax.tree.leaves(params))))
  return curv


def _ce(labels):
  return lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _sq(targets):
  return lambda y: 0.5 * jnp.mean(jnp.sum((y - targets).reshape(y.shape[0], -1) ** 2, -1))


METRICS = {
    "identity": (riemod.metrics.identity, "sq"),
    "softmax_fisher": (riemod.metrics.softmax_fisher, "ce"),
    "sampled_softmax_fisher": (lambda: riemod.metrics.sampled_softmax_fisher(3), "ce"),
    "gaussian_sketch": (lambda: riemod.metrics.gaussian_sketch(2), "sq"),
    "custom": (lambda: riemod.metrics.custom(lambda y: jnp.diag(jnp.arange(1.0, 5.0, dtype=y.dtype))), "sq"),
}


@pytest.mark.parametrize("metric_name", list(METRICS))
def test_mlp_rows_every_metric(metric_name, dtype):
  make_metric, loss_kind = METRICS[metric_name]
  rngs = nnx.Rngs(0)
  model = riemod.nn.Sequential(
      riemod.nn.Dense(3, 5, rngs=rngs, param_dtype=dtype), jnp.tanh,
      nnx.Linear(5, 4, rngs=rngs, param_dtype=dtype))
  x = jax.random.normal(jax.random.key(1), (6, 3), dtype)
  labels = jnp.arange(6) % 4
  targets = jax.random.normal(jax.random.key(2), (6, 4), dtype)
  loss_fn = _ce(labels) if loss_kind == "ce" else _sq(targets)
  _check_rows_and_grads(model, x, loss_fn, make_metric(), dtype, key=jax.random.key(3))


def test_conv_rows_strides_padding(dtype):
  rngs = nnx.Rngs(0)
  model = riemod.nn.Sequential(
      riemod.nn.Conv(2, 3, (3, 3), strides=2, padding="SAME", rngs=rngs, param_dtype=dtype),
      jnp.tanh,
      nnx.Conv(3, 2, (2, 2), padding="VALID", kernel_dilation=1, rngs=rngs, param_dtype=dtype),
      lambda h: h.reshape(h.shape[0], -1))
  x = jax.random.normal(jax.random.key(1), (3, 7, 6, 2), dtype)
  out = model(x)
  targets = jnp.zeros_like(out)
  _check_rows_and_grads(model, x, _sq(targets), riemod.metrics.identity(), dtype)


def test_conv_explicit_padding_and_dilation():
  dtype = jnp.float32
  rngs = nnx.Rngs(0)
  model = riemod.nn.Sequential(
      nnx.Conv(1, 2, (3, 2), strides=(1, 2), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1),
               rngs=rngs),
      lambda h: h.reshape(h.shape[0], -1))
  x = jax.random.normal(jax.random.key(1), (2, 6, 5, 1), dtype)
  targets = jnp.zeros_like(model(x))
  _check_rows_and_grads(model, x, _sq(targets), riemod.metrics.identity(), dtype)


class _Scale(nnx.Module):
  """A module riemod does not recognise: takes the generic (materialised) path."""

  def __init__(self, n, dtype):
    self.scale = nnx.Param(jnp.linspace(0.5, 1.5, n, dtype=dtype))

  def __call__(self, x):
    return x * self.scale + jnp.sin(x)


def test_generic_modules_and_parallel(dtype):
  rngs = nnx.Rngs(0)
  model = riemod.nn.Sequential(
      riemod.nn.Parallel(riemod.nn.Dense(3, 4, rngs=rngs, param_dtype=dtype),
                         nnx.Linear(3, 4, use_bias=False, rngs=rngs, param_dtype=dtype)),
      _Scale(4, dtype),
      nnx.LayerNorm(4, rngs=rngs, param_dtype=dtype),
      riemod.nn.Parallel(riemod.nn.Dense(4, 2, rngs=rngs, param_dtype=dtype),
                         riemod.nn.Dense(4, 3, rngs=rngs, param_dtype=dtype), combine="concat"))
  x = jax.random.normal(jax.random.key(1), (5, 3), dtype)
  targets = jax.random.normal(jax.random.key(2), (5, 5), dtype)
  curv = _check_rows_and_grads(
      model, x, _sq(targets), riemod.metrics.identity(), dtype,
      expect_factor={"layers/1": "RowsFactor", "layers/2": "RowsFactor"})
  assert [m.name for m in curv.modules] == [
      "layers/0/branches/0", "layers/0/branches/1", "layers/1", "layers/2",
      "layers/3/branches/0", "layers/3/branches/1"]


class _Shared(nnx.Module):
  """One dense layer applied twice: its rows sum over both calls."""

  def __init__(self, dtype):
    self.dense = riemod.nn.Dense(3, 3, rngs=nnx.Rngs(0), param_dtype=dtype)

  def __call__(self, x):
    return self.dense(jnp.tanh(self.dense(x)))


def test_shared_layer_and_sequence_positions(dtype):
  model = _Shared(dtype)
  x = jax.random.normal(jax.random.key(1), (4, 3), dtype)
  _check_rows_and_grads(model, x, _sq(jnp.zeros((4, 3), dtype)), riemod.metrics.identity(), dtype)
  # A dense layer on (B, T, features): one position per token.
  layer = riemod.nn.Dense(3, 2, rngs=nnx.Rngs(0), param_dtype=dtype)
  xs = jax.random.normal(jax.random.key(2), (4, 5, 3), dtype)
  _check_rows_and_grads(layer, xs, _sq(jnp.zeros((4, 5, 2), dtype)), riemod.metrics.identity(),
                        dtype)


class _LinenMLP(linen.Module):
  @linen.compact
  def __call__(self, x):
    x = jnp.tanh(linen.Dense(5)(x))
    x = linen.Conv(2, (2,), padding="VALID")(x[:, :, None]).reshape(x.shape[0], -1)
    return linen.LayerNorm()(x)


def test_linen_and_plain_function_paths():
  dtype = jnp.float32
  model = _LinenMLP()
  x = jax.random.normal(jax.random.key(1), (4, 3), dtype)
  variables = model.init(jax.random.key(0), x)
  targets = jnp.zeros_like(model.apply(variables, x))
  curv = _check_rows_and_grads(model.apply, x, _sq(targets), riemod.metrics.identity(), dtype,
                               params=variables)
  kinds = {m.name: type(m.factor).__name__ for m in curv.modules}
  assert kinds["params/Dense_0"] == "DenseFactor"
  assert kinds["params/LayerNorm_0"] == "RowsFactor"
  # The same function as a plain JAX function: every module on the generic path.
  plain = lambda p, x: model.apply(p, x)
  curv = _check_rows_and_grads(plain, x, _sq(targets), riemod.metrics.identity(), dtype,
                               params=variables)
  assert all(type(m.factor).__name__ == "RowsFactor" for m in curv.modules)


def test_pinn_style_residuals_of_input_derivatives():
  """Residuals that differentiate the network with respect to its input (a 1-D Poisson PINN)."""
  dtype = jnp.float32
  params = {"l1": {"w": jax.random.normal(jax.random.key(0), (1, 6)), "b": jnp.zeros(6)},
            "l2": {"w": jax.random.normal(jax.random.key(1), (6, 1)), "b": jnp.zeros(1)}}

  def net(p, z):
    return (jnp.tanh(z @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"])[0]

  def residuals(p, x):
    def one(z):
      u_zz = jax.hessian(lambda s: net(p, s[None]))(z[0:1])[0, 0]
      return jnp.where(z[1] > 0, net(p, z[0:1]) - 0.0, -u_zz - jnp.sin(z[0]))
    return jax.vmap(one)(x)[:, None]

  x = jnp.stack([jnp.linspace(0, 3, 7), (jnp.arange(7) % 3 == 0).astype(dtype)], 1)
  _check_rows_and_grads(residuals, x, lambda r: 0.5 * jnp.mean(r**2), riemod.metrics.identity(),
                        dtype, params=params)


def test_declarations_kinds_and_masses():
  rngs = nnx.Rngs(0)
  model = riemod.nn.Sequential(
      riemod.nn.Dense(3, 4, mass=0.5, rngs=rngs), jnp.tanh,
      riemod.nn.Dense(4, 4, kind="euclidean", rngs=rngs),
      riemod.nn.Dense(4, 2, kind="frozen", rngs=rngs),
      riemod.nn.Dense(2, 2, mass={"kernel": np.full((2, 2), 2.0), "bias": np.ones(2)}, rngs=rngs))
  x = jnp.ones((3, 3))
  _, _, curv = riemod.value_grad_and_curvature(model, x, lambda y: jnp.mean(y**2),
                                               riemod.metrics.identity())
  by_name = {m.name: m for m in curv.modules}
  assert by_name["layers/0"].kind == "riemannian"
  assert float(by_name["layers/0"].mass["kernel"]) == 0.5
  assert by_name["layers/2"].kind == "euclidean" and by_name["layers/2"].factor is None
  assert by_name["layers/3"].kind == "frozen" and by_name["layers/3"].factor is None
  assert by_name["layers/4"].mass["kernel"].shape == (2, 2)
  # Overrides by name, e.g. for Linen and plain functions.
  _, _, curv = riemod.value_grad_and_curvature(
      model, x, lambda y: jnp.mean(y**2), riemod.metrics.identity(),
      declarations={"layers/3": riemod.MetricDeclaration(kind="riemannian", mass=3.0)})
  assert {m.name: m.kind for m in curv.modules}["layers/3"] == "riemannian"


@pytest.mark.parametrize("bad, match", [
    (dict(mass=0.0), "mass"), (dict(mass=-1.0), "mass"), (dict(mass=float("nan")), "mass"),
    (dict(kind="adam"), "kind"),
])
def test_bad_declarations(bad, match):
  with pytest.raises(ValueError, match=match):
    riemod.nn.Dense(2, 2, rngs=nnx.Rngs(0), **bad)


def test_bad_inputs_name_the_argument():
  model = riemod.nn.Dense(3, 2, rngs=nnx.Rngs(0))
  loss = lambda y: jnp.mean(y**2)
  with pytest.raises(ValueError, match="PRNG key"):
    riemod.value_grad_and_curvature(model, jnp.ones((2, 3)), loss,
                                    riemod.metrics.sampled_softmax_fisher(1))
  with pytest.raises(TypeError, match="output_metric"):
    riemod.value_grad_and_curvature(model, jnp.ones((2, 3)), loss, "fisher")
  with pytest.raises(ValueError, match="scalar"):
    riemod.value_grad_and_curvature(model, jnp.ones((2, 3)), lambda y: y,
                                    riemod.metrics.identity())
  with pytest.raises(ValueError, match="leading"):
    riemod.value_grad_and_curvature(lambda p, x: x["a"] @ p, {"a": jnp.ones((2, 3)),
                                                              "b": jnp.ones((4,))},
                                    loss, riemod.metrics.identity(), params=jnp.ones((3, 2)))
  with pytest.raises(TypeError, match="dtype"):
    riemod.value_grad_and_curvature(lambda p, x: x @ p, jnp.ones((2, 3)), loss,
                                    riemod.metrics.identity(), params=jnp.ones((3, 2), jnp.int32))
  with pytest.raises(ValueError, match="params="):
    riemod.value_grad_and_curvature(lambda p, x: x @ p, jnp.ones((2, 3)), loss,
                                    riemod.metrics.identity())
  with pytest.raises(KeyError, match="modules are"):
    riemod.value_grad_and_curvature(model, jnp.ones((2, 3)), loss, riemod.metrics.identity(),
                                    declarations={"nope": {"mass": 1.0}})
  with pytest.raises(ValueError, match="logits"):  # (batch, 2, 1) is per-token; (batch,) is not
    riemod.value_grad_and_curvature(lambda p, x: (x @ p)[..., 0], jnp.ones((2, 3)), loss,
                                    riemod.metrics.softmax_fisher(), params=jnp.ones((3, 2)))


def test_curvature_batch_uses_leading_samples_for_rows_and_all_for_gradient():
  rngs = nnx.Rngs(0)
  model = riemod.nn.Sequential(riemod.nn.Dense(3, 5, rngs=rngs), jnp.tanh, _Scale(5, jnp.float32),
                               nnx.Linear(5, 4, rngs=rngs))
  x = jax.random.normal(jax.random.key(1), (8, 3))
  labels = jnp.arange(8) % 4
  metric = riemod.metrics.softmax_fisher()
  loss, grads, curv = nnx.jit(lambda m, x: riemod.value_grad_and_curvature(
      m, x, _ce(labels), metric, curvature_batch=3))(model, x)
  full_loss, full_grads, _ = nnx.jit(lambda m, x: riemod.value_grad_and_curvature(
      m, x, _ce(labels), metric))(model, x)
  _, _, subset = nnx.jit(lambda m, x: riemod.value_grad_and_curvature(
      m, x, _ce(labels[:3]), metric))(model, x[:3])
  assert_close(loss, full_loss, jnp.float32)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
    assert_close(a, b, jnp.float32)
  assert curv.num_rows == 4 * 3
  for ours, ref in zip(curv.modules, subset.modules):
    for name in ours.leaf_names:
      assert_close(ours.factor.rows()[name], ref.factor.rows()[name], jnp.float32)
  with pytest.raises(ValueError, match="curvature_batch"):
    riemod.value_grad_and_curvature(model, x, _ce(labels), metric, curvature_batch=9)


def test_sampled_softmax_fisher_is_unbiased_for_the_exact_fisher(dtype):
  # E[r^T r] over the draws of one sample's rows is diag(p) - p p^T (the exact softmax Fisher).
  logits = jnp.array([[2.0, -1.0, 0.5, 0.0, -3.0]], dtype)
  p = jax.nn.softmax(logits[0])
  exact = jnp.diag(p) - jnp.outer(p, p)
  metric = riemod.metrics.sampled_softmax_fisher(4)
  num_keys = 4000
  rows = jax.vmap(lambda k: metric(logits, k))(jax.random.split(jax.random.key(0), num_keys))
  rows = rows.reshape(-1, rows.shape[-1]) * jnp.sqrt(4.0)         # one row per draw, unscaled
  estimate = rows.T @ rows / rows.shape[0]
  # Entries are means of 16000 bounded draws: the Monte-Carlo error is below 0.5 / sqrt(16000).
  np.testing.assert_allclose(np.asarray(estimate), np.asarray(exact), atol=5 * 0.5 / np.sqrt(16000))
  # Every class is drawn with its probability (the rarest one, p ~ 0.006, included).
  counts = jnp.mean(rows + p, axis=0)
  np.testing.assert_allclose(np.asarray(counts), np.asarray(p), atol=5 * 0.5 / np.sqrt(16000))


def test_dense_factor_for_products_forms_rows_only_where_cheaper_and_keeps_every_product():
  """Per-position factors (P > 2R) are formed once as rows with the same K v, K^T t and Gram;
  dense layers (P = 1) and rows too large against the implicit form stay implicit."""
  from riemod.curvature.factors import DenseFactor, RowsFactor
  from riemod.nn.structure import DenseStructure

  key = jax.random.key(0)
  structure = DenseStructure(kernel_shape=(3, 2), has_bias=True)
  x = jax.random.normal(key, (4, 16, 3))
  c = jax.random.normal(jax.random.fold_in(key, 1), (1, 4, 16, 2))
  implicit = DenseFactor(x, c, structure, bias_weight=jnp.asarray(0.7))
  formed = implicit.for_products()
  assert isinstance(formed, RowsFactor)
  v = {"kernel": jax.random.normal(jax.random.fold_in(key, 2), (3, 2)),
       "bias": jax.random.normal(jax.random.fold_in(key, 3), (2,))}
  t = jax.random.normal(jax.random.fold_in(key, 4), (2, 4))
  inv = {"kernel": jnp.asarray(0.3), "bias": jnp.asarray(2.0)}
  np.testing.assert_allclose(formed.matvec(v), implicit.matvec(v), rtol=1e-5, atol=1e-5)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(formed.rmatvec(t)[name], implicit.rmatvec(t)[name], rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_allclose(formed.gram(inv), implicit.gram(inv), rtol=1e-5, atol=1e-5)
  assert isinstance(DenseFactor(x[:, :1], c[:, :, :1], structure).for_products(), DenseFactor)
  wide = DenseStructure(kernel_shape=(64, 64), has_bias=False)
  assert isinstance(DenseFactor(jnp.ones((4, 3, 64)), jnp.ones((1, 4, 3, 64)), wide
                                ).for_products(), DenseFactor)   # 4096 > 4 * 3 * 128

"""Sequence models: per-token output metrics and the structures of transformer layers.

Every structure is checked against the dense generalised Gauss-Newton matrix ``J^T H J`` of the
loss as written (``J`` from ``jax.jacrev``, ``H`` from ``jax.hessian`` of the loss w.r.t. the
outputs), in float64: with an exact output metric, ``K^T K`` must equal it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from jax.flatten_util import ravel_pytree

import riemod
from riemod.curvature import measure
from riemod.curvature.factors import DenseFactor, EmbedFactor
from riemod.nn.structure import DenseStructure, EmbedStructure

V, D, H, B, T = 6, 4, 2, 3, 4


def _attention(q, k, v, mask=None, **unused):
  """Causal attention written out: flax's default attention function differentiates at float32
  accuracy even under x64 (its jacrev and jacfwd differ by 2e-7 relative), too coarse for a
  float64 reference; the projections around it are what is tested."""
  w = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(q.shape[-1])
  w = jax.nn.softmax(jnp.where(mask, w, -jnp.inf), axis=-1)
  return jnp.einsum("...hqk,...khd->...qhd", w, v)


class Block(nnx.Module):
  """Pre-norm transformer block: LayerNorm, causal attention, RMSNorm, per-token MLP."""

  def __init__(self, rngs):
    f64 = dict(param_dtype=jnp.float64)
    self.ln1 = nnx.LayerNorm(D, rngs=rngs, **f64)
    self.att = nnx.MultiHeadAttention(H, D, decode=False, attention_fn=_attention, rngs=rngs,
                                      **f64)
    self.ln2 = nnx.RMSNorm(D, rngs=rngs, **f64)
    self.up = nnx.Linear(D, 2 * D, rngs=rngs, **f64)
    self.down = nnx.LinearGeneral((2 * D,), (D,), rngs=rngs, **f64)

  def __call__(self, x):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + self.att(self.ln1(x), mask=mask)
    return x + self.down(jnp.tanh(self.up(self.ln2(x))))


class LM(nnx.Module):

  def __init__(self, seed=0, tied=False):
    rngs = nnx.Rngs(seed)
    self.tied = tied
    self.emb = nnx.Embed(V, D, rngs=rngs, param_dtype=jnp.float64)
    self.block = Block(rngs)
    self.head = nnx.Linear(D, V, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, ids):
    h = self.block(self.emb(ids))
    return self.emb.attend(h) if self.tied else self.head(h)


def _data(seed=1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.randint(k1, (B, T), 0, V), jax.random.randint(k2, (B, T), 0, V)


def _dense_ggn(apply, params, loss_fn):
  """``J^T H J`` over ``ravel_pytree(params)`` (the order of ``jax.tree.leaves``)."""
  flat, unravel = ravel_pytree(params)
  outputs = apply(params)
  jac = jax.jacrev(lambda w: apply(unravel(w)).reshape(-1))(flat)
  hess = jax.hessian(loss_fn)(outputs).reshape(outputs.size, outputs.size)
  return np.asarray(jac.T @ hess @ jac)


def _rows_matrix(curv):
  """``K`` as a dense ``(d, n)`` matrix in the order of the parameter leaves."""
  sizes = [int(np.prod(s)) for s in curv.leaf_shapes]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  k = np.zeros((curv.num_rows, offsets[-1]))
  for module in curv.modules:
    if module.factor is None:
      continue
    rows = module.factor.rows()
    for name, index in zip(module.leaf_names, module.leaf_indices):
      assert rows[name].shape[1:] == curv.leaf_shapes[index]
      k[:, offsets[index]:offsets[index + 1]] = np.asarray(rows[name]).reshape(curv.num_rows, -1)
  return k


def _nnx_apply(model, ids):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return (lambda p: nnx.merge(graphdef, p, rest)(ids)), params


def _factor_types(curv):
  return {m.name: type(m.factor).__name__ for m in curv.modules}


def _ce(targets, mask=None):
  def loss_fn(logits):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return ce.mean() if mask is None else jnp.sum(mask * ce) / jnp.sum(mask)
  return loss_fn


def test_transformer_rows_are_the_exact_gauss_newton_matrix():
  """Embed, LayerNorm, attention projections, RMSNorm, Linear and LinearGeneral per token, with
  the exact per-token softmax Fisher of the mean token cross-entropy: K^T K = J^T H J."""
  with jax.enable_x64(True):
    model, (ids, targets) = LM(), _data()
    loss_fn = _ce(targets)
    _, grads, curv = riemod.value_grad_and_curvature(model, ids, loss_fn,
                                                     riemod.metrics.softmax_fisher())
    assert _factor_types(curv) == {
        "block/att/key": "DenseFactor", "block/att/out": "DenseFactor",
        "block/att/query": "DenseFactor", "block/att/value": "DenseFactor",
        "block/down": "DenseFactor", "block/ln1": "RowsFactor", "block/ln2": "RowsFactor",
        "block/up": "DenseFactor", "emb": "EmbedFactor", "head": "DenseFactor"}
    assert curv.num_rows == B * T * V
    apply, params = _nnx_apply(model, ids)
    assert [tuple(np.shape(p)) for p in jax.tree.leaves(params)] == list(curv.leaf_shapes)
    k = _rows_matrix(curv)
    ggn = _dense_ggn(apply, params, loss_fn)
    np.testing.assert_allclose(k.T @ k, ggn, rtol=1e-9, atol=1e-12 * np.abs(ggn).max())
    # The coordinates reproduce the gradient: g = K^T e.
    np.testing.assert_allclose(k.T @ np.asarray(curv.coordinates), ravel_pytree(grads)[0],
                               rtol=1e-9, atol=1e-13)


def test_padding_mask_weights_the_tokens():
  """A masked mean ``sum(mask CE) / sum(mask)``: exact rows with ``mask=`` equal its Gauss-Newton
  matrix; padded tokens have zero rows; without the mask the matrix differs."""
  with jax.enable_x64(True):
    model, (ids, targets) = LM(seed=2), _data(seed=3)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], jnp.float64)
    loss_fn = _ce(targets, mask)
    apply, params = _nnx_apply(model, ids)
    ggn = _dense_ggn(apply, params, loss_fn)
    _, grads, curv = riemod.value_grad_and_curvature(
        model, ids, loss_fn, riemod.metrics.softmax_fisher(mask=mask))
    k = _rows_matrix(curv)
    np.testing.assert_allclose(k.T @ k, ggn, rtol=1e-9, atol=1e-12 * np.abs(ggn).max())
    np.testing.assert_allclose(k.T @ np.asarray(curv.coordinates), ravel_pytree(grads)[0],
                               rtol=1e-9, atol=1e-13)
    _, _, unmasked = riemod.value_grad_and_curvature(model, ids, loss_fn,
                                                     riemod.metrics.softmax_fisher())
    k0 = _rows_matrix(unmasked)
    assert np.abs(k0.T @ k0 - ggn).max() > 1e-3 * np.abs(ggn).max()


def test_per_token_regression_identity_with_mask():
  """Outputs (B, T, F), ``0.5 * masked mean over tokens of ||r||^2``: identity(per_token=True)."""
  with jax.enable_x64(True):
    model = nnx.Sequential(nnx.Linear(3, 5, rngs=nnx.Rngs(0), param_dtype=jnp.float64), jnp.tanh,
                           nnx.LinearGeneral(5, (2,), rngs=nnx.Rngs(1), param_dtype=jnp.float64))
    x = jax.random.normal(jax.random.key(0), (B, T, 3), jnp.float64)
    target = jax.random.normal(jax.random.key(1), (B, T, 2), jnp.float64)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], jnp.float64)
    loss_fn = lambda y: 0.5 * jnp.sum(mask * jnp.sum((y - target) ** 2, -1)) / jnp.sum(mask)
    _, grads, curv = riemod.value_grad_and_curvature(
        model, x, loss_fn, riemod.metrics.identity(per_token=True, mask=mask))
    apply, params = _nnx_apply(model, x)
    k = _rows_matrix(curv)
    ggn = _dense_ggn(apply, params, loss_fn)
    np.testing.assert_allclose(k.T @ k, ggn, rtol=1e-9, atol=1e-12 * np.abs(ggn).max())
    np.testing.assert_allclose(k.T @ np.asarray(curv.coordinates), ravel_pytree(grads)[0],
                               rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("metric", ["sampled_softmax_fisher", "gaussian_sketch"])
def test_sampled_token_rows_average_to_the_block_diagonal_metric(metric):
  """k rows per sequence whatever T: their average over draws is the block-diagonal per-token
  metric of the (masked) mean over tokens; cross-token blocks vanish."""
  with jax.enable_x64(True):
    k, lengths = 20000, (4, 2)
    logits = jax.random.normal(jax.random.key(4), (2, 4, 3), jnp.float64)
    mask = (jnp.arange(4)[None] < jnp.array(lengths)[:, None]).astype(jnp.float64)
    if metric == "sampled_softmax_fisher":
      rows = riemod.metrics.sampled_softmax_fisher(k, mask=mask)(logits, jax.random.key(5))
      p = jax.nn.softmax(logits)
      block = jax.vmap(jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q)))(p)  # (B, T, C, C)
    else:
      rows = riemod.metrics.gaussian_sketch(k, per_token=True, mask=mask)(logits,
                                                                          jax.random.key(5))
      block = jnp.broadcast_to(jnp.eye(3), (2, 4, 3, 3))
    assert rows.shape == (2, k, 4, 3)
    flat = np.asarray(rows).reshape(2, k, 12)
    estimate = np.einsum("bki,bkj->bij", flat, flat)      # sum over the k rows of L^T L
    mean_tokens = sum(lengths) / 2
    expected = np.zeros((2, 12, 12))
    for b in range(2):
      for t in range(lengths[b]):
        expected[b, 3 * t:3 * t + 3, 3 * t:3 * t + 3] = block[b, t] / mean_tokens
    scale = np.abs(expected).max()
    assert np.abs(estimate - expected).max() < 6 * scale / np.sqrt(k)
    assert np.all(flat[1, :, 6:] == 0)                    # padded tokens carry nothing


def test_sampled_rows_do_not_grow_with_sequence_length():
  with jax.enable_x64(True):
    model, (ids, targets) = LM(), _data()
    _, _, curv = riemod.value_grad_and_curvature(
        model, ids, _ce(targets), riemod.metrics.sampled_softmax_fisher(2), key=jax.random.key(0))
    assert curv.num_rows == 2 * B


def test_natural_gradient_step_equals_a_dense_solve():
  """The composed step on the transformer (whole-network block, Woodbury in sample space)
  equals ``(J^T H J + mass I)^{-1} g`` solved densely."""
  with jax.enable_x64(True):
    model, (ids, targets) = LM(seed=4), _data(seed=5)
    loss_fn = _ce(targets)
    _, grads, curv = riemod.value_grad_and_curvature(model, ids, loss_fn,
                                                     riemod.metrics.softmax_fisher())
    apply, params = _nnx_apply(model, ids)
    ggn = _dense_ggn(apply, params, loss_fn)
    g = np.asarray(ravel_pytree(grads)[0])
    mass = 1e-2
    expected = np.linalg.solve(ggn + mass * np.eye(len(g)), g)
    geometry = riemod.Geometry(mass=mass, structure="full")
    step, _ = geometry.compose(curv, geometry.init(params)).step(grads)
    np.testing.assert_allclose(ravel_pytree(step)[0], expected, rtol=1e-7,
                               atol=1e-9 * np.abs(expected).max())


def test_tied_embedding_takes_the_generic_path_and_stays_exact():
  """``Embed.attend`` (weight tying) uses the table a second way: not an embedding structure."""
  with jax.enable_x64(True):
    model, (ids, targets) = LM(tied=True), _data()
    loss_fn = _ce(targets)
    _, _, curv = riemod.value_grad_and_curvature(model, ids, loss_fn,
                                                 riemod.metrics.softmax_fisher())
    assert _factor_types(curv)["emb"] == "RowsFactor"
    apply, params = _nnx_apply(model, ids)
    k = _rows_matrix(curv)
    ggn = _dense_ggn(apply, params, loss_fn)
    np.testing.assert_allclose(k.T @ k, ggn, rtol=1e-9, atol=1e-12 * np.abs(ggn).max())


def test_generic_path_is_chunked_and_unchanged(monkeypatch):
  """A bounded chunk of generic rows at a time gives the same rows."""
  with jax.enable_x64(True):
    model, (ids, targets) = LM(tied=True), _data()
    metric = riemod.metrics.softmax_fisher()
    _, _, whole = riemod.value_grad_and_curvature(model, ids, _ce(targets), metric)
    monkeypatch.setattr(measure, "_GENERIC_CHUNK_ELEMENTS", 1)  # one sample per chunk
    _, _, chunked = riemod.value_grad_and_curvature(model, ids, _ce(targets), metric)
    np.testing.assert_allclose(_rows_matrix(chunked), _rows_matrix(whole), rtol=1e-13,
                               atol=1e-15)


class LinenLM(linen.Module):

  @linen.compact
  def __call__(self, ids):
    f64 = dict(param_dtype=jnp.float64)
    h = linen.Embed(V, D, **f64)(ids)
    mask = linen.make_causal_mask(ids)
    h = h + linen.MultiHeadDotProductAttention(H, attention_fn=_attention,
                                                     **f64)(linen.LayerNorm(**f64)(h), mask=mask)
    h = h + linen.DenseGeneral(D, **f64)(jnp.tanh(linen.RMSNorm(**f64)(h)))
    return linen.Dense(V, **f64)(h)


def test_linen_transformer_layers_are_recognised_and_exact():
  with jax.enable_x64(True):
    ids, targets = _data()
    model = LinenLM()
    variables = model.init(jax.random.key(0), ids)
    loss_fn = _ce(targets)
    _, grads, curv = riemod.value_grad_and_curvature(model, ids, loss_fn,
                                                     riemod.metrics.softmax_fisher(),
                                                     params=variables)
    kinds = set(_factor_types(curv).items())
    assert ("params/Embed_0", "EmbedFactor") in kinds
    assert ("params/LayerNorm_0", "RowsFactor") in kinds
    assert ("params/MultiHeadDotProductAttention_0/query", "DenseFactor") in kinds
    assert ("params/MultiHeadDotProductAttention_0/out", "DenseFactor") in kinds
    assert ("params/DenseGeneral_0", "DenseFactor") in kinds
    k = _rows_matrix(curv)
    ggn = _dense_ggn(lambda p: model.apply(p, ids), variables, loss_fn)
    np.testing.assert_allclose(k.T @ k, ggn, rtol=1e-9, atol=1e-12 * np.abs(ggn).max())


def test_plain_function_with_functional_layers():
  """riemod.nn.embed, layer_norm, rms_norm and dense in f(params, x): recognised and exact."""
  with jax.enable_x64(True):
    ids, targets = _data()
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"emb": {"embedding": jax.random.normal(keys[0], (V, D), jnp.float64)},
              "ln": {"scale": 1 + 0.1 * jax.random.normal(keys[1], (D,), jnp.float64),
                     "bias": 0.1 * jax.random.normal(keys[2], (D,), jnp.float64)},
              "rms": {"scale": jnp.ones(D, jnp.float64)},
              "out": {"kernel": jax.random.normal(keys[3], (D, V), jnp.float64),
                      "bias": jnp.zeros(V, jnp.float64)}}

    def f(p, ids):
      h = riemod.nn.layer_norm(p["ln"], riemod.nn.embed(p["emb"], ids))
      return riemod.nn.dense(p["out"], jnp.tanh(riemod.nn.rms_norm(p["rms"], h)))

    loss_fn = _ce(targets)
    _, _, curv = riemod.value_grad_and_curvature(f, ids, loss_fn, riemod.metrics.softmax_fisher(),
                                                 params=params)
    assert _factor_types(curv) == {"emb": "EmbedFactor", "ln": "RowsFactor", "rms": "RowsFactor",
                                   "out": "DenseFactor"}
    k = _rows_matrix(curv)
    ggn = _dense_ggn(lambda p: f(p, ids), params, loss_fn)
    np.testing.assert_allclose(k.T @ k, ggn, rtol=1e-9, atol=1e-12 * np.abs(ggn).max())


@pytest.mark.parametrize("vocab", [5, 40])  # ids' rows (5 <= P^2) and pairwise (40 > P^2) grams
def test_embed_factor_products_match_its_rows(vocab):
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(vocab), 4)
    r, b, p, f = 2, 3, 4, 5
    ids = jax.random.randint(keys[0], (b, p), 0, vocab)
    factor = EmbedFactor(jax.random.normal(keys[1], (r, b, p, f), jnp.float64), ids,
                         EmbedStructure(vocab, f))
    rows = np.asarray(factor.rows()["embedding"]).reshape(r * b, -1)
    inv = jnp.exp(jax.random.normal(keys[2], (vocab, f), jnp.float64))
    for inv_mass, diag in ((0.3, 0.3 * np.ones(vocab * f)), (inv, np.asarray(inv).ravel())):
      np.testing.assert_allclose(factor.gram({"embedding": inv_mass}), (rows * diag) @ rows.T,
                                 rtol=1e-12, atol=1e-12)
    v = jax.random.normal(keys[3], (2, vocab, f), jnp.float64)      # a leading batch axis
    np.testing.assert_allclose(factor.matvec({"embedding": v}),
                               np.asarray(v).reshape(2, -1) @ rows.T, rtol=1e-12)
    t = np.arange(r * b, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(factor.rmatvec(jnp.asarray(t))["embedding"]).ravel(),
                               t @ rows, rtol=1e-12)
    scale = jnp.exp(jax.random.normal(keys[2], (vocab, f), jnp.float64))
    np.testing.assert_allclose(factor.scaled(scale).rows()["embedding"].reshape(r * b, -1),
                               rows * np.asarray(scale).ravel(), rtol=1e-12)


def test_linear_general_factor_keeps_the_bias_shape():
  """A (in, heads, head_dim) kernel and (heads, head_dim) bias: products in the leaves' shapes."""
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(0), 4)
    s = DenseStructure((4, 2, 3), True, in_axes=1)
    factor = DenseFactor(jax.random.normal(keys[0], (3, 5, 4), jnp.float64),
                         jax.random.normal(keys[1], (2, 3, 5, 6), jnp.float64), s)
    assert factor.leaf_shapes == {"kernel": (4, 2, 3), "bias": (2, 3)}
    rows = factor.rows()
    assert rows["bias"].shape == (6, 2, 3)
    flat = np.concatenate([np.asarray(rows[n]).reshape(6, -1) for n in ("bias", "kernel")], 1)
    v = {"bias": jax.random.normal(keys[2], (2, 3), jnp.float64),
         "kernel": jax.random.normal(keys[3], (4, 2, 3), jnp.float64)}
    np.testing.assert_allclose(factor.matvec(v), flat @ ravel_pytree(v)[0], rtol=1e-12)
    back = factor.rmatvec(jnp.arange(6.0))
    assert back["bias"].shape == (2, 3)
    np.testing.assert_allclose(ravel_pytree(back)[0], np.arange(6.0) @ flat, rtol=1e-12)


def test_adaptive_mass_scales_the_embedding_rows():
  """Under the adaptive mass the embedding's factor is K S (not K): the step equals the dense
  ``(K^T K + D)^{-1} g`` with ``D = mass (sqrt(v) + eps)`` on the table."""
  with jax.enable_x64(True):
    ids, targets = _data()
    table = jax.random.normal(jax.random.key(0), (V, D), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (D, V), jnp.float64)
    params = {"emb": {"embedding": table}, "out": {"kernel": w}}
    f = lambda p, ids: riemod.nn.dense(p["out"], riemod.nn.embed(p["emb"], ids))
    loss_fn = _ce(targets)
    _, grads, curv = riemod.value_grad_and_curvature(f, ids, loss_fn,
                                                     riemod.metrics.softmax_fisher(),
                                                     params=params,
                                                     declarations={"out": {"kind": "frozen"}})
    mass, decay, eps = 0.5, 0.9, 1e-8
    geometry = riemod.Geometry(mass=mass, mass_policy=riemod.masses.adaptive(decay, eps))
    state = geometry.advance(geometry.init(params), grads)
    step, _ = geometry.compose(curv, state).step(grads)
    k = np.asarray(curv.modules[0].factor.rows()["embedding"]).reshape(curv.num_rows, -1)
    g = np.asarray(grads["emb"]["embedding"]).ravel()
    diag = mass * (np.sqrt(g ** 2) + eps)    # one step: bias-corrected v = g^2
    expected = np.linalg.solve(k.T @ k + np.diag(diag), g)
    np.testing.assert_allclose(np.asarray(step["emb"]["embedding"]).ravel(), expected,
                               rtol=1e-8, atol=1e-12 * np.abs(expected).max())


def test_mask_and_shape_errors_name_the_argument():
  logits = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="mask="):
    riemod.metrics.softmax_fisher(mask=jnp.ones((2, 3)))(logits)
  with pytest.raises(ValueError, match="mask= has shape"):
    riemod.metrics.softmax_fisher(mask=jnp.ones((2, 5)))(jnp.zeros((2, 4, 3)))
  with pytest.raises(ValueError, match="per_token=True"):
    riemod.metrics.identity(mask=jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="tokens"):
    riemod.metrics.identity(per_token=True)(jnp.zeros((2, 3)))

"""riemod.nn.conv: a plain function's convolution is recognised exactly as nnx.Conv.

float64 throughout: the plain function's loss, gradient, factor and step equal the NNX model's to
1e-12, and the factor equals the jax.jacrev rows (an independent reference); the generic path
(a bare lax convolution, rows materialised) steps the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import riemod
from conftest import dense_factor_rows

B, OUT = 5, 3
CASES = {  # (strides, padding, dilation, bias)
    "same": (1, "SAME", 1, True),
    "valid-stride2": (2, "VALID", 1, True),
    "int-pad-dilated-nobias": (1, 1, 2, False),
    "pairs-stride": ((2, 1), ((1, 0), (2, 1)), (1, 1), True),
}


class _ConvNet(nnx.Module):
  def __init__(self, strides, padding, dilation, bias, flat):
    self.conv = nnx.Conv(2, 4, (3, 3), strides=strides, padding=padding,
                         kernel_dilation=dilation, use_bias=bias, param_dtype=jnp.float64,
                         rngs=nnx.Rngs(0))
    self.head = nnx.Linear(flat, OUT, param_dtype=jnp.float64, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.head(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))


def _setup(case):
  strides, padding, dilation, bias = CASES[case]
  x = jax.random.normal(jax.random.key(3), (B, 7, 6, 2), jnp.float64)
  t = jax.random.normal(jax.random.key(4), (B, OUT), jnp.float64)
  probe = nnx.Conv(2, 4, (3, 3), strides=strides, padding=padding, kernel_dilation=dilation,
                   rngs=nnx.Rngs(0))
  flat = int(np.prod(jax.eval_shape(probe, x).shape[1:]))
  model = _ConvNet(strides, padding, dilation, bias, flat)
  pure = nnx.as_pure(nnx.state(model, nnx.Param))
  params = {m: dict(pure[m]) for m in ("conv", "head")}
  options = dict(strides=strides, padding=padding, dilation=dilation)

  def plain(p, xb):
    h = jnp.tanh(riemod.nn.conv(p["conv"], xb, **options))
    return riemod.nn.dense(p["head"], h.reshape(xb.shape[0], -1))

  def generic(p, xb):  # no riemod layer: every module takes the materialised path
    pad = padding if isinstance(padding, str) else (
        ((padding, padding),) * 2 if isinstance(padding, int) else padding)
    s = (strides, strides) if isinstance(strides, int) else strides
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    y = jax.lax.conv_general_dilated(xb, p["conv"]["kernel"], s, pad, rhs_dilation=d,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if "bias" in p["conv"]:
      y = y + p["conv"]["bias"]
    h = jnp.tanh(y).reshape(xb.shape[0], -1)
    return h @ p["head"]["kernel"] + p["head"]["bias"]

  loss = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
  return x, loss, model, params, plain, generic


def _flat(tree):
  return np.concatenate([np.ravel(l) for l in jax.tree.leaves(tree)])


@pytest.mark.parametrize("case", list(CASES))
def test_conv_matches_nnx_conv(case):
  with jax.enable_x64(True):
    x, loss, model, params, plain, generic = _setup(case)
    metric = riemod.metrics.identity()
    l_nnx, g_nnx, c_nnx = riemod.value_grad_and_curvature(model, x, loss, metric)
    l_fn, g_fn, c_fn = riemod.value_grad_and_curvature(plain, x, loss, metric, params=params)
    _, g_gen, c_gen = riemod.value_grad_and_curvature(generic, x, loss, metric, params=params)
    kinds = lambda c: [type(m.factor).__name__ for m in c.modules]
    assert kinds(c_nnx) == kinds(c_fn) == ["DenseFactor", "DenseFactor"]
    assert kinds(c_gen) == ["RowsFactor", "RowsFactor"]
    assert c_fn.modules[0].factor.structure == c_nnx.modules[0].factor.structure
    np.testing.assert_allclose(l_fn, l_nnx, rtol=1e-13)
    np.testing.assert_allclose(_flat(g_fn), _flat(nnx.as_pure(g_nnx)), rtol=1e-12, atol=1e-14)

    # The conv factor against the jax.jacrev rows (identity metric, batch mean: I / sqrt(B)).
    rows = dense_factor_rows(plain, params, x,
                             jnp.broadcast_to(jnp.eye(OUT) / np.sqrt(B), (B, OUT, OUT)))
    names = sorted(params["conv"])
    conv_rows = c_fn.modules[0].factor.rows()
    for name, reference in zip(names, rows[:len(names)]):
      np.testing.assert_allclose(conv_rows[name], reference, rtol=1e-11, atol=1e-13)
      np.testing.assert_allclose(c_nnx.modules[0].factor.rows()[name], reference, rtol=1e-11,
                                 atol=1e-13)

    for make in (riemod.layerwise_natural_gradient, riemod.natural_gradient):
      tx = make(0.3, 1e-3)
      u_nnx, _ = tx.update(nnx.as_pure(g_nnx), tx.init(nnx.as_pure(g_nnx)), curvature=c_nnx)
      u_fn, _ = tx.update(g_fn, tx.init(params), curvature=c_fn)
      u_gen, _ = tx.update(g_gen, tx.init(params), curvature=c_gen)
      scale = np.abs(_flat(u_nnx)).max()
      np.testing.assert_allclose(_flat(u_fn) / scale, _flat(u_nnx) / scale, rtol=0, atol=1e-12)
      np.testing.assert_allclose(_flat(u_gen) / scale, _flat(u_nnx) / scale, rtol=0, atol=1e-9)


def test_conv_forward_equals_nnx_without_a_tape():
  with jax.enable_x64(True):
    for case in CASES:
      x, _, model, params, plain, _ = _setup(case)
      np.testing.assert_array_equal(plain(params, x), model(x))


def test_conv_1d_takes_the_generic_path():
  x = jnp.ones((4, 6, 2))
  params = {"c": {"kernel": 0.1 * jnp.ones((3, 2, 2))}, "d": {"kernel": jnp.ones((12, 1))}}
  f = lambda p, xb: riemod.nn.dense(p["d"], riemod.nn.conv(p["c"], xb).reshape(len(xb), -1))
  _, _, curv = riemod.value_grad_and_curvature(f, x, lambda y: 0.5 * jnp.mean(y ** 2),
                                               riemod.metrics.identity(), params=params)
  assert [type(m.factor).__name__ for m in curv.modules] == ["RowsFactor", "DenseFactor"]
  conv1d = nnx.Conv(2, 2, (3,), use_bias=False, rngs=nnx.Rngs(0))
  conv1d.kernel[...] = params["c"]["kernel"]
  np.testing.assert_allclose(riemod.nn.conv(params["c"], x), conv1d(x), rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(x=jnp.ones((2, 3, 5, 5, 2))), "one leading batch axis"),
    (dict(x=jnp.ones((2, 5, 5, 3))), "channels"),
    (dict(padding="CIRCULAR"), "circular"),
])
def test_conv_errors_name_the_fix(bad, match):
  args = dict(x=jnp.ones((2, 5, 5, 2)), padding="SAME")
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    riemod.nn.conv({"kernel": jnp.ones((3, 3, 2, 4))}, args["x"], padding=args["padding"])

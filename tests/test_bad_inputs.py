"""Every bad input is answered by an error that names the argument and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import linen, nnx

import riemod

F = lambda p, x: x @ p["w"]
LOSS = lambda y: 0.5 * jnp.mean(jnp.sum(y**2, -1))
PARAMS = {"w": jnp.ones((3, 2))}


def _curvature(model, x, params=PARAMS, loss=LOSS):
  return riemod.value_grad_and_curvature(model, x, loss, riemod.metrics.identity(), params=params)


def test_empty_batch_and_scalar_or_tuple_outputs():
  with pytest.raises(ValueError, match="0 samples"):
    _curvature(F, jnp.ones((0, 3)))
  with pytest.raises(ValueError, match="scalar"):
    _curvature(lambda p, x: jnp.sum(x @ p["w"]), jnp.ones((4, 3)), loss=lambda y: y)
  with pytest.raises(TypeError, match="returned a tuple"):
    _curvature(lambda p, x: (x @ p["w"], x), jnp.ones((4, 3)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_parameters_are_refused_by_name(dtype):
  with pytest.raises(TypeError, match=f"{jnp.dtype(dtype).name}.*float32"):
    _curvature(F, jnp.ones((4, 3), dtype), params={"w": jnp.ones((3, 2), dtype)})


def test_linen_params_collection_and_active_dropout():
  class Net(linen.Module):
    @linen.compact
    def __call__(self, x):
      return linen.Dense(2)(x)

  variables = Net().init(jax.random.key(0), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="whole variables dict"):
    _curvature(Net().apply, jnp.ones((4, 3)), params=variables["params"])
  _curvature(Net().apply, jnp.ones((4, 3)), params=variables)  # the right way works

  class Dropped(nnx.Module):
    def __init__(self):
      self.dense = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.drop(self.dense(x))

  model = Dropped()
  with pytest.raises(ValueError, match=r"model\.eval\(\)"):
    riemod.value_grad_and_curvature(model, jnp.ones((4, 3)), LOSS, riemod.metrics.identity())
  model.eval()
  riemod.value_grad_and_curvature(model, jnp.ones((4, 3)), LOSS, riemod.metrics.identity())


def test_renamed_kind_and_missing_curvature():
  with pytest.raises(ValueError, match="riemannian"):
    riemod.MetricDeclaration(kind="layerwise")
  tx = riemod.natural_gradient(0.1)
  _, g, _ = _curvature(F, jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="curvature="):
    tx.update(g, tx.init(PARAMS), PARAMS)
  with pytest.raises(TypeError, match="Curvature"):
    tx.update(g, tx.init(PARAMS), PARAMS, curvature={"not": "a curvature"})
  _, _, curv = _curvature(F, jnp.ones((4, 3)))
  with pytest.raises(TypeError, match="as keywords"):
    tx.update(g, tx.init(PARAMS), PARAMS, curv)

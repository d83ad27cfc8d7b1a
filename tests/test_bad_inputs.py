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


def _curvature(model, x, params=PARAMS, loss=LOSS):  # noqa: D103
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


def test_plain_function_with_functional_dense_takes_the_structured_path(dtype):
  """``riemod.nn.dense`` in a plain function gives DenseFactor modules and the same update as
  the generic (materialised) path of the same function, against a dense solve."""
  k = jax.random.split(jax.random.key(0), 3)
  params = {"a": {"kernel": jax.random.normal(k[0], (3, 5), dtype), "bias": jnp.zeros(5, dtype)},
            "b": {"kernel": jax.random.normal(k[1], (5, 2), dtype)}}
  x = jax.random.normal(k[2], (7, 3), dtype)
  structured = lambda p, x: riemod.nn.dense(p["b"], jnp.tanh(riemod.nn.dense(p["a"], x)))
  generic = lambda p, x: jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]
  results = []
  for f, kind in ((structured, "DenseFactor"), (generic, "RowsFactor")):
    _, g, curv = _curvature(f, x, params=params)
    assert [type(m.factor).__name__ for m in curv.modules] == [kind, kind]
    tx = riemod.layerwise_natural_gradient(1.0, mass=0.1)
    updates, _ = tx.update(g, tx.init(params), params, curvature=curv)
    results.append(jnp.concatenate([jnp.ravel(u) for u in jax.tree.leaves(updates)]))
  scale = float(jnp.abs(results[1]).max())
  tol = 2e-5 if dtype == jnp.float32 else 1e-12
  assert float(jnp.abs(results[0] - results[1]).max()) / scale < tol

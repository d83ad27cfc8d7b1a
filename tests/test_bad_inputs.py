"""Every bad input is answered by an error that names the argument and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
  tx = riemod.layerwise_natural_gradient(1.0, mass=0.1)
  kinds = []

  @jax.jit  # both paths in one compilation (eager, each step recompiles its loops)
  def both(params):
    out = []
    for f in (structured, generic):
      _, g, curv = _curvature(f, x, params=params)
      kinds.append([type(m.factor).__name__ for m in curv.modules])
      updates, _ = tx.update(g, tx.init(params), params, curvature=curv)
      out.append(jnp.concatenate([jnp.ravel(u) for u in jax.tree.leaves(updates)]))
    return out

  results = both(params)
  assert kinds == [["DenseFactor"] * 2, ["RowsFactor"] * 2]
  scale = float(jnp.abs(results[1]).max())
  tol = 2e-5 if dtype == jnp.float32 else 1e-12
  assert float(jnp.abs(results[0] - results[1]).max()) / scale < tol


# -- found by the adversarial run (benchmarks/adversarial.py); each checked to fail before its fix

T = jnp.arange(8.0).reshape(4, 2) / 8


def _one_step(tx, params, state):
  loss, g, c = riemod.value_grad_and_curvature(
      F, jnp.ones((4, 3)), lambda y: 0.5 * jnp.mean(jnp.sum((y - T) ** 2, -1)),
      riemod.metrics.identity(), params=params)
  updates, state = tx.update(g, state, params, curvature=c, value=loss)
  return optax.apply_updates(params, updates), state


_INJECTED = {}


def _injected(policy):
  """One compiled step per policy; the learning rate lives in the state (inject_hyperparams)."""
  if policy not in _INJECTED:
    tx = optax.inject_hyperparams(riemod.natural_gradient, static_args=("on_nonfinite",))(
        learning_rate=0.1, on_nonfinite=policy)
    _INJECTED[policy] = tx, jax.jit(lambda p, s: _one_step(tx, p, s))
  return _INJECTED[policy]


def _injected_step(policy, rate):
  tx, step = _injected(policy)
  state = tx.init(PARAMS)
  state.hyperparams["learning_rate"] = jnp.asarray(rate)
  return jax.block_until_ready(step(PARAMS, state))


@pytest.mark.parametrize("rate", [-0.1, float("nan"), float("inf"), np.float32(-0.1),
                                  lambda count: -0.1, lambda count: jnp.nan, None, "0.1",
                                  optax.constant_schedule(float("inf"))])
def test_bad_learning_rates_are_refused_by_name(rate):
  with pytest.raises((ValueError, TypeError), match="learning_rate"):
    riemod.natural_gradient(rate)


def test_a_zero_learning_rate_is_a_zero_step():
  riemod.natural_gradient(0.0)  # accepted
  params, _ = _injected_step("error", 0.0)
  np.testing.assert_array_equal(params["w"], PARAMS["w"])


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_negative_learning_rate_at_run_time_is_refused(policy):
  """A negative rate injected under jax.jit, and a schedule turning negative after step 0, would
  step up the loss; the step is refused under the non-finite policy instead."""
  schedule = riemod.natural_gradient(lambda count: jnp.where(count < 1, 0.1, -0.1),
                                     on_nonfinite=policy)
  if policy == "error":
    with pytest.raises(Exception, match="negative learning rate"):
      _injected_step(policy, -0.5)
    params, state = _one_step(schedule, PARAMS, schedule.init(PARAMS))
    with pytest.raises(FloatingPointError, match="negative learning rate"):
      _one_step(schedule, params, state)
    return
  params, state = _injected_step(policy, -0.5)
  np.testing.assert_array_equal(params["w"], PARAMS["w"])  # the refused step moved nothing
  assert int(riemod.find_state(state, riemod.ValidStepState).skipped_steps) == 1
  first, state = _one_step(schedule, PARAMS, schedule.init(PARAMS))
  params, state = _one_step(schedule, first, state)
  np.testing.assert_array_equal(params["w"], first["w"])
  assert int(riemod.find_state(state, riemod.ValidStepState).skipped_steps) == 1


def test_options_of_the_wrong_type_are_refused_by_name():
  with pytest.raises(TypeError, match="max_error"):
    riemod.natural_gradient(0.1, max_error="1e-2")
  with pytest.raises(TypeError, match="geometry"):
    riemod.natural_gradient(0.1, geometry={"mass": 0.1})
  with pytest.raises(TypeError, match="loss_fn"):
    riemod.value_grad_and_curvature(F, jnp.ones((4, 3)), 0.5, params=PARAMS)
  with pytest.raises(ValueError, match="declarations names module 'c'"):
    riemod.value_grad_and_curvature(F, jnp.ones((4, 3)), LOSS, declarations={"c": {}},
                                    params=PARAMS)


class _LinenStochastic(linen.Module):
  norm: bool = False

  @linen.compact
  def __call__(self, x):
    h = linen.Dense(4)(x)
    h = linen.BatchNorm(use_running_average=False)(h) if self.norm else linen.Dropout(
        0.5, deterministic=False)(h)
    return linen.Dense(2)(h)


def test_batch_statistics_and_stochastic_layers_are_refused_by_name():
  class Normed(nnx.Module):
    def __init__(self):
      self.dense = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      self.norm = nnx.BatchNorm(2, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.norm(self.dense(x))

  model = Normed()
  with pytest.raises(ValueError, match=r"BatchNorm.*model\.eval\(\)"):
    riemod.value_grad_and_curvature(model, jnp.ones((4, 3)), LOSS, riemod.metrics.identity())
  model.eval()
  riemod.value_grad_and_curvature(model, jnp.ones((4, 3)), LOSS, riemod.metrics.identity())
  for norm, match in ((False, "deterministic=True"), (True, "use_running_average=True")):
    module = _LinenStochastic(norm=norm)
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                            jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=match):
      _curvature(module.apply, jnp.ones((4, 3)), params=variables)


def test_optimizer_state_of_another_model_is_refused():
  """The adaptive mass keeps per-parameter moments: a state initialised on other shapes would
  broadcast (or fail inside jnp); it is refused by name."""
  geometry = riemod.Geometry(structure="full", mass_policy=riemod.masses.adaptive())
  tx = riemod.natural_gradient(0.1, geometry=geometry)
  _, g, c = _curvature(F, jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="optimizer state does not belong"):
    tx.update(g, tx.init({"w": jnp.ones((5, 2))}), PARAMS, curvature=c)
  with pytest.raises(TypeError, match="value="):
    tx.update(g, tx.init(PARAMS), PARAMS, curvature=c, value="high")


def test_declared_masses_as_jax_scalars_and_bools():
  dense = lambda p, x: x @ p["layer"]["kernel"] + p["layer"]["bias"]
  params = {"layer": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  _, _, curv = riemod.value_grad_and_curvature(
      dense, jnp.ones((4, 3)), LOSS, riemod.metrics.identity(), params=params,
      declarations={"layer": dict(mass=jnp.asarray(0.25))})
  assert {k: float(v) for k, v in curv.modules[0].mass.items()} == {"kernel": 0.25, "bias": 0.25}
  with pytest.raises(TypeError, match="bool"):
    riemod.MetricDeclaration(mass=True)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bfloat16])
def test_integer_and_bfloat16_inputs_give_float32_features(dtype):
  """flax promotes such inputs with float32 kernels to float32; the curvature's features must be
  those float32 values (they were kept in the input dtype: NaN steps for integers, bfloat16
  Gram matrices for bfloat16)."""
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = (jnp.arange(12).reshape(4, 3) % 5 - 2).astype(dtype)
  if dtype == jnp.bfloat16:
    x = x / 3  # not exact in bfloat16: a bfloat16 Gram matrix rounds its products again
  factors = [riemod.value_grad_and_curvature(model, v, LOSS, riemod.metrics.identity()
                                             )[2].modules[0].factor
             for v in (x, x.astype(jnp.float32))]
  assert factors[0].features.dtype == jnp.float32
  inv_mass = {"kernel": jnp.asarray(10.0), "bias": jnp.asarray(10.0)}
  np.testing.assert_allclose(factors[0].gram(inv_mass), factors[1].gram(inv_mass), rtol=1e-6)


def test_all_finite_reads_every_leaf_at_its_own_precision():
  # The step's refusal check: one reduction over all leaves (cast to their common dtype), so a
  # float64 value beyond float32's range is finite, and integer leaves are not read.
  from riemod._util import all_finite
  leaves = {"a": jnp.ones((3, 2)), "n": jnp.arange(4), "b": jnp.zeros(5)}
  assert bool(all_finite(leaves)) and bool(jax.jit(all_finite)(leaves))
  assert bool(all_finite({"n": jnp.arange(3)})) and bool(all_finite({}))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    for name in ("a", "b"):
      broken = dict(leaves, **{name: leaves[name].at[-1].set(bad)})
      assert not bool(all_finite(broken)) and not bool(jax.jit(all_finite)(broken))
  with jax.enable_x64(True):
    wide = {"f32": jnp.ones(2, jnp.float32), "f64": jnp.full(2, 1e300, jnp.float64)}
    assert bool(all_finite(wide))
    assert not bool(all_finite(dict(wide, f32=jnp.array([1.0, jnp.inf], jnp.float32))))

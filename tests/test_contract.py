"""The optax contract, checked for every transform riemod exports: jit, optax.chain,
inject_hyperparams, float32 and float64, nnx.Optimizer, a state round trip, and the same update
from an NNX module, a Linen module and a plain function."""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import riemod
from riemod.sampling import riemannian_sgld, sgld, sgworld

N = 32  # "data size" for the samplers


def _geometry():
  return riemod.Geometry(mass=0.5, mass_policy=riemod.masses.adaptive(0.9))


# name -> (factory taking learning_rate=..., the hyperparameters inject_hyperparams may vary)
TRANSFORMS = {
    "natural_gradient": lambda learning_rate: riemod.natural_gradient(learning_rate, mass=0.05),
    "layerwise_natural_gradient+spring": lambda learning_rate: riemod.layerwise_natural_gradient(
        learning_rate, mass=0.05, momentum=0.5),
    "layerwise_natural_gradient+adaptive": lambda learning_rate: riemod.layerwise_natural_gradient(
        learning_rate, geometry=_geometry()),
    "scale_by_metric": lambda learning_rate: optax.chain(
        riemod.scale_by_metric(riemod.Geometry(mass=0.05, structure="full")),
        optax.scale(-learning_rate)),
    "guarded": lambda learning_rate: riemod.certify.guarded(
        riemod.layerwise_natural_gradient(learning_rate, geometry=_geometry()), _geometry()),
    "grid_linesearch": lambda learning_rate: optax.chain(
        riemod.natural_gradient(learning_rate, mass=0.05),
        riemod.scale_by_grid_linesearch(num=4)),
    "riemannian_sgld": lambda learning_rate: riemannian_sgld(learning_rate, data_size=N, key=3),
    "sgld": lambda learning_rate: sgld(learning_rate * 1e-3, key=3),
    "sgworld": lambda learning_rate: sgworld(learning_rate * 1e-3, key=3),
}


class _MLP(linen.Module):
  @linen.compact
  def __call__(self, x):
    hidden = jnp.tanh(linen.Dense(5)(x))
    return linen.Dense(3)(hidden)


class _NNX(nnx.Module):
  def __init__(self, variables):
    p = variables["params"]
    self.a, self.b = nnx.Linear(4, 5, rngs=nnx.Rngs(0)), nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    self.a.kernel.value, self.a.bias.value = p["Dense_0"]["kernel"], p["Dense_0"]["bias"]
    self.b.kernel.value, self.b.bias.value = p["Dense_1"]["kernel"], p["Dense_1"]["bias"]

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


def _plain(p, x):
  h = jnp.tanh(x @ p["params"]["Dense_0"]["kernel"] + p["params"]["Dense_0"]["bias"])
  return h @ p["params"]["Dense_1"]["kernel"] + p["params"]["Dense_1"]["bias"]


def _problem(dtype):
  x = jax.random.normal(jax.random.key(1), (8, 4), dtype)
  t = jax.random.normal(jax.random.key(2), (8, 3), dtype)
  variables = jax.tree.map(lambda a: a.astype(dtype), _MLP().init(jax.random.key(0), x))
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
  return x, loss_fn, variables


def _update(tx, state, model, params, x, loss_fn):
  loss, grads, curv = riemod.value_grad_and_curvature(model, x, loss_fn,
                                                      riemod.metrics.identity(), params=params)
  value_fn = lambda p: loss_fn(model(p, x))
  return tx.update(grads, state, params, curvature=curv, value=loss, value_fn=value_fn)


def _flat(tree):
  return np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_jit_chain_roundtrip_and_frontends(name):
  factory = TRANSFORMS[name]
  x, loss_fn, variables = _problem(jnp.float32)
  tx = factory(learning_rate=0.1)
  state = tx.init(variables)
  eager, state1 = _update(tx, state, _MLP().apply, variables, x, loss_fn)
  jitted, _ = jax.jit(lambda s, p: _update(tx, s, _MLP().apply, p, x, loss_fn))(state, variables)
  np.testing.assert_allclose(_flat(jitted), _flat(eager), rtol=2e-4, atol=1e-6)
  assert np.all(np.isfinite(_flat(eager))) and np.any(_flat(eager))

  # A state survives serialisation: the next update is the same from the restored state.
  restored = flax.serialization.from_bytes(state1, flax.serialization.to_bytes(state1))
  params = optax.apply_updates(variables, eager)
  a, _ = _update(tx, state1, _MLP().apply, params, x, loss_fn)
  b, _ = _update(tx, restored, _MLP().apply, params, x, loss_fn)
  np.testing.assert_array_equal(_flat(a), _flat(b))

  # Inside optax.chain, and with the learning rate injected as a hyperparameter.
  chained = optax.chain(optax.clip_by_global_norm(1e6), tx)
  c, _ = _update(chained, chained.init(variables), _MLP().apply, variables, x, loss_fn)
  np.testing.assert_allclose(_flat(c), _flat(eager), rtol=1e-5, atol=1e-7)
  injected = optax.inject_hyperparams(factory)(learning_rate=0.1)
  d, _ = _update(injected, injected.init(variables), _MLP().apply, variables, x, loss_fn)
  np.testing.assert_allclose(_flat(d), _flat(eager), rtol=1e-5, atol=1e-7)

  # The same update from a plain function and from an NNX module through nnx.Optimizer. (The
  # adaptive mass is rank-one per dense kernel on recognised layers and a full diagonal on a
  # plain function's generic modules, so there the plain function steps differently.)
  if "adaptive" not in name and name != "guarded":
    e, _ = _update(tx, tx.init(variables), _plain, variables, x, loss_fn)
    np.testing.assert_allclose(_flat(e), _flat(eager), rtol=2e-4, atol=1e-6)
  model = _NNX(variables)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = nnx.as_pure(nnx.state(model, nnx.Param))

  @nnx.jit
  def step(model, opt):
    loss, grads, curv = riemod.value_grad_and_curvature(model, x, loss_fn,
                                                        riemod.metrics.identity())
    graphdef, rest = nnx.split(model, nnx.Param, ...)[0], nnx.split(model, nnx.Param, ...)[2]
    value_fn = lambda p: loss_fn(nnx.merge(graphdef, p, rest)(x))
    opt.update(model, grads, curvature=curv, value=loss, value_fn=value_fn)

  step(model, opt)
  after = nnx.as_pure(nnx.state(model, nnx.Param))
  moved = jax.tree.map(lambda u, v: u - v, after, before)
  linen_order = np.concatenate([np.ravel(eager["params"][m][k]) for m in ("Dense_0", "Dense_1")
                                for k in ("bias", "kernel")])
  nnx_order = np.concatenate([np.ravel(moved[m][k]) for m in ("a", "b") for k in ("bias", "kernel")])
  np.testing.assert_allclose(nnx_order, linen_order, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_float64_updates_stay_float64(name):
  with jax.enable_x64(True):
    x, loss_fn, variables = _problem(jnp.float64)
    tx = TRANSFORMS[name](learning_rate=0.1)
    updates, _ = jax.jit(lambda p: _update(tx, tx.init(p), _MLP().apply, p, x, loss_fn))(variables)
    assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(updates))
    assert np.all(np.isfinite(_flat(updates)))

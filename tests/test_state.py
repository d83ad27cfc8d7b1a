"""find_state finds a transform's state through chains, inject_hyperparams, masks and wrappers."""

from __future__ import annotations

import doctest
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import riemod
import riemod.state
from riemod import find_state


class TagState(NamedTuple):
  """A state that records which transform it belongs to (``tag``) and its step count."""
  tag: jax.Array
  count: jax.Array


def tagged(tag: float) -> optax.GradientTransformation:
  """Identity on the updates; its state carries ``tag`` so a test can tell states apart."""

  def init(params):
    del params
    return TagState(jnp.asarray(tag, jnp.float32), jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    return updates, TagState(state.tag, state.count + 1)

  return optax.GradientTransformation(init, update)


def tagged_with_lr(learning_rate: float) -> optax.GradientTransformation:
  return optax.chain(tagged(learning_rate), optax.scale(-learning_rate))


PARAMS = {"a": jnp.ones(3), "b": {"c": jnp.zeros((2, 2))}}


def _tag(tx, params=PARAMS):
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)  # count becomes 1
  return find_state(state, TagState)


def test_doctest():
  results = doctest.testmod(riemod.state, optionflags=doctest.ELLIPSIS)
  assert results.attempted >= 2 and results.failed == 0


def test_plain_and_absent():
  found = _tag(tagged(2.0))
  assert float(found.tag) == 2.0 and int(found.count) == 1
  assert find_state(optax.sgd(0.1).init(PARAMS), TagState) is None


def test_first_in_a_chain_and_nested_chains():
  assert float(_tag(optax.chain(optax.clip(1.0), tagged(3.0), tagged(4.0))).tag) == 3.0
  assert float(_tag(optax.chain(optax.chain(optax.sgd(0.1), tagged(5.0)), tagged(6.0))).tag) == 5.0


def test_inject_hyperparams():
  tx = optax.inject_hyperparams(tagged_with_lr)(learning_rate=0.25)
  found = _tag(tx)
  assert float(found.tag) == 0.25 and int(found.count) == 1


def test_masked_and_multi_transform():
  mask = {"a": True, "b": {"c": False}}
  assert float(_tag(optax.masked(tagged(7.0), mask)).tag) == 7.0
  tx = optax.multi_transform({"tag": tagged(8.0), "sgd": optax.sgd(0.1)},
                             {"a": "sgd", "b": {"c": "tag"}})
  assert float(_tag(tx).tag) == 8.0


def test_wrappers():
  assert int(_tag(optax.apply_if_finite(tagged(1.0), max_consecutive_errors=3)).count) == 1
  multi = optax.MultiSteps(tagged(9.0), every_k_schedule=2)
  state = multi.init(PARAMS)
  assert float(find_state(state, TagState).tag) == 9.0


def test_type_not_name_decides():
  """A dict key or another NamedTuple spelled like the class is not a match."""

  class Other(NamedTuple):  # same class name, different type
    tag: jax.Array
    count: jax.Array

  Other.__name__ = "TagState"
  tree = {"TagState": 1.0, "x": Other(jnp.zeros(()), jnp.zeros(())), "y": tagged(2.5).init(None)}
  found = find_state(tree, TagState)
  assert isinstance(found, TagState) and float(found.tag) == 2.5


def test_inside_jit_and_nnx_optimizer():
  tx = optax.chain(optax.clip(1.0), tagged(1.5))

  @jax.jit
  def count_after_update(state):
    _, state = tx.update(jax.tree.map(jnp.ones_like, PARAMS), state, PARAMS)
    return find_state(state, TagState).count

  assert int(count_after_update(tx.init(PARAMS))) == 1
  model = riemod.nn.Dense(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  found = find_state(opt.opt_state, TagState)
  assert found is not None and float(jnp.asarray(found.tag[...])) == 1.5


def test_riemod_transform_state_in_a_chain():
  """The real use: the metric state of riemod's transform behind a clip, under inject_hyperparams."""
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(riemod.layerwise_natural_gradient)(learning_rate=0.1))
  state = tx.init(PARAMS)
  state_type = riemod.MetricState
  # The reference: every instance in flattening order, reached with jax's own traversal.
  by_hand = [n for n in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, state_type))
             if isinstance(n, state_type)]
  assert len(by_hand) == 1
  assert find_state(state, state_type) is by_hand[0]


def test_rejects_non_namedtuple_types():
  with pytest.raises(TypeError, match="NamedTuple"):
    find_state({}, dict)
  with pytest.raises(TypeError, match="state_type"):
    find_state({}, "TagState")

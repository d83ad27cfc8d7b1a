"""Trainers for the minibatch MLP tasks (digits classifier, digits autoencoder).

Every optimizer trains the same ``riemod.nn.Sequential`` of ``riemod.nn.Dense`` layers (an NNX
model; for Adam and SGD the metric declarations are simply unused), split once into a graph
definition and a parameter state, so that each step is one pure ``jax.jit`` function of
``(params, opt_state, batch indices, step, seed)``: one compilation per hyperparameter setting,
shared by all seeds. The batch is gathered from the device-resident training set inside the step.

* ``adam``: ``optax.adam(learning_rate)``.
* ``sgd``: ``optax.sgd(learning_rate, momentum=0.9)`` (heavy-ball).
* ``riemod``: the configuration dict of :mod:`benchmarks.riemod_config`;
  :func:`riemod.value_grad_and_curvature` on the NNX model, then the transform's ``update`` with
  ``curvature=`` and ``value=``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import riemod
from benchmarks import harness, problems, riemod_config

ACTIVATIONS = {"tanh": jnp.tanh, None: None}


def build_model(sizes: Sequence[int], activations: Sequence[str | None], seed: int):
  """The NNX model with the shared NumPy initialisation of :func:`problems.mlp_init`."""
  init = problems.mlp_init(list(sizes), seed)
  layers = []
  for (w, b), act in zip(init, activations):
    dense = riemod.nn.Dense(w.shape[0], w.shape[1], rngs=nnx.Rngs(0))
    dense.kernel.value = jnp.asarray(w)
    dense.bias.value = jnp.asarray(b)
    layers.append(dense)
    if act is not None:
      layers.append(ACTIVATIONS[act])
  return riemod.nn.Sequential(*layers)


class MLPTask:
  """One supervised MLP problem: data, architecture, loss and evaluation.

  Args:
    sizes: layer widths.
    activations: per layer ``"tanh"`` or ``None``.
    loss: ``(outputs, targets) -> scalar`` batch-mean loss.
    targets: ``"labels"`` (classification) or ``"inputs"`` (autoencoder).
    batch_size, num_steps: as in the issue.
    evaluate: ``(apply, params) -> {metric: value}`` pieces computed in one jitted call.
  """

  def __init__(self, sizes, activations, loss: Callable, targets: str, batch_size: int,
               num_steps: int, eval_fn: Callable):
    self.sizes, self.activations = list(sizes), list(activations)
    self.loss, self.targets = loss, targets
    self.batch_size, self.num_steps = batch_size, num_steps
    x_train, y_train, x_test, y_test = problems.digits()
    self.x_train, self.y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    self.x_test, self.y_test = jnp.asarray(x_test), jnp.asarray(y_test)
    self.graphdef, _ = nnx.split(build_model(self.sizes, self.activations, 0))
    self._cache: dict[str, Any] = {}
    self._eval = jax.jit(lambda p: eval_fn(self.apply, p, self))

  def model(self, seed: int):
    """The initial model of ``seed`` (subclasses with another architecture override it)."""
    return build_model(self.sizes, self.activations, seed)

  def apply(self, params, x):
    return nnx.merge(self.graphdef, params)(x)

  def batch(self, idx):
    x = self.x_train[idx]
    return x, (self.y_train[idx] if self.targets == "labels" else x)

  def _compiled(self, opt: str, hyper: dict[str, Any]):
    key = opt + json.dumps(hyper, sort_keys=True)
    if key in self._cache:
      return self._cache[key]
    if opt in ("adam", "sgd"):
      tx = optax.adam(hyper["learning_rate"]) if opt == "adam" else optax.sgd(
          hyper["learning_rate"], momentum=hyper.get("momentum", 0.9))

      def step(params, opt_state, idx, i, seed):
        x, t = self.batch(idx)
        loss, grads = jax.value_and_grad(lambda p: self.loss(self.apply(p, x), t))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    elif opt.startswith("riemod"):
      tx, metric, vgc_kwargs = riemod_config.build(hyper)

      def step(params, opt_state, idx, i, seed):
        x, t = self.batch(idx)
        key = jax.random.fold_in(jax.random.key(seed), i)
        model = nnx.merge(self.graphdef, params)
        loss, grads, curvature = riemod.value_grad_and_curvature(
            model, x, lambda out: self.loss(out, t), metric, key=key, **vgc_kwargs)
        updates, opt_state = tx.update(grads, opt_state, params, curvature=curvature, value=loss)
        return optax.apply_updates(params, updates), opt_state, loss
    else:
      raise ValueError(opt)
    self._cache[key] = (tx, jax.jit(step))
    return self._cache[key]

  def trainer(self, opt: str, hyper: dict[str, Any], seed: int) -> harness.Trainer:
    tx, step = self._compiled(opt, hyper)
    table = problems.batch_table(seed, self.x_train.shape[0], self.batch_size, self.num_steps)
    _, params0 = nnx.split(self.model(seed))
    seed_arr = jnp.asarray(seed, jnp.uint32)

    def init():
      return params0, tx.init(params0)

    def one_step(state, i):
      params, opt_state, loss = step(state[0], state[1], table[i % len(table)],
                                     jnp.asarray(i, jnp.int32), seed_arr)
      return (params, opt_state), loss

    def evaluate(state):
      return {k: float(v) for k, v in self._eval(state[0]).items()}

    return harness.Trainer(opt, hyper, init, one_step, evaluate)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def half_squared_error(out, target):
  return 0.5 * jnp.mean(jnp.sum((out - target) ** 2, axis=-1))

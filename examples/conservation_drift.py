"""Monitored drift of conservation laws under optax training (writes ``conservation_drift.png`` to
``--out``, default ``riemod-output/conservation_drift``).

Left: ``max |(U^T U - V^T V)_k - (U^T U - V^T V)_0|`` along plain gradient descent for three learning
rates, against the exact gradient flow (RK4). Middle: one-step drift against the learning rate
(slope 2: ``O(lr^2)``). Right: heavy ball (``optax.sgd(momentum=0.9)``) breaks ``U^T U - V^T V`` while
the decaying charge ``beta^{-k} (W_k^T W_{k+1} - W_{k+1}^T W_k)`` stays constant.

Run: ``python examples/conservation_drift.py [--out DIR]``.
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

from riemod import conservation as cons

jax.config.update("jax_enable_x64", True)


def track_laws(loss_fn, optimizer, params, laws, steps):
  """Full-batch training with ``optimizer``; the laws ``(steps + 1, K)`` at every step."""

  def step(carry, _):
    current, state = carry
    updates, state = optimizer.update(jax.grad(loss_fn)(current), state, current)
    current = optax.apply_updates(current, updates)
    return (current, state), laws(current)

  _, values = jax.jit(lambda p: jax.lax.scan(step, (p, optimizer.init(p)), None, length=steps))(params)
  return np.concatenate([np.asarray(laws(params))[None], np.asarray(values)])


def drift_scaling(loss_fn, params, laws, rates):
  """One plain gradient step per learning rate: the law drift and its log-log slope in the rate."""
  grads = jax.grad(loss_fn)(params)
  before = laws(params)
  drift = np.asarray([float(jnp.max(jnp.abs(laws(jax.tree_util.tree_map(lambda p, g: p - rate * g, params,
                                                                        grads)) - before)))
                      for rate in rates])
  return {"drift": drift, "exponent": float(np.polyfit(np.log(rates), np.log(drift), 1)[0])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path("riemod-output/conservation_drift"),
                      help="output folder (default: %(default)s)")
  out = parser.parse_args().out
  rep = cons.factorization(4, 3, 2)
  rng = np.random.default_rng(0)
  inputs, targets = jnp.asarray(rng.normal(size=(20, 4))), jnp.asarray(rng.normal(size=(20, 3)))
  loss = lambda p: jnp.mean(jnp.log(jnp.cosh(inputs @ rep.phi(p) - targets)))
  params = rep.sample(jax.random.PRNGKey(0), jnp.float64)
  horizon = 4.0

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for lr in (0.1, 0.05, 0.025):
    steps = int(horizon / lr)
    laws = track_laws(loss, optax.sgd(lr), params, rep.known_laws, steps)
    drift = np.abs(laws - laws[0]).max(axis=1)
    axes[0].semilogy(lr * np.arange(steps + 1)[1:], drift[1:], label=f"GD lr={lr}")
  _, flow = cons.integrate_gradient_flow(loss, params, time=horizon, steps=2000, observe=rep.known_laws)
  flow_drift = np.abs(np.asarray(flow - flow[0])).max(axis=1)
  axes[0].semilogy(np.linspace(0, horizon, 2001)[1:], np.maximum(flow_drift[1:], 1e-17), "k--",
                   label="gradient flow (RK4)")
  axes[0].set(xlabel="time = step x lr", ylabel="max |h_k - h_0|", title="U^T U - V^T V under GD")
  axes[0].legend(fontsize=8)

  rates = np.geomspace(1e-3, 1e-1, 9)
  scaling = drift_scaling(loss, params, rep.known_laws, rates)
  axes[1].loglog(rates, scaling["drift"], "o-", label=f"measured, slope {scaling['exponent']:.3f}")
  axes[1].loglog(rates, scaling["drift"][0] * (rates / rates[0]) ** 2, "k:", label="lr^2")
  axes[1].set(xlabel="learning rate", ylabel="one-step drift", title="per-step drift is O(lr^2)")
  axes[1].legend(fontsize=8)

  # beta^{-k} amplifies the round-off of A_k ~ beta^k: keep k moderate (0.9^-120 ~ 3e5).
  beta, lr, steps = 0.9, 0.02, 120
  velocity = rep.sample(jax.random.PRNGKey(1), jnp.float64)
  opt = optax.chain(optax.sgd(lr, momentum=beta), cons.charge_monitor(beta))
  state = jax.tree_util.tree_map(
      lambda s: s._replace(trace=velocity) if isinstance(s, optax.TraceState) else s, opt.init(params),
      is_leaf=lambda s: isinstance(s, optax.TraceState))

  @jax.jit
  def step(current, state):
    updates, state = opt.update(jax.grad(loss)(current), state, current)
    current = optax.apply_updates(current, updates)
    return current, state, rep.known_laws(current), cons.find_state(state, cons.ChargeMonitorState).charge

  current, grams, charges = params, [], []
  for _ in range(steps):
    current, state, gram, charge = step(current, state)
    grams.append(np.asarray(gram))
    charges.append(np.asarray(charge))
  grams, charges = np.asarray(grams), np.asarray(charges)
  axes[2].semilogy(np.abs(grams - grams[0]).max(axis=1)[1:], label="U^T U - V^T V (broken)")
  axes[2].semilogy(np.maximum(np.abs(charges - charges[0]).max(axis=1)[1:] / np.abs(charges[0]).max(), 1e-17),
                   label="decaying charge (relative)")
  axes[2].set(xlabel="heavy-ball step", ylabel="drift", title=f"momentum beta={beta}")
  axes[2].legend(fontsize=8)
  fig.tight_layout()
  path = out / "conservation_drift.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  print(f"slope of one-step drift vs lr: {scaling['exponent']:.4f}; wrote {path}")


if __name__ == "__main__":
  main()

"""Small experiment loops shared by the conservation tests (not part of the library)."""

import jax
import jax.numpy as jnp
import optax

from riemod.conservation import HeavyBallState, find_state, scale_by_heavy_ball


def run_heavy_ball(loss_fn, params, steps, *, time_step, friction=0.0, noise=0.0, mass=None, seed=0):
  """``steps`` heavy-ball updates; per step ``inertia``, ``kinetic``, ``loss``, ``velocity_sq``,
  ``dissipated`` (arrays of length ``steps``, record ``k`` at ``t_k = k dt``) and the final ``params``."""
  core = scale_by_heavy_ball(time_step, friction, noise, mass, seed)

  def step(carry, _):
    current, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(current)
    direction, state = core.update(grads, state, current, value=loss)
    current = jax.tree_util.tree_map(lambda p, d: p - time_step * d, current, direction)
    inner = find_state(state, HeavyBallState)
    return (current, state), dict(inertia=inner.inertia, kinetic=inner.kinetic, loss=loss,
                                  velocity_sq=inner.velocity_sq, dissipated=inner.dissipated)

  (final, _), history = jax.jit(
      lambda start: jax.lax.scan(step, (start, core.init(start)), None, length=steps))(params)
  return dict(history, params=final)


def record_laws(loss_fn, optimizer, params, laws, steps):
  """Full-batch training with ``optimizer``; the laws ``(steps + 1, K)`` at every step."""

  def step(carry, _):
    current, state = carry
    grads = jax.grad(loss_fn)(current)
    updates, state = optimizer.update(grads, state, current)
    current = optax.apply_updates(current, updates)
    return (current, state), laws(current)

  (_, _), values = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
  return jnp.concatenate([laws(params)[None], values])

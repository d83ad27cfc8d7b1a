"""The 2-D Poisson PINN of the energy natural gradient paper, shared by the demo and the benchmarks.

``-Laplace u = f`` on the unit square with ``u* = sin(pi x) sin(pi y)``, ``f = 2 pi^2 u*`` and zero
boundary values; the setting of Mueller & Zeinhofer (ICML 2023):

* network: 2-32-1 with tanh (129 parameters), weights and biases drawn from ``0.1 N(0, 1)``, kernels
  stored ``(out, in)`` and applied as ``w @ h + b``;
* collocation: the 28 x 28 interior grid ``(i/29, j/29)``, ``i, j = 1..28`` (784 points) and 29
  points per side of the boundary, ``k/29`` for ``k = 0..28`` walked counter-clockwise (116 points);
* loss ``L = mean_int (Lap u + f)^2 + 4 mean_bd u^2`` (the boundary mean is weighted by the boundary
  length 4);
* error: the absolute L2 error ``sqrt(mean (u - u*)^2)`` on the 198 x 198 interior grid
  ``(i/199, j/199)``, ``i, j = 1..198``.

riemod's losses are means over the batch, ``0.5 * mean(r^2)`` for the identity metric, with one
scaled residual per collocation point so that this equals ``L``: with ``N = 900`` points,
``r = sqrt(2 N / 784) (Lap u + f)`` inside and ``r = sqrt(8 N / 116) u`` on the boundary. Equivalently
``L = 0.5 ||r / sqrt(N)||^2``, and the Gauss-Newton matrix of ``L`` is ``J^T J / N`` with
``J = dr/dtheta``, which is the metric riemod pulls back (``riemod.metrics.identity()`` rows scaled
by ``1/sqrt(N)``). The paper's Gram matrix ``mean_int grad(Lap u) grad(Lap u)^T + 4 mean_bd grad u
grad u^T`` is half of it, so the paper's step with step size ``a`` is riemod's with ``2 a``.

References:
  J. Mueller and M. Zeinhofer, *Achieving High Accuracy with PINNs via Energy Natural Gradient
  Descent*, ICML 2023 (arXiv 2302.13163).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SIZES = (2, 32, 1)
INIT_SCALE = 0.1
BOUNDARY_WEIGHT = 4.0  # the boundary's length: the paper integrates over the boundary


class Problem(NamedTuple):
  """Collocation batch and test grid of the paper's Poisson problem.

  Attributes:
    batch: ``(points (N, 2), interior flag (N,), weight (N,))``: riemod's input ``x``.
    interior: the 784 interior points.
    boundary: the 116 boundary points.
    test: the 198 x 198 evaluation grid.
  """

  batch: tuple[jax.Array, jax.Array, jax.Array]
  interior: jax.Array
  boundary: jax.Array
  test: jax.Array


def grid_points(n: int) -> np.ndarray:
  """The ``(n - 2)^2`` interior points ``(i, j) / (n - 1)``, ``i, j = 1..n-2`` (``x`` major)."""
  t = np.arange(1, n - 1) / (n - 1)
  gx, gy = np.meshgrid(t, t, indexing="ij")
  return np.stack([gx.ravel(), gy.ravel()], -1)


def boundary_points(n: int = 30) -> np.ndarray:
  """``4 (n - 1)`` boundary points: ``n - 1`` per side, corners once, counter-clockwise."""
  s = np.linspace(0.0, 1.0, n)[:-1]
  zeros, ones = np.zeros_like(s), np.ones_like(s)
  return np.concatenate([np.stack([s, zeros], -1), np.stack([ones, s], -1),
                         np.stack([1 - s, ones], -1), np.stack([zeros, 1 - s], -1)])


def problem(dtype=jnp.float64) -> Problem:
  """The paper's collocation points (784 + 116) and its 198 x 198 test grid."""
  interior, boundary = grid_points(30), boundary_points(30)
  n_int, n_bd = len(interior), len(boundary)
  n = n_int + n_bd
  points = np.concatenate([interior, boundary])
  flag = np.concatenate([np.ones(n_int), np.zeros(n_bd)])
  weight = np.where(flag > 0, np.sqrt(2.0 * n / n_int), np.sqrt(2.0 * BOUNDARY_WEIGHT * n / n_bd))
  cast = lambda a: jnp.asarray(a, dtype)
  return Problem((cast(points), cast(flag), cast(weight)), cast(interior), cast(boundary),
                 cast(grid_points(200)))


def init_params(seed: int, sizes=SIZES, scale: float = INIT_SCALE, dtype=jnp.float64) -> list:
  """``[{"w": (out, in), "b": (out,)}]`` from ``scale * N(0, 1)``, the paper's key layout.

  The key ``jax.random.key(seed)`` is split into one key per layer size, and each layer's key into
  a kernel and a bias key. Which numbers a seed gives depends on jax's random stream
  (``jax_threefry_partitionable``, on by default since jax 0.5); the paper ran the older stream.
  """
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  params = []
  for n_in, n_out, key in zip(sizes[:-1], sizes[1:], keys):
    w_key, b_key = jax.random.split(key)
    params.append({"w": scale * jax.random.normal(w_key, (n_out, n_in), dtype),
                   "b": scale * jax.random.normal(b_key, (n_out,), dtype)})
  return params


def network(params: list, z: jax.Array) -> jax.Array:
  """``u(z)`` for one point ``z`` of shape (2,): a scalar."""
  h = z
  for layer in params[:-1]:
    h = jnp.tanh(layer["w"] @ h + layer["b"])
  return (params[-1]["w"] @ h + params[-1]["b"])[0]


def u_exact(z: jax.Array) -> jax.Array:
  return jnp.sin(jnp.pi * z[..., 0]) * jnp.sin(jnp.pi * z[..., 1])


def source(z: jax.Array) -> jax.Array:
  return 2 * jnp.pi**2 * u_exact(z)


def laplacian(params: list, z: jax.Array) -> jax.Array:
  """``Lap u(z)``: the trace of the input Hessian (forward over reverse)."""
  return jnp.trace(jax.hessian(lambda s: network(params, s))(z))


def residuals(params: list, batch) -> jax.Array:
  """Scaled residuals ``(B, 1)``: ``w (Lap u + f)`` inside, ``w u`` on the boundary."""
  points, flag, weight = batch

  def one(z, inside):
    return jnp.where(inside > 0, laplacian(params, z) + source(z), network(params, z))

  return (weight * jax.vmap(one)(points, flag))[:, None]


def half_mean_square(r: jax.Array) -> jax.Array:
  """riemod's loss of the scaled residuals: ``0.5 mean(r^2)`` equals the paper's loss."""
  return 0.5 * jnp.mean(r**2)


def loss(params: list, prob: Problem) -> jax.Array:
  """The paper's loss ``mean_int (Lap u + f)^2 + 4 mean_bd u^2``, written directly."""
  lap = jax.vmap(lambda z: laplacian(params, z))(prob.interior)
  u_bd = jax.vmap(lambda z: network(params, z))(prob.boundary)
  return jnp.mean((lap + source(prob.interior))**2) + BOUNDARY_WEIGHT * jnp.mean(u_bd**2)


def l2_error(params: list, prob: Problem) -> jax.Array:
  """Absolute L2 error ``sqrt(mean (u - u*)^2)`` on the test grid (the unit square has area 1)."""
  u = jax.vmap(lambda z: network(params, z))(prob.test)
  return jnp.sqrt(jnp.mean((u - u_exact(prob.test))**2))


def riemod_step(tx, prob: Problem):
  """A jitted step ``(params, state) -> (params, state, loss)`` of an optax transform ``tx`` that
  takes riemod's curvature (and, for a chained line search, ``value_fn``; for the certified
  controller, ``apply_fn`` and ``loss_fn``)."""
  import optax

  import riemod

  metric = riemod.metrics.identity()
  # The line search's loss is the paper's, written directly: the same value as
  # 0.5 mean(r^2), but residuals() evaluates both branches of its where (the Laplacian at the
  # boundary points too), which made the 31-candidate search slower (the step-time ratio to the
  # authors' method before and after: benchmarks/results/engd-poisson.md).
  loss_of = lambda p: loss(p, prob)

  @jax.jit
  def step(params: Any, state: Any):
    value, grads, curvature = riemod.value_grad_and_curvature(
        residuals, prob.batch, half_mean_square, metric, params=params)
    updates, state = tx.update(grads, state, params, curvature=curvature, value=value,
                               value_fn=loss_of, apply_fn=lambda p: residuals(p, prob.batch),
                               loss_fn=half_mean_square)
    return optax.apply_updates(params, updates), state, value

  return step


def adam_step(tx, prob: Problem):
  """A jitted optax step on the same loss: ``(params, state) -> (params, state, loss)``."""
  import optax

  loss_of = lambda p: half_mean_square(residuals(p, prob.batch))

  @jax.jit
  def step(params: Any, state: Any):
    value, grads = jax.value_and_grad(loss_of)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  return step

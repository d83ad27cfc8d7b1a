"""The ENGD paper's Poisson problem (riemod/cli/_pinn.py), its example, and the older PINN example.

Checks against closed forms and dense linear algebra: the problem's sizes, the residual scaling
(``0.5 mean(r^2)`` is the paper's loss, and ``J^T J / N`` is twice the paper's Gram matrix), the
tanh network's Laplacian, and that the example trains with exactly the benchmark's optimizer.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from riemod.cli import _pinn
from riemod.state import find_state
from riemod.transforms import MetricState

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(relative: str):
  spec = importlib.util.spec_from_file_location(pathlib.Path(relative).stem, ROOT / relative)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(autouse=True)
def x64():
  """float64 for the test; the examples switch it on globally at import, so restore it after."""
  before = jax.config.jax_enable_x64
  with jax.enable_x64(True):
    yield
  jax.config.update("jax_enable_x64", before)


def test_problem_is_the_papers_setup():
  prob = _pinn.problem()
  points, flag, weight = prob.batch
  assert prob.interior.shape == (784, 2) and prob.boundary.shape == (116, 2)
  assert prob.test.shape == (198 * 198, 2) and points.shape == (900, 2)
  assert float(flag.sum()) == 784
  # interior: the 28 x 28 grid i/29 strictly inside; boundary: 29 distinct points per side.
  np.testing.assert_allclose(np.unique(np.asarray(prob.interior[:, 0])), np.arange(1, 29) / 29)
  bd = np.asarray(prob.boundary)
  assert len({tuple(p) for p in np.round(bd, 12)}) == 116
  on_edge = np.isclose(bd, 0).any(1) | np.isclose(bd, 1).any(1)
  assert on_edge.all()
  for side in (bd[:, 1] == 0, bd[:, 0] == 1, bd[:, 1] == 1, bd[:, 0] == 0):
    assert side.sum() == 30  # 29 per side plus one corner shared with the next side
  params = _pinn.init_params(0)
  sizes = [(l["w"].shape, l["b"].shape) for l in params]
  assert sizes == [((32, 2), (32,)), ((1, 32), (1,))]
  assert sum(l["w"].size + l["b"].size for l in params) == 129
  assert params[0]["w"].dtype == jnp.float64


def test_scaled_residuals_give_the_papers_loss():
  prob = _pinn.problem()
  params = _pinn.init_params(3, scale=0.7)
  r = jax.jit(_pinn.residuals)(params, prob.batch)
  direct = jax.jit(_pinn.loss)(params, prob)
  lap = jax.vmap(lambda z: _pinn.laplacian(params, z))(prob.interior)
  u_bd = jax.vmap(lambda z: _pinn.network(params, z))(prob.boundary)
  by_hand = np.mean((np.asarray(lap) + np.asarray(_pinn.source(prob.interior)))**2) + 4 * np.mean(
      np.asarray(u_bd)**2)
  np.testing.assert_allclose(float(_pinn.half_mean_square(r)), float(direct), rtol=1e-12)
  np.testing.assert_allclose(float(direct), by_hand, rtol=1e-12)


def test_laplacian_matches_the_closed_form():
  """u = a . tanh(W z + b) + c has Lap u = sum_j a_j |W_j|^2 tanh''(W_j z + b_j)."""
  params = _pinn.init_params(5, scale=0.8)
  w, b, a = params[0]["w"], params[0]["b"], params[1]["w"][0]
  z = jnp.array([0.3, 0.7])
  t = jnp.tanh(w @ z + b)
  closed = jnp.sum(a * jnp.sum(w**2, 1) * (-2 * t * (1 - t**2)))
  np.testing.assert_allclose(float(_pinn.laplacian(params, z)), float(closed), rtol=1e-12)


def test_riemod_metric_is_twice_the_papers_gram():
  """The scaling the docs state: J^T J / N (riemod's Gauss-Newton metric) = 2 x the paper's Gram,
  and its gradient is the paper's loss gradient."""
  from jax.flatten_util import ravel_pytree

  prob = _pinn.problem()
  flat, unravel = ravel_pytree(_pinn.init_params(1, scale=0.5))
  n = prob.batch[0].shape[0]
  jac = jax.jit(jax.jacrev(lambda th: _pinn.residuals(unravel(th), prob.batch)[:, 0]))(flat)
  d_lap = jax.jit(jax.vmap(jax.grad(lambda th, z: _pinn.laplacian(unravel(th), z)), (None, 0)))
  d_u = jax.jit(jax.vmap(jax.grad(lambda th, z: _pinn.network(unravel(th), z)), (None, 0)))
  j_int, j_bd = d_lap(flat, prob.interior), d_u(flat, prob.boundary)
  gram = j_int.T @ j_int / 784 + 4 * j_bd.T @ j_bd / 116
  np.testing.assert_allclose(np.asarray(jac.T @ jac / n), 2 * np.asarray(gram), rtol=1e-10,
                             atol=1e-12 * float(jnp.abs(gram).max()))
  r = _pinn.residuals(unravel(flat), prob.batch)[:, 0]
  grad = jax.jit(jax.grad(lambda th: _pinn.loss(unravel(th), prob)))(flat)
  np.testing.assert_allclose(np.asarray(jac.T @ r / n), np.asarray(grad),
                             rtol=1e-10, atol=1e-12)


def test_example_trains_with_the_benchmarks_optimizer(tmp_path):
  example = _load("examples/pinn_engd_poisson.py")
  history = example.main(["--steps", "20", "--out", str(tmp_path), "--no-progress"])
  saved = json.loads((tmp_path / "history.json").read_text())
  assert saved["history"] == history and (tmp_path / "error.png").stat().st_size > 5_000
  assert history[-1]["l2"] < 0.05 * history[0]["l2"]  # 0.46 at seed 0's init
  # The benchmark's riemod transform for the same setting takes the same steps: from the same
  # parameters, step by step, the updates agree within the two steps' own error estimates (two
  # separately compiled programs may round differently, and at mass 1e-8 twenty steps amplify
  # such differences to percent level, so whole trajectories are not compared).
  from benchmarks import task_engd_poisson as task

  prob = _pinn.problem()
  txs = (example.optimizer(1e-8, None), task.riemod_transform(dict(mass=1e-8, momentum=None)))
  steps = [_pinn.riemod_step(tx, prob) for tx in txs]
  p = _pinn.init_params(0)
  states = [tx.init(p) for tx in txs]
  vec = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  for _ in range(20):
    (a, sa, _), (b, sb, _) = steps[0](p, states[0]), steps[1](p, states[1])
    states = [sa, sb]
    estimates = sum(float(np.max(find_state(s, MetricState).report.error)) for s in states)
    ua, ub = vec(a) - vec(p), vec(b) - vec(p)
    assert np.linalg.norm(ua - ub) <= estimates * np.linalg.norm(ua)
    p = a
  np.testing.assert_allclose(float(_pinn.l2_error(p, prob)), history[-1]["l2"], rtol=1e-12)


def test_authors_step_is_a_pseudo_inverse_gauss_newton_step():
  """The benchmark's baseline: lstsq on the Gram, then the best of 0.5**k by the loss."""
  from jax.flatten_util import ravel_pytree

  from benchmarks import task_engd_poisson as task

  # Few points: the Gram has rank <= 13 with a clear gap to zero, so the pseudo-inverse is well
  # defined (on the full problem its spectrum runs continuously into round-off).
  full = _pinn.problem()
  prob = full._replace(interior=full.interior[::97], boundary=full.boundary[::29])
  n_int, n_bd = prob.interior.shape[0], prob.boundary.shape[0]
  params = _pinn.init_params(2, scale=1.0)
  new, _, value = task.authors_step(prob)(params, ())
  flat, unravel = ravel_pytree(params)
  d_lap = jax.jit(jax.vmap(jax.grad(lambda th, z: _pinn.laplacian(unravel(th), z)), (None, 0)))
  d_u = jax.jit(jax.vmap(jax.grad(lambda th, z: _pinn.network(unravel(th), z)), (None, 0)))
  j_int, j_bd = np.asarray(d_lap(flat, prob.interior)), np.asarray(d_u(flat, prob.boundary))
  gram = j_int.T @ j_int / n_int + 4 * j_bd.T @ j_bd / n_bd
  grad = np.asarray(jax.jit(jax.grad(lambda th: _pinn.loss(unravel(th), prob)))(flat))
  # numpy's pseudo-inverse with lstsq's default cut-off (eps * max(shape) relative)
  direction = np.linalg.pinv(gram, rcond=np.finfo(float).eps * gram.shape[0]) @ grad
  loss = jax.jit(lambda th: _pinn.loss(unravel(th), prob))
  losses = [float(loss(flat - 0.5**k * direction)) for k in range(31)]
  expected = flat - 0.5**int(np.argmin(losses)) * direction
  np.testing.assert_allclose(float(value), float(_pinn.loss(params, prob)), rtol=1e-12)
  assert np.argmin(losses) > 0  # the search shortened the step
  np.testing.assert_allclose(np.asarray(ravel_pytree(new)[0]), expected, rtol=1e-9, atol=1e-12)


def test_pinn_poisson_example_lowers_the_error():
  example = _load("examples/pinn_poisson.py")
  _, history = example.train(steps=30, verbose=False)
  start = example.relative_l2(example.init_mlp(jax.random.key(0), [2, 32, 32, 1]))
  assert history == [(30, history[0][1], history[0][2])]
  assert history[0][2] < 0.5 * start


def test_poisson5d_problem():
  """The 5-D benchmark's pieces: the Laplacian against the Hessian's trace, boundary points on the
  boundary, the residual scaling, and the network size of the follow-up paper."""
  from benchmarks import task_poisson5d as task

  params = task.init_params(0)
  assert sum(x.size for x in jax.tree.leaves(params)) == 10_065
  z = jnp.linspace(0.1, 0.9, 5)
  hessian = jax.jit(jax.hessian(lambda s: task.network(params, s)))(z)
  np.testing.assert_allclose(float(jax.jit(task.laplacian)(params, z)), float(jnp.trace(hessian)),
                             rtol=1e-12)
  # -Lap u* = pi^2 u*: the source the residuals use, checked on u* itself
  lap_exact = jnp.trace(jax.hessian(task.u_exact)(z))
  np.testing.assert_allclose(float(-lap_exact), float(jnp.pi**2 * task.u_exact(z)), rtol=1e-12)
  points, flag, weight = task.sample_batch(jax.random.key(1), 30, 20)
  bd = np.asarray(points[30:])
  assert np.all(np.sum((bd == 0) | (bd == 1), 1) >= 1) and np.all((bd >= 0) & (bd <= 1))
  assert float(flag.sum()) == 30
  r = jax.jit(task.residuals)(params, (points, flag, weight))[:, 0]
  lap = jax.vmap(lambda q: task.laplacian(params, q))(points[:30])
  u_bd = jax.vmap(lambda q: task.network(params, q))(points[30:])
  expected = 0.5 * np.mean((np.asarray(lap) + np.pi**2 * np.asarray(task.u_exact(points[:30])))**2) \
      + 0.5 * np.mean((np.asarray(u_bd) - np.asarray(task.u_exact(points[30:])))**2)
  np.testing.assert_allclose(float(task.half_mean_square(r)), expected, rtol=1e-10)

"""The grid line search: closed-form choices on quadratics, the chained natural-gradient step
against a dense solve, jit, nnx.Optimizer, and the documented no-decrease and non-finite cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import riemod
from riemod import GridLinesearchState, scale_by_grid_linesearch
from conftest import assert_close, tolerance


def _quadratic(dtype, n=5, seed=0):
  """``f(w) = 0.5 (w - w*)^T A (w - w*)``, SPD ``A`` (NumPy float64 copies for the references)."""
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  a = m @ m.T / n + np.eye(n)
  w_star = rng.normal(size=n)
  w0 = rng.normal(size=n)
  a_j, w_star_j = jnp.asarray(a, dtype), jnp.asarray(w_star, dtype)
  value_fn = lambda p: 0.5 * (p["w"] - w_star_j) @ a_j @ (p["w"] - w_star_j)
  return a, w_star, w0, value_fn


def _line_values(a, w_star, w0, u, sizes):
  """Closed form of ``f(w0 + s u)`` for every step size ``s`` (a parabola in ``s``)."""
  r = w0 - w_star
  return np.array([0.5 * r @ a @ r + s * (u @ a @ r) + 0.5 * s**2 * (u @ a @ u) for s in sizes])


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_chosen_step_is_the_grid_minimiser_of_the_closed_form_parabola(dtype, chunk_size):
  a, w_star, w0, value_fn = _quadratic(dtype)
  rng = np.random.default_rng(1)
  for trial in range(3):
    # A descent direction (the negative gradient scaled at random): minimiser along u known.
    u = -rng.uniform(0.2, 3.0) * (a @ (w0 - w_star))
    max_step, factor, num = 4.0, 0.6, 10
    sizes = max_step * factor ** np.arange(num)
    values = _line_values(a, w_star, w0, u, sizes)
    expected = sizes[np.argmin(values)]
    tx = scale_by_grid_linesearch(max_step, factor, num, chunk_size=chunk_size)
    params = {"w": jnp.asarray(w0, dtype)}
    updates, state = tx.update({"w": jnp.asarray(u, dtype)}, tx.init(params), params,
                               value_fn=value_fn)
    assert float(state.step_size) == pytest.approx(expected, rel=1e-6), trial
    assert_close(updates["w"], expected * u, dtype)
    np.testing.assert_allclose(float(state.value), values.min(), **tolerance(dtype))
    assert int(state.no_decrease_steps) == 0 and int(state.count) == 1


def test_explicit_grid_and_ties_go_to_the_larger_step(dtype):
  # f(w) = (w - 1)^2 along u = 1 from w = 0: f(s) = (s - 1)^2, equal at s = 0.5 and s = 1.5.
  value_fn = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
  params = {"w": jnp.zeros((1,), dtype)}
  tx = scale_by_grid_linesearch(step_sizes=[0.5, 1.5, 3.0])
  updates, state = tx.update({"w": jnp.ones((1,), dtype)}, tx.init(params), params,
                             value_fn=value_fn)
  assert float(state.step_size) == 1.5
  assert float(updates["w"][0]) == 1.5


def test_chain_after_natural_gradient_equals_the_dense_solve_times_the_chosen_step(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(12, 4)), dtype)
  t = jnp.asarray(rng.normal(size=(12, 2)), dtype)
  f = lambda p, v: jnp.tanh(v @ p["w1"]) @ p["w2"]
  params = {"w1": jnp.asarray(rng.normal(size=(4, 3)), dtype),
            "w2": jnp.asarray(rng.normal(size=(3, 2)), dtype)}
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
  loss_of = lambda p: loss_fn(f(p, x))
  mass, sizes = 1e-2, 2.0 * 0.5 ** np.arange(8)
  tx = optax.chain(riemod.natural_gradient(1.0, mass=mass),
                   scale_by_grid_linesearch(max_step=2.0, factor=0.5, num=8))


  @jax.jit
  def step(params):
    loss, grads, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                        params=params)
    return (loss, grads) + tx.update(grads, tx.init(params), params, curvature=curv, value=loss,
                                     value_fn=loss_of)

  loss, grads, updates, state = step(params)
  # Dense reference: G = J^T J / B + mass I over the flattened leaves, d = -G^{-1} g.
  flat_p, unravel = jax.flatten_util.ravel_pytree(params)
  jac = jax.jacrev(lambda q: f(unravel(q), x).reshape(-1))(flat_p)
  gram = np.asarray(jac, np.float64).T @ np.asarray(jac, np.float64) / x.shape[0]
  g = np.asarray(jax.flatten_util.ravel_pytree(grads)[0], np.float64)
  direction = -np.linalg.solve(gram + mass * np.eye(g.size), g)
  values = [float(loss_of(unravel(flat_p + jnp.asarray(s * direction, dtype)))) for s in sizes]
  expected = sizes[int(np.argmin(values))]
  assert sorted(values)[1] - min(values) > 1e-3 * min(values)  # the choice is not a near-tie
  ls = riemod.find_state(state, GridLinesearchState)
  assert float(ls.step_size) == pytest.approx(expected)
  assert_close(jax.flatten_util.ravel_pytree(updates)[0], expected * direction, dtype)
  assert float(ls.value) < float(loss)


def test_under_jit_matches_eager(dtype):
  a, w_star, w0, value_fn = _quadratic(dtype)
  u = {"w": jnp.asarray(-(a @ (w0 - w_star)), dtype)}
  params = {"w": jnp.asarray(w0, dtype)}
  tx = scale_by_grid_linesearch()
  state = tx.init(params)
  eager = tx.update(u, state, params, value_fn=value_fn, curvature="ignored")
  jitted = jax.jit(lambda u, s, p: tx.update(u, s, p, value_fn=value_fn))(u, state, params)
  assert float(jitted[1].step_size) == float(eager[1].step_size)
  assert_close(jitted[0]["w"], eager[0]["w"], dtype)
  assert jitted[1].value.dtype == jnp.result_type(float)


@pytest.mark.parametrize("policy", ["best", "smallest", "zero"])
def test_no_decrease_follows_the_policy(dtype, policy):
  # f(w) = w^2 (w - 1)^2 + c w from w = 0 along u = 1: every step raises f above f(0) = 0, and the
  # least bad step size is the largest one, not the smallest (so the three policies differ).
  c = 0.02
  line = lambda s: s**2 * (s - 1.0) ** 2 + c * s
  value_fn = lambda p: jnp.sum(line(p["w"]))
  sizes = np.array([1.0, 0.5, 0.25])
  values = line(sizes)
  assert values.min() > line(0.0) and np.argmin(values) != np.argmin(sizes)
  params = {"w": jnp.zeros((1,), dtype)}
  tx = scale_by_grid_linesearch(step_sizes=sizes, on_no_decrease=policy)
  updates, state = tx.update({"w": jnp.ones((1,), dtype)}, tx.init(params), params,
                             value_fn=value_fn)  # no value=: evaluated with value_fn
  expected = {"best": sizes[np.argmin(values)], "smallest": sizes.min(), "zero": 0.0}[policy]
  assert float(state.step_size) == expected
  assert float(updates["w"][0]) == expected
  assert int(state.no_decrease_steps) == 1 and int(state.nonfinite_steps) == 0
  np.testing.assert_allclose(float(state.value), line(expected), **tolerance(dtype))


def test_nonfinite_candidates_are_skipped_and_all_nonfinite_gives_a_zero_step(dtype):
  # log barrier: finite only for w < 1; from w = 0 along u = 1 the steps 4, 2, 1 are non-finite.
  value_fn = lambda p: jnp.sum(-jnp.log(1.0 - p["w"]) + 4.0 * (p["w"] - 0.3) ** 2)
  params = {"w": jnp.zeros((1,), dtype)}
  sizes = 4.0 * 0.5 ** np.arange(8)
  finite = sizes[sizes < 1]
  values = -np.log(1 - finite) + 4.0 * (finite - 0.3) ** 2
  tx = scale_by_grid_linesearch(4.0, 0.5, 8)
  updates, state = tx.update({"w": jnp.ones((1,), dtype)}, tx.init(params), params,
                             value_fn=value_fn)
  assert float(state.step_size) == pytest.approx(finite[np.argmin(values)])
  assert int(state.nonfinite_steps) == 0

  # A NaN direction: every candidate is NaN -> a zero step, counted, the loss kept.
  state0 = tx.init(params)
  updates, state = tx.update({"w": jnp.full((1,), jnp.nan, dtype)}, state0, params,
                             value=jnp.asarray(0.5, dtype), value_fn=value_fn)
  assert bool(jnp.all(updates["w"] == 0))
  assert float(state.step_size) == 0.0 and float(state.value) == 0.5
  assert int(state.nonfinite_steps) == 1 and int(state.no_decrease_steps) == 0


def test_inside_nnx_optimizer_value_fn_gets_the_pure_parameter_state():
  # nnx.Optimizer forwards keyword arguments (through nnx.as_pure) and passes the pure parameter
  # state as params: value_fn merges it back. The chained step is compared with the grid choice
  # computed from the plain loss of (kernel, bias).
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (16, 3))
  y = jax.random.normal(jax.random.key(1), (16, 2))
  plain = lambda w, b: 0.5 * jnp.mean(jnp.sum((x @ w + b - y) ** 2, -1))
  w0, b0 = model.kernel[...], model.bias[...]
  gw, gb = jax.grad(plain, (0, 1))(w0, b0)
  sizes = 2.0 * 0.5 ** np.arange(8)
  values = [float(plain(w0 - s * gw, b0 - s * gb)) for s in sizes]
  expected = sizes[int(np.argmin(values))]

  tx = optax.chain(optax.sgd(1.0), scale_by_grid_linesearch(2.0, 0.5, 8))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  @nnx.jit
  def train_step(model, opt):
    loss_of = lambda m: 0.5 * jnp.mean(jnp.sum((m(x) - y) ** 2, -1))
    value_fn = lambda p: loss_of(nnx.merge(graphdef, p, rest))
    loss, grads = nnx.value_and_grad(loss_of)(model)
    opt.update(model, grads, value=loss, value_fn=value_fn, curvature=None)  # extra: ignored

  train_step(model, opt)
  ls = riemod.find_state(nnx.as_pure(opt.opt_state), GridLinesearchState)
  assert float(ls.step_size) == expected
  np.testing.assert_allclose(model.kernel[...], w0 - expected * gw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(ls.value), min(values), rtol=1e-5)


def test_errors_are_explained():
  with pytest.raises(ValueError, match="value_fn"):
    tx = scale_by_grid_linesearch()
    tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
  for kwargs in (dict(factor=1.0), dict(max_step=0.0), dict(num=0), dict(step_sizes=[]),
                 dict(step_sizes=[1.0, -1.0]), dict(on_no_decrease="stop"), dict(chunk_size=0)):
    with pytest.raises(ValueError):
      scale_by_grid_linesearch(**kwargs)

"""The solve options PINNs use: the truncated pseudo-inverse (``Geometry(cutoff=)``) against
numpy's least squares and an explicit SVD, and the randomized Nystrom sketch
(``Geometry(space="nystrom")``) against the exact sample-space step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import riemod
from riemod.composer.spectral import NystromBlock, TruncatedBlock


def _least_squares(x, y):
  """A linear model's value, gradient and curvature at ``w = 0``: ``K = X / sqrt(B)``."""
  f = lambda p, x: x @ p["w"]
  params = {"w": jnp.zeros((x.shape[1], 1), x.dtype)}
  loss_fn = lambda out: 0.5 * jnp.mean((out - y) ** 2)
  _, g, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                               params=params)
  return params, g, curv


def _rank_deficient(rows, cols, rank, seed, tiny=1e-9):
  """``X`` with ``rank`` singular values in [1, 10] and the rest at ``tiny`` (directions the data
  do not determine: a damped solve with a tiny mass would amplify them by ``1 / tiny``)."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
  v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
  p = min(rows, cols)
  s = np.concatenate([np.linspace(10.0, 1.0, rank), np.full(p - rank, tiny)])
  x = (u[:, :p] * s) @ v[:, :p].T
  return x, rng.standard_normal((rows, 1))


@pytest.mark.parametrize("space,shape", [("parameter", (40, 12)), ("sample", (10, 30)),
                                         ("auto", (40, 12)), ("auto", (10, 30))])
def test_cutoff_step_is_numpy_lstsq(space, shape):
  """float64, mass 1e-30, cut-off 1e-12 on eigenvalues of K^T K: one Gauss-Newton step from
  w = 0 lands on numpy.linalg.lstsq's minimum-norm solution (rcond = sqrt(cutoff) on X) to 1e-12,
  in both solve spaces. Without the cut-off the 1e-9 singular values wreck the step."""
  with jax.enable_x64(True):
    x, y = _rank_deficient(*shape, rank=min(shape) - 4, seed=0)
    expected = np.linalg.lstsq(x, y, rcond=1e-6)[0]
    params, g, curv = _least_squares(jnp.asarray(x), jnp.asarray(y))
    for cutoff in (1e-12, None):
      geometry = riemod.Geometry(mass=1e-30, structure="full", space=space, cutoff=cutoff)
      metric = geometry.compose(curv, geometry.init(params))
      direction, report = metric.step(g)
      w = -np.asarray(direction["w"])
      error = np.linalg.norm(w - expected) / np.linalg.norm(expected)
      if cutoff is None:
        assert not error < 1e-3  # the damped solve (or NaN) is nowhere near
      else:
        assert isinstance(metric.blocks[0], TruncatedBlock)
        assert error < 1e-12, error
        assert float(report.residual[0]) < 1e-10
        np.testing.assert_allclose(-np.asarray(metric.solve(g)["w"]), expected, rtol=1e-11,
                                   atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("space", ["parameter", "sample"])
def test_cutoff_with_mass_and_momentum_matches_dense_pseudo_inverse(space):
  """With a real mass (0.3) and SPRING momentum: the direction is
  ``G^+ (g + mu D phi)`` with ``G^+ = sum_kept v v^T / (s^2 + m)`` from numpy's SVD of K,
  cut-off 1e-6 (it drops the 1e-4 singular values, keeps the rest) - to 1e-12 relative."""
  with jax.enable_x64(True):
    shape = (24, 9) if space == "parameter" else (9, 24)
    x, y = _rank_deficient(*shape, rank=6, seed=1, tiny=1e-4)
    params, g, curv = _least_squares(jnp.asarray(x), jnp.asarray(y))
    mass, mu, cutoff = 0.3, 0.7, 1e-6
    k = x / np.sqrt(x.shape[0])
    _, s, vt = np.linalg.svd(k, full_matrices=False)
    kept = s**2 >= cutoff * s[0] ** 2
    assert 0 < kept.sum() < len(s)
    v = vt[kept].T
    pinv = v @ np.diag(1 / (s[kept] ** 2 + mass)) @ v.T
    phi = np.random.default_rng(2).standard_normal((x.shape[1], 1))
    expected = pinv @ (np.asarray(g["w"]) + mu * mass * phi)
    geometry = riemod.Geometry(mass=mass, structure="full", space=space, cutoff=cutoff)
    metric = geometry.compose(curv, geometry.init(params))
    direction, _ = metric.step(g, previous={"w": jnp.asarray(phi)}, momentum=mu)
    got = np.asarray(direction["w"])
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-12
    # G^+ is a pseudo-inverse of G on the kept subspace: G G^+ b = P b there.
    b = {"w": jnp.asarray(phi)}
    projected = v @ (v.T @ phi)
    np.testing.assert_allclose(np.asarray(metric.matvec(metric.solve(b))["w"]), projected,
                               atol=1e-11 * np.abs(projected).max())


def test_cutoff_is_refused_when_out_of_range():
  for bad in (0.0, 1.0, -1e-3, "1e-9"):
    with pytest.raises(ValueError, match="cutoff"):
      riemod.Geometry(cutoff=bad)
  with pytest.raises(ValueError, match="nystrom"):
    riemod.Geometry(space="nystrom", rank=4, cutoff=1e-10)
  with pytest.raises(ValueError, match="rank"):
    riemod.Geometry(space="nystrom")
  with pytest.raises(ValueError, match="nystrom"):
    riemod.Geometry(rank=4)


def _low_rank_plus_noise(d=60, n=200, rank=6, noise=1e-2, seed=3):
  """Rows ``X = A B + noise``: a kernel ``X X^T`` with ``rank`` large eigenvalues and a tail."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((d, rank)) @ rng.standard_normal((rank, n)) * 3.0
  return x + noise * rng.standard_normal((d, n)), rng.standard_normal((d, 1))


@pytest.mark.parametrize("momentum", [None, 0.6])
def test_nystrom_is_exact_when_its_rank_covers_the_rows(momentum):
  """rank + oversampling >= d: the sketch is the kernel itself, so the step (SPRING included)
  equals the exact sample-space step to 1e-9 relative."""
  with jax.enable_x64(True):
    x, y = _low_rank_plus_noise(d=30, n=80)
    params, g, curv = _least_squares(jnp.asarray(x), jnp.asarray(y))
    phi = {"w": jnp.asarray(np.random.default_rng(4).standard_normal((80, 1)))}
    steps = []
    for space, rank in (("sample", None), ("nystrom", 30)):
      geometry = riemod.Geometry(mass=1e-2, structure="full", space=space, rank=rank,
                                 oversampling=0)
      metric = geometry.compose(curv, geometry.advance(geometry.init(params), g))
      kwargs = {} if momentum is None else dict(previous=phi, momentum=momentum)
      steps.append(np.asarray(metric.step(g, **kwargs)[0]["w"]))
    assert isinstance(metric.blocks[0], NystromBlock)
    assert np.linalg.norm(steps[1] - steps[0]) / np.linalg.norm(steps[0]) < 1e-9


def test_nystrom_error_is_bounded_by_the_sketch_error():
  """Low-rank-plus-noise kernel, rank 10 + oversampling 10: (a) the sketch's trace-norm error is
  within Tropp et al.'s bound (1 + r / (p - 1)) times the best rank-r error (an expectation;
  a fixed key), (b) the step's error against the exact solve is below the deterministic bound
  ``|D^{-1/2}| |K~| (|Q - Q^| + lam_r) |e|`` (the tail takes the sketch's smallest eigenvalue),
  (c) the reported residual is the capacitance solve's error against the exact kernel, and
  (d) rank 2 (below the kernel's 6 large eigenvalues) is far off."""
  with jax.enable_x64(True):
    x, y = _low_rank_plus_noise(noise=1e-3)
    mass, rank, over = 1e-2, 10, 10
    params, g, curv = _least_squares(jnp.asarray(x), jnp.asarray(y))
    exact_geometry = riemod.Geometry(mass=mass, structure="full", space="sample")
    state = exact_geometry.init(params)
    exact = np.asarray(exact_geometry.compose(curv, state).step(g)[0]["w"])
    kernel = (x @ x.T) / x.shape[0] / mass
    lam = np.linalg.eigvalsh(kernel)[::-1]
    e = np.asarray(curv.coordinates)
    errors = {}
    for r in (rank, 2):
      geometry = riemod.Geometry(mass=mass, structure="full", space="nystrom", rank=r,
                                 oversampling=over)
      metric = geometry.compose(curv, state)
      block = metric.blocks[0]
      sketch = np.asarray(block.basis) @ np.diag(np.asarray(block.eigenvalues)) @ np.asarray(
          block.basis).T
      gap = np.linalg.eigvalsh(kernel - sketch)
      assert gap.min() > -1e-9 * lam[0]  # the sketch never exceeds the kernel
      direction, report = metric.step(g)
      got = np.asarray(direction["w"])
      errors[r] = np.linalg.norm(got - exact) / np.linalg.norm(exact)
      if r == rank:
        assert np.abs(gap).sum() <= (1 + r / (over - 1)) * lam[r:].sum()
        basis, tail = np.asarray(block.basis), float(block.eigenvalues[-1])
        bound = mass**-0.5 * np.sqrt(lam[0]) * (np.abs(gap).max() + tail) * np.linalg.norm(e)
        assert np.linalg.norm(got - exact) <= bound
        # The residual against the exact capacitance is what the sketch leaves, and small here.
        cap = np.eye(len(e)) + kernel
        completed = sketch + tail * (np.eye(len(e)) - basis @ basis.T)
        t = np.linalg.solve(np.eye(len(e)) + completed, e)
        measured = np.linalg.norm(cap @ t - e) / np.linalg.norm(e)
        assert float(report.residual[0]) == pytest.approx(measured, rel=1e-6)
    assert errors[rank] < 1e-3 and errors[2] > 0.5, errors


def test_nystrom_changes_its_sketch_every_step_reproducibly():
  """The sketch's test vectors come from (seed, step count): two compositions of the same state
  agree exactly, the next step's state draws another sketch."""
  with jax.enable_x64(True):
    x, y = _low_rank_plus_noise(d=40)
    params, g, curv = _least_squares(jnp.asarray(x), jnp.asarray(y))
    geometry = riemod.Geometry(mass=1e-2, structure="full", space="nystrom", rank=3,
                               oversampling=2)
    s1 = geometry.advance(geometry.init(params), g)
    s2 = geometry.advance(s1, g)
    basis = lambda s: np.asarray(geometry.compose(curv, s).blocks[0].basis)
    np.testing.assert_array_equal(basis(s1), basis(s1))
    assert not np.allclose(np.abs(basis(s1)), np.abs(basis(s2)))



# --------------------------------------------------------------------------- Levenberg-Marquardt
class _TanhRegression:
  """Nonlinear least squares ``0.5 mean (tanh(X w) - y)^2`` (float64) with the dense Gauss-Newton
  matrix ``J^T J / B`` from jax.jacrev as the reference."""

  def __init__(self, seed=5, rows=12, cols=4):
    rng = np.random.default_rng(seed)
    self.x = jnp.asarray(rng.standard_normal((rows, cols)))
    self.y = jnp.asarray(rng.uniform(-0.9, 0.9, (rows, 1)))
    self.params = {"w": jnp.asarray(rng.standard_normal((cols, 1)))}

  def f(self, p, x):
    return jnp.tanh(x @ p["w"])

  def loss_fn(self, out):
    return 0.5 * jnp.mean((out - self.y) ** 2)

  def loss_of(self, p):
    return self.loss_fn(self.f(p, self.x))

  def at(self, p):
    """Value, gradient, curvature and the dense Gauss-Newton matrix at ``p``."""
    value, g, curv = riemod.value_grad_and_curvature(self.f, self.x, self.loss_fn,
                                                     riemod.metrics.identity(), params=p)
    rows, cols = self.x.shape
    jac = jax.jacrev(lambda w: self.f({"w": w}, self.x).ravel())(p["w"]).reshape(rows, cols)
    return value, g, curv, np.asarray(jac.T @ jac / rows)


def _lm(mass, search, **rule):
  geometry = riemod.Geometry(mass=mass, structure="full")
  inner = riemod.natural_gradient(1.0, geometry=geometry)
  if search:
    inner = optax.chain(inner, riemod.scale_by_grid_linesearch(max_step=2.0, factor=0.5, num=6))
  return riemod.levenberg_marquardt(inner, geometry, **rule)


def _mass_scale(state):
  return float(riemod.find_state(state, riemod.MetricState).geometry.mass_scale)


@pytest.mark.parametrize("search", [False, True])
def test_levenberg_marquardt_ratio_and_rule_match_dense_model(search):
  """Nonlinear least squares, mass 0.05: the ratio is ``(l(w) - l(w + s)) / best`` with
  ``best = (g^T s)^2 / (2 s^T G s)`` and the dense ``G = J^T J / B + mass`` (jax.jacrev), to
  1e-10, whether the new loss comes from the line search's state or from value_fn; thresholds just
  above / below / around it move the mass scale up / down / not at all; and the next step is
  solved with the adapted mass: ``(J^T J / B + 4 mass)^{-1} g`` at the new point."""
  with jax.enable_x64(True):
    prob, mass = _TanhRegression(), 0.05
    params = prob.params
    value, g, curv, gn = prob.at(params)
    update = lambda tx, state, p, g, curv, value: tx.update(g, state, p, curvature=curv,
                                                            value=value, value_fn=prob.loss_of)
    tx = _lm(mass, search)
    s, state = update(tx, tx.init(params), params, g, curv, value)
    gv, sv = np.asarray(g["w"]).ravel(), np.asarray(s["w"]).ravel()
    best = (gv @ sv) ** 2 / (2 * sv @ (gn + mass * np.eye(len(gv))) @ sv)
    rho = float(value - prob.loss_of(optax.apply_updates(params, s))) / best
    assert rho > 0.05 and abs(rho - 1) > 0.05, rho  # a nonlinear step, not the exact model
    assert float(state.ratio) == pytest.approx(rho, rel=1e-10)
    for rule, factor in ((dict(lower=rho * 1.01, upper=rho * 1.02), 4.0),
                         (dict(lower=rho * 0.98, upper=rho * 0.99), 0.25),
                         (dict(lower=rho * 0.99, upper=rho * 1.01), 1.0)):
      tx = _lm(mass, search, increase=4.0, decrease=0.25, min_scale=1e-3, max_scale=1e3, **rule)
      s, state = update(tx, tx.init(params), params, g, curv, value)
      assert _mass_scale(state) == pytest.approx(factor, rel=1e-12), rule
      assert int(state.increased_steps) == (factor > 1)
      assert int(state.decreased_steps) == (factor < 1)
    # The next step is solved with the adapted mass (the "up" rule: scale 4).
    tx = _lm(mass, search, increase=4.0, decrease=0.25, lower=rho * 1.01, upper=rho * 1.02)
    s, state = update(tx, tx.init(params), params, g, curv, value)
    new = optax.apply_updates(params, s)
    value2, g2, curv2, gn2 = prob.at(new)
    s2, _ = update(tx, state, new, g2, curv2, value2)
    direction = np.linalg.solve(gn2 + 4.0 * mass * np.eye(4), np.asarray(g2["w"]).ravel())
    step2 = -np.asarray(s2["w"]).ravel()
    a = step2 @ direction / (direction @ direction)  # 1, or the grid's chosen step size
    assert a == pytest.approx(1.0 if not search else a, rel=1e-9)
    if search:
      assert min(abs(a - 2.0 * 0.5**k) for k in range(6)) < 1e-9 * a
    np.testing.assert_allclose(step2, a * direction, rtol=1e-9)


@pytest.mark.parametrize("t", [0.5, 1.0])
def test_levenberg_marquardt_ratio_closed_form_on_a_quadratic(t):
  """Linear least squares with mass 1e-12 (G is the loss's Hessian to 1e-12): a step ``t`` times
  the model's minimiser has ``rho = 2t - t^2`` (0.75 for t = 0.5, 1 for t = 1)."""
  with jax.enable_x64(True):
    x, y = _rank_deficient(20, 5, rank=5, seed=7)
    params, g, curv = _least_squares(jnp.asarray(x), jnp.asarray(y))
    loss_of = lambda p: 0.5 * jnp.mean((jnp.asarray(x) @ p["w"] - jnp.asarray(y)) ** 2)
    geometry = riemod.Geometry(mass=1e-12, structure="full")
    tx = riemod.levenberg_marquardt(
        optax.chain(riemod.natural_gradient(1.0, geometry=geometry),
                    riemod.scale_by_grid_linesearch(step_sizes=(t,))), geometry)
    _, state = tx.update(g, tx.init(params), params, curvature=curv, value=loss_of(params),
                         value_fn=loss_of)
    assert float(state.ratio) == pytest.approx(2 * t - t * t, rel=1e-9)


def test_levenberg_marquardt_zero_step_raises_the_mass_up_to_max_scale():
  """A loss that is NaN at every trial point: the line search returns a zero step, which counts as
  ``rho = -inf``: the mass scale grows by ``increase`` per step and stops at ``max_scale``."""
  with jax.enable_x64(True):
    prob = _TanhRegression()
    params = prob.params
    value, g, curv, _ = prob.at(params)
    geometry = riemod.Geometry(mass=0.05, structure="full")
    tx = riemod.levenberg_marquardt(
        optax.chain(riemod.natural_gradient(1.0, geometry=geometry),
                    riemod.scale_by_grid_linesearch(num=3)),
        geometry, increase=10.0, max_scale=300.0)
    state = tx.init(params)
    for expected in (10.0, 100.0, 300.0, 300.0):
      s, state = tx.update(g, state, params, curvature=curv, value=value,
                           value_fn=lambda p: jnp.nan * prob.loss_of(p))
      assert float(jnp.abs(s["w"]).max()) == 0.0
      assert float(state.ratio) == -np.inf
      assert _mass_scale(state) == pytest.approx(expected)
    assert int(state.increased_steps) == 3


def test_levenberg_marquardt_refuses_bad_arguments():
  geometry = riemod.Geometry(mass=1e-3, structure="full")
  inner = riemod.natural_gradient(1.0, geometry=geometry)
  for bad, match in ((dict(lower=0.5, upper=0.5), "lower"), (dict(increase=1.0), "increase"),
                     (dict(decrease=1.5), "decrease"), (dict(min_scale=2.0), "min_scale"),
                     (dict(max_scale=0.5), "max_scale")):
    with pytest.raises(ValueError, match=match):
      riemod.levenberg_marquardt(inner, geometry, **bad)
  with pytest.raises(TypeError, match="geometry"):
    riemod.levenberg_marquardt(inner, None)
  with pytest.raises(ValueError, match="scale_by_metric"):
    riemod.levenberg_marquardt(optax.sgd(0.1), geometry).init({"w": jnp.zeros(2)})
  prob = _TanhRegression()
  value, g, curv, _ = prob.at(prob.params)
  tx = riemod.levenberg_marquardt(inner, geometry)
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(g, tx.init(prob.params), prob.params, curvature=curv, value=value)
  with pytest.raises(ValueError, match="curvature"):
    tx.update(g, tx.init(prob.params), prob.params, value=value, value_fn=prob.loss_of)

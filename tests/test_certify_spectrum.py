"""Lanczos on ``G^{-1} H`` against ``scipy.linalg.eigh(H, G)``; stable learning rates that hold.

Eigenvalue checks to 1e-4 relative run in float64 (``jax.enable_x64``); the quadratic problem is a
linear model with a weighted squared loss, so ``H = J^T A J / B`` and ``G = J^T J / B + mu`` are
known in closed form and differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import riemod
from riemod.certify import certify, contraction_factor, generalized_lanczos


def _random_pencil(n, seed, shift):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, n))
  b = rng.normal(size=(n, n))
  return a @ a.T - shift * np.eye(n), b @ b.T + 0.3 * np.eye(n), rng.normal(size=n)


@pytest.mark.parametrize("shift", [0.0, 4.0])
def test_lanczos_matches_eigh_full_krylov(shift):
  with jax.enable_x64(True):
    h, g, start = _random_pencil(9, 0, shift)
    r = generalized_lanczos(lambda v: h @ v, lambda v: jnp.linalg.solve(g, v), lambda v: g @ v,
                            jnp.asarray(start), 9)
    expected = scipy.linalg.eigh(h, g, eigvals_only=True)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(np.asarray(r.eigenvalues) / scale, expected / scale, atol=1e-4,
                               rtol=0)
    assert float(r.orthogonality) < 1e-10


def test_lanczos_extremes_converge_and_stay_inside():
  with jax.enable_x64(True):
    h, g, start = _random_pencil(60, 1, 30.0)
    expected = scipy.linalg.eigh(h, g, eigvals_only=True)
    r = generalized_lanczos(lambda v: h @ v, lambda v: jnp.linalg.solve(g, v), lambda v: g @ v,
                            jnp.asarray(start), 30)
    # Ritz values are Rayleigh quotients: inside the spectrum.
    assert expected[0] - 1e-9 <= float(r.lam_min) and float(r.lam_max) <= expected[-1] + 1e-9
    np.testing.assert_allclose(float(r.lam_max), expected[-1], rtol=1e-4)
    np.testing.assert_allclose(float(r.lam_min), expected[0], rtol=1e-4)


def test_lanczos_restarts_after_breakdown():
  # The start vector is an eigenvector: Krylov space of dimension one, then a restart.
  with jax.enable_x64(True):
    h = np.diag(np.arange(1.0, 7.0))
    r = generalized_lanczos(lambda v: h @ v, lambda v: v, lambda v: v, jnp.eye(6)[2], 6)
    np.testing.assert_allclose(np.asarray(r.eigenvalues), np.arange(1.0, 7.0), atol=1e-10)


@pytest.mark.parametrize("start", ["random", "eigenvector"])
def test_top_ritz_pair_from_the_solves_alone(start):
  # metric_products=False takes G w = H q - (G Q) c from the solve: one metric product (of the
  # start) per call, and the same top Ritz pair as with a product per step (to round-off), also
  # through a restart (the eigenvector start breaks down at once).
  from riemod.certify.lanczos import top_ritz_pair
  with jax.enable_x64(True):
    h, g, v0 = _random_pencil(12, 4, 2.0)
    if start == "eigenvector":
      v0 = scipy.linalg.eigh(h, g)[1][:, 3]
    calls = []
    matvec = lambda v: calls.append(1) or g @ v
    solve = lambda v: jnp.linalg.solve(g, v)
    for m in (5, 12):
      calls.clear()
      with jax.disable_jit():  # counts the products run, not traced (a cond traces both branches)
        lam, vec = top_ritz_pair(lambda v: h @ v, solve, matvec, jnp.asarray(v0), m,
                                 metric_products=False)
      if m == 5:  # the start (and the restart); the full space (m = n) may need a few more
        assert len(calls) == (1 if start == "random" else 2)
      calls.clear()
      with jax.disable_jit():
        lam_ref, vec_ref = top_ritz_pair(lambda v: h @ v, solve, matvec, jnp.asarray(v0), m)
      assert len(calls) == m
      np.testing.assert_allclose(float(lam), float(lam_ref), rtol=1e-10)
      np.testing.assert_allclose(abs(float(vec @ g @ vec_ref)), 1.0, rtol=1e-8)
    # The full Krylov space: the top generalised eigenvalue, its eigenvector G-normalised.
    expected = scipy.linalg.eigh(h, g)
    np.testing.assert_allclose(float(lam), expected[0][-1], rtol=1e-10)
    np.testing.assert_allclose(abs(float(vec @ g @ expected[1][:, -1])), 1.0, rtol=1e-8)


def test_top_ritz_pair_from_the_solves_near_an_invariant_space():
  # A clustered top of the spectrum: the Krylov space nearly captures an invariant subspace, the
  # orthogonalisation cancels most of G^{-1} H q, and G w from the solve alone loses the digits
  # the cancellation took (Ritz values left the spectrum): there the product is taken (with
  # lanczos.CANCELLATION = 0, never: this test fails, checked).
  from riemod.certify.lanczos import top_ritz_pair
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    n = 40
    basis = np.linalg.qr(rng.normal(size=(n, n)))[0]
    lam = np.concatenate([1.0 - 1e-4 * np.arange(20), rng.uniform(0.0, 0.5, 20)])
    root = scipy.linalg.sqrtm(_random_pencil(n, 6, 0.0)[1]).real   # G = R R, H = R B L B^T R
    h, g = root @ basis @ np.diag(lam) @ basis.T @ root, root @ root
    start = jnp.asarray(rng.normal(size=n))
    ops = (lambda v: h @ v, lambda v: jnp.linalg.solve(g, v), lambda v: g @ v, start, 30)
    lam_top = float(top_ritz_pair(*ops, metric_products=False)[0])
    assert lam_top <= 1.0 + 1e-12                       # a Rayleigh quotient: inside
    # Equal to the solve's error (cond(G) ~ 440 times eps) over the cancellation allowed (0.1),
    # compounded over 30 steps: 4.5e-11 measured.
    np.testing.assert_allclose(lam_top, float(top_ritz_pair(*ops)[0]), rtol=1e-9)


def _quadratic_problem():
  rng = np.random.default_rng(3)
  batch, d_in, d_out = 12, 3, 2
  x = jnp.asarray(rng.normal(size=(batch, d_in)))
  t = jnp.asarray(rng.normal(size=(batch, d_out)))
  weight = jnp.asarray([[3.0, 1.0], [1.0, 2.0]])  # loss metric A != identity: H != G
  f = lambda p, v: v @ p["w"]
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.einsum("bi,ij,bj->b", y - t, weight, y - t))
  params = {"w": jnp.asarray(rng.normal(size=(d_in, d_out)))}
  mass = 0.05
  # Dense H and G from jax.hessian / the Jacobian (w is flattened row-major).
  flat_loss = lambda w: loss_fn(f({"w": w.reshape(d_in, d_out)}, x))
  h = np.asarray(jax.hessian(flat_loss)(params["w"].ravel()))
  jac = np.asarray(jax.jacrev(lambda w: f({"w": w.reshape(d_in, d_out)}, x).ravel())(
      params["w"].ravel()))
  g = jac.T @ jac / batch + mass * np.eye(d_in * d_out)
  return f, x, loss_fn, params, mass, h, g


def test_certify_quadratic_spectrum_contraction_and_stable_rate():
  with jax.enable_x64(True):
    f, x, loss_fn, params, mass, h, g = _quadratic_problem()
    expected = scipy.linalg.eigh(h, g, eigvals_only=True)
    lr = 0.7
    report = certify(f, x, loss_fn, riemod.metrics.identity(), learning_rate=lr, params=params,
                     geometry=riemod.Geometry(mass=mass), num_lanczos=6,
                     num_power_iterations=50)
    net = report.network
    np.testing.assert_allclose(net["lam_min"], expected[0], rtol=1e-4)
    np.testing.assert_allclose(net["lam_max"], expected[-1], rtol=1e-4)
    exact_factor = np.max(np.abs(1 - lr * expected))
    np.testing.assert_allclose(report.contraction_factor, exact_factor, rtol=1e-4)
    np.testing.assert_allclose(report.max_stable_learning_rate, 2.0 / expected[-1], rtol=1e-4)
    # One module: the block spectrum is the whole spectrum.
    (module,) = [m for m in report.modules if "lam_max" in m]
    np.testing.assert_allclose(module["lam_max"], expected[-1], rtol=1e-4)

    # The reported stable rate holds: 0.9x converges, 1.1x diverges.
    stable = report.max_stable_learning_rate
    w_star = np.linalg.lstsq(h, h @ np.asarray(params["w"]).ravel()
                             - np.asarray(jax.grad(lambda w: loss_fn(f({"w": w}, x)))(
                                 params["w"])).ravel(), rcond=None)[0]
    best = float(loss_fn(f({"w": jnp.asarray(w_star.reshape(3, 2))}, x)))

    def run(rate, steps=150):
      # The 1.1x run must be seen to diverge: the divergence check, which would refuse it, is off.
      tx = riemod.layerwise_natural_gradient(rate, mass=mass, max_loss_growth=None)

      def step(carry, _):
        p, state = carry
        _, grads, curv = riemod.value_grad_and_curvature(f, x, loss_fn, riemod.metrics.identity(),
                                                         params=p)
        u, state = tx.update(grads, state, p, curvature=curv)
        return (optax.apply_updates(p, u), state), None

      (p, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
          (params, tx.init(params)))
      return float(loss_fn(f(p, x)))

    start = float(loss_fn(f(params, x)))
    assert run(0.9 * stable) - best < 1e-8 * max(1.0, start)
    assert run(1.1 * stable) > 1e3 * start


def test_contraction_factor_closed_form():
  assert float(contraction_factor(-1.0, 3.0, 0.5)) == pytest.approx(1.5)
  assert float(contraction_factor(1.0, 3.0, 0.5)) == pytest.approx(0.5)

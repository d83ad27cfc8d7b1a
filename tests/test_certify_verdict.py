"""Verdicts that mean what they say, against dense ``scipy.linalg.eigh(H, G)`` on a small network.

The problem: a tanh network ``R^3 -> R^2`` (20 parameters, one module) with a squared loss and the
identity output metric, so ``G = J^T J / B + mass I`` and the Gauss-Newton part of the Hessian is
``H_GN = J^T J / B``: both dense from ``jax.jacrev``, ``H`` from ``jax.hessian``. Far from its
targets the residual term makes ``H`` indefinite, with ``G^{-1} H`` in about ``[-22, 21]`` while
``G^{-1} H_GN`` stays below 1. The runs are the exact natural-gradient step
``w <- w - lr G(w)^{-1} grad l(w)`` with the dense ``G``, in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import riemod
from riemod.certify import certify
from riemod.certify.bound import measured_stability
from riemod.certify.contraction import classify, gauss_newton_spectrum

MASS = 1e-2  # certify()'s default mass
B, D_IN, HIDDEN, D_OUT = 8, 3, 4, 2
K = D_IN * HIDDEN


def _net(p, v):
  w = p["w"]
  return jnp.tanh(v @ w[:K].reshape(D_IN, HIDDEN)) @ w[K:].reshape(HIDDEN, D_OUT)


def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, D_IN)))
  t = jnp.asarray(rng.normal(size=(B, D_OUT)))
  loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
  w0 = jnp.asarray(rng.normal(size=(K + HIDDEN * D_OUT,)))
  return x, loss_fn, w0


def _dense(x, loss_fn, w):
  flat_loss = lambda v: loss_fn(_net({"w": v}, x))
  h = np.asarray(jax.hessian(flat_loss)(w))
  jac = np.asarray(jax.jacrev(lambda v: _net({"w": v}, x).ravel())(w))
  h_gn = jac.T @ jac / B
  return h, h_gn, h_gn + MASS * np.eye(w.shape[0])


def _run(x, loss_fn, w, lr, steps):
  """The exact natural-gradient step with the dense metric; losses along the run."""
  losses = []
  for _ in range(steps):
    losses.append(float(loss_fn(_net({"w": w}, x))))
    if not np.isfinite(losses[-1]) or losses[-1] > 1e6:
      break
    _, _, g = _dense(x, loss_fn, w)
    grad = np.asarray(jax.grad(lambda v: loss_fn(_net({"w": v}, x)))(w))
    w = w - lr * np.linalg.solve(g, grad)
  return losses


def _certified(x, loss_fn, w, lr, with_gauss_newton=True):
  report = certify(_net, x, loss_fn, riemod.metrics.identity(), learning_rate=lr,
                   params={"w": w}, num_lanczos=w.shape[0], num_power_iterations=30)
  if with_gauss_newton:
    _, _, g = _dense(x, loss_fn, w)
    gn = gauss_newton_spectrum(lambda v: _net({"w": v}, x), w, loss_fn,
                               lambda v: jnp.linalg.solve(g, v), lambda v: g @ v,
                               jnp.ones_like(w), w.shape[0])
    report = report.with_gauss_newton(gn)
  return report


def test_gauss_newton_spectrum_matches_dense_eigh():
  with jax.enable_x64(True):
    x, loss_fn, w = _problem()
    h, h_gn, g = _dense(x, loss_fn, w)
    expected = scipy.linalg.eigh(h_gn, g, eigvals_only=True)
    r = gauss_newton_spectrum(lambda v: _net({"w": v}, x), w, loss_fn,
                              lambda v: jnp.linalg.solve(g, v), lambda v: g @ v,
                              jnp.asarray(np.random.default_rng(1).normal(size=w.shape)),
                              w.shape[0])
    np.testing.assert_allclose(np.asarray(r.eigenvalues), expected, atol=1e-8)
    # G = H_GN + mass I: the Gauss-Newton spectrum lies in [0, 1), the full one does not.
    assert -1e-10 < expected[0] and expected[-1] < 1.0
    full = scipy.linalg.eigh(h, g, eigvals_only=True)
    assert full[0] < -1.0 and full[-1] > 10.0


def test_converging_run_past_the_full_hessian_edge_is_not_unstable():
  with jax.enable_x64(True):
    x, loss_fn, w = _problem()
    h, h_gn, g = _dense(x, loss_fn, w)
    full = scipy.linalg.eigh(h, g, eigvals_only=True)
    gn = scipy.linalg.eigh(h_gn, g, eigvals_only=True)
    lr = 1.0  # 2/lam_max(full) ~ 0.1 < lr < 2/lam_max(GN) ~ 2
    assert 2 / full[-1] < lr < 2 / gn[-1]
    losses = _run(x, loss_fn, w, lr, 40)
    assert losses[-1] < 0.01 * losses[0] and np.all(np.isfinite(losses))   # it converges
    report = _certified(x, loss_fn, w, lr)
    detail = report.verdict_detail
    assert not report.verdict.startswith("unstable") and detail.status == "edge"
    np.testing.assert_allclose(detail.edge_ratio, lr * full[-1] / 2, rtol=1e-6)
    np.testing.assert_allclose(detail.gauss_newton_edge_ratio, lr * gn[-1] / 2, rtol=1e-6)
    # Without the Gauss-Newton model certify() alone cannot call it a divergence either.
    alone = _certified(x, loss_fn, w, lr, with_gauss_newton=False)
    assert alone.verdict.startswith("edge")


def test_diverging_run_ten_times_the_step_is_unstable():
  with jax.enable_x64(True):
    x, loss_fn, w = _problem()
    _, h_gn, g = _dense(x, loss_fn, w)
    gn = scipy.linalg.eigh(h_gn, g, eigvals_only=True)
    lr = 10.0
    assert lr * gn[-1] / 2 > 1
    losses = _run(x, loss_fn, w, lr, 15)
    assert max(losses[1:]) > 10 * losses[0]                                  # it diverges
    report = _certified(x, loss_fn, w, lr)
    assert report.verdict.startswith("unstable")
    assert report.verdict_detail.status == "unstable"
    # The loss history alone says so too, once the run has risen above its start.
    verdict = classify(-20.0, 20.0, lr, history=(losses[0], max(losses), len(losses) - 1))
    assert verdict.status == "unstable" and "rose" in verdict.text


def test_negative_curvature_is_descent_not_instability():
  with jax.enable_x64(True):
    x, loss_fn, w = _problem()
    h, _, g = _dense(x, loss_fn, w)
    full = scipy.linalg.eigh(h, g, eigvals_only=True)
    lr = 1.0 / full[-1]  # inside the edge (ratio 1/2); lam_min < 0
    report = _certified(x, loss_fn, w, lr, with_gauss_newton=False)
    detail = report.verdict_detail
    np.testing.assert_allclose(report.network["lam_min"], full[0], rtol=1e-6)
    assert detail.status == "stable" and report.verdict.startswith("stable")
    assert "descent" in report.verdict and "descent" in detail.curvature
    assert "not instability" in detail.curvature
    # Contraction is claimed on the positive part only, and says so.
    assert "positive part" in detail.contraction
    np.testing.assert_allclose(detail.edge_ratio, 0.5, rtol=1e-6)


def test_classify_contracting_only_with_positive_spectrum():
  assert classify(0.5, 4.0, 0.2).status == "contracting"
  assert "whole spectrum" in classify(0.5, 4.0, 0.2).contraction
  assert classify(-0.5, 4.0, 0.2).status == "stable"
  assert classify(float("nan"), 4.0, 0.2).status == "failed"


@pytest.mark.parametrize("batch_size", [None, 3])
def test_measured_stability_matches_least_squares_closed_form(batch_size):
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    n, d, lr, steps, index = 7, 3, 0.3, 25, 4
    x, y = rng.normal(size=(n, d)), rng.normal(size=n)
    new = (rng.normal(size=d), rng.normal())

    def loss(w, batch):
      return 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)

    tx = optax.sgd(lr)

    @jax.jit
    def step(w, state, batch):
      value, grad = jax.value_and_grad(loss)(w, batch)
      updates, state = tx.update(grad, state)
      return optax.apply_updates(w, updates), state, value

    w0 = jnp.asarray(rng.normal(size=d))
    key = jax.random.key(5)
    m = measured_stability(step, w0, tx.init(w0), (jnp.asarray(x), jnp.asarray(y)), index,
                           num_steps=steps, replacement=(jnp.asarray(new[0]),
                                                         jnp.asarray(new[1])),
                           batch_size=batch_size, key=key,
                           sample_loss=lambda w, b: 0.5 * (b[0] @ w - b[1]) ** 2)
    # Closed form: each step is affine, w <- (I - lr A_k) w + lr b_k, on the k-th batch.
    x2, y2 = x.copy(), y.copy()
    x2[index], y2[index] = new
    if batch_size is None:
      batches = [np.arange(n)] * steps
    else:
      batches = [np.asarray(jax.random.choice(jax.random.fold_in(key, k), n, (batch_size,),
                                              replace=False)) for k in range(steps)]
    w, w2 = np.asarray(w0), np.asarray(w0)
    for idx in batches:
      for xs, ys, which in ((x, y, 0), (x2, y2, 1)):
        a, b = xs[idx].T @ xs[idx] / len(idx), xs[idx].T @ ys[idx] / len(idx)
        if which == 0:
          w = w - lr * (a @ w - b)
        else:
          w2 = w2 - lr * (a @ w2 - b)
    np.testing.assert_allclose(m.parameter_distance, np.linalg.norm(w - w2), rtol=1e-10)
    per_sample = lambda v: 0.5 * (x @ v - y) ** 2
    np.testing.assert_allclose(m.loss_difference, np.max(np.abs(per_sample(w) - per_sample(w2))),
                               rtol=1e-10)
    assert m.parameter_distance > 0 and len(m.distances) == steps
    if batch_size is None:
      # Full batch, many steps: the distance tends to that of the two least-squares solutions.
      far = measured_stability(step, w0, tx.init(w0), (jnp.asarray(x), jnp.asarray(y)), index,
                               num_steps=2000, replacement=(jnp.asarray(new[0]),
                                                            jnp.asarray(new[1])))
      exact = np.linalg.lstsq(x, y, rcond=None)[0] - np.linalg.lstsq(x2, y2, rcond=None)[0]
      np.testing.assert_allclose(far.parameter_distance, np.linalg.norm(exact), rtol=1e-8)


def test_measured_stability_clear_errors():
  data = (jnp.zeros((4, 2)), jnp.zeros(4))
  step = lambda w, s, b: (w, s, 0.0)
  with pytest.raises(ValueError, match="index"):
    measured_stability(step, jnp.zeros(2), None, data, 4, num_steps=1)
  with pytest.raises(ValueError, match="replacement"):
    measured_stability(step, jnp.zeros(2), None, data, 0, num_steps=1,
                       replacement=(jnp.zeros(3), jnp.zeros(())))
  with pytest.raises(ValueError, match="num_steps"):
    measured_stability(step, jnp.zeros(2), None, data, 0, num_steps=0)

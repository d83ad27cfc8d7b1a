"""Diagnostics of the stationary state of a (stochastic-gradient) Langevin chain.

* Moments against a reference (exact posterior): :func:`moment_errors`.
* Closed forms near a minimum (quadratic potential with Hessian ``H``): the chain
  ``theta' = theta - h A (H theta + xi) + sqrt(2 h T) A^{1/2} z`` (``A`` a constant preconditioner,
  ``xi`` minibatch noise with covariance ``C_B``) is linear, and its stationary covariance solves
  the discrete Lyapunov equation ``S = F S F^T + Q`` with ``F = I - h A H`` and
  ``Q = 2 h T A + h^2 A C_B A`` (:func:`langevin_stationary_covariance`). For SGD (``T = 0``) it
  is ``H S + S H - h H S H = h C_B`` (:func:`sgd_stationary_covariance`); the continuous-time
  Ornstein-Uhlenbeck limit is ``H S + S H^T = 2 D`` (:func:`ou_stationary_covariance`).
* The probability current: for the OU process ``J(theta) = (D S^{-1} - H) theta P_ss(theta)``, zero
  iff ``H D = D H`` (equilibrium). In a 2-D projection the current circulates; its strength is the
  stationary area rate ``<theta_i d theta_j - theta_j d theta_i> / dt``, which for the linear chain
  is ``((S F^T)_{ij} - (S F^T)_{ji}) / h`` (:func:`stationary_area_rate`), estimated from a
  trajectory by :func:`area_rate` and mapped on a grid by :func:`probability_current_2d`.
* Entropy production of a coarse-grained trajectory (states = cells of a 2-D projection) and the
  integral fluctuation theorem ``<exp(-Delta S)> = 1``: :func:`coarse_grain`,
  :func:`transition_matrix`, :func:`entropy_production_rate`,
  :func:`segment_entropy_production`, :func:`integral_fluctuation_check`.

All closed forms are NumPy float64 (they are small dense problems).

Reference: Yuret, Kabakcioglu, Hinczewski, Strang & Adhikari, *Machine learning in and out of
equilibrium* (see docs/sampling.md); Seifert, *Stochastic thermodynamics, fluctuation
theorems and molecular machines*, Rep. Prog. Phys. 2012, for the fluctuation theorems.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _matrix(a, name: str) -> np.ndarray:
  a = np.asarray(a, np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"{name} must be a square matrix; got shape {a.shape}.")
  return a


def moment_errors(samples, mean, cov) -> dict[str, np.ndarray | float]:
  """Sample mean and covariance against a reference.

  Args:
    samples: ``(n, d)`` draws.
    mean: reference mean ``(d,)``.
    cov: reference covariance ``(d, d)``.

  Returns:
    ``{"mean", "cov", "mean_error", "cov_error"}``: ``mean_error`` is the Mahalanobis distance
    ``sqrt((m - mu)^T Sigma^{-1} (m - mu))`` (in posterior standard deviations), ``cov_error`` the
    relative Frobenius error ``|S - Sigma|_F / |Sigma|_F``.

  Example:
    >>> rng = np.random.default_rng(0)
    >>> e = moment_errors(rng.normal(size=(40000, 2)), np.zeros(2), np.eye(2))
    >>> bool(e["cov_error"] < 0.05 and e["mean_error"] < 0.05)
    True
  """
  samples = np.asarray(samples, np.float64)
  if samples.ndim != 2:
    raise ValueError(f"samples must be (n, d); got shape {samples.shape}.")
  mean, cov = np.asarray(mean, np.float64), _matrix(cov, "cov")
  m = samples.mean(axis=0)
  s = np.cov(samples, rowvar=False, bias=True).reshape(cov.shape)
  diff = m - mean
  mean_error = float(np.sqrt(diff @ np.linalg.solve(cov, diff)))
  cov_error = float(np.linalg.norm(s - cov) / np.linalg.norm(cov))
  return {"mean": m, "cov": s, "mean_error": mean_error, "cov_error": cov_error}


def discrete_lyapunov(f, q) -> np.ndarray:
  """Solves ``S = F S F^T + Q`` (the stationary covariance of ``x' = F x + noise(Q)``).

  Needs the spectral radius of ``F`` below 1 (a stable chain); raises otherwise.

  Example:
    >>> float(discrete_lyapunov(np.array([[0.5]]), np.array([[0.75]]))[0, 0])
    1.0
  """
  f, q = _matrix(f, "F"), _matrix(q, "Q")
  radius = np.max(np.abs(np.linalg.eigvals(f)))
  if radius >= 1:
    raise ValueError(f"The chain is unstable (spectral radius of F = {radius:.4g} >= 1): there is "
                     "no stationary covariance. Lower the step size.")
  d = f.shape[0]
  s = np.linalg.solve(np.eye(d * d) - np.kron(f, f), q.reshape(-1)).reshape(d, d)
  return 0.5 * (s + s.T)


def continuous_lyapunov(a, q) -> np.ndarray:
  """Solves ``A S + S A^T = Q``."""
  a, q = _matrix(a, "A"), _matrix(q, "Q")
  d = a.shape[0]
  eye = np.eye(d)
  s = np.linalg.solve(np.kron(a, eye) + np.kron(eye, a), q.reshape(-1)).reshape(d, d)
  return 0.5 * (s + s.T)


def langevin_transition(hessian, step_size: float, temperature: float = 1.0,
                        gradient_noise_cov=None, preconditioner=None) -> tuple[np.ndarray, np.ndarray]:
  """``(F, Q)`` of the linearised chain ``theta' = F theta + noise`` with noise covariance ``Q``.

  ``F = I - h A H``, ``Q = 2 h T A + h^2 A C_B A`` (``A = I`` for SGLD/SGWORLD, ``G_U^{-1}`` for
  Riemannian SGLD with a constant metric).
  """
  h = _matrix(hessian, "hessian")
  d = h.shape[0]
  a = np.eye(d) if preconditioner is None else _matrix(preconditioner, "preconditioner")
  c = np.zeros((d, d)) if gradient_noise_cov is None else _matrix(gradient_noise_cov,
                                                                   "gradient_noise_cov")
  f = np.eye(d) - step_size * a @ h
  q = 2.0 * step_size * temperature * a + step_size ** 2 * a @ c @ a.T
  return f, 0.5 * (q + q.T)


def langevin_stationary_covariance(hessian, step_size: float, temperature: float = 1.0,
                                   gradient_noise_cov=None, preconditioner=None) -> np.ndarray:
  """Exact stationary covariance of the discretised (stochastic-gradient) Langevin chain.

  Example:
    >>> s = langevin_stationary_covariance(np.eye(1), 0.1)   # 1 / (1 - h/2) for H = 1
    >>> round(float(s[0, 0]), 6)
    1.052632
  """
  return discrete_lyapunov(*langevin_transition(hessian, step_size, temperature,
                                                gradient_noise_cov, preconditioner))


def sgd_stationary_covariance(hessian, step_size: float, gradient_noise_cov) -> np.ndarray:
  """Solves ``H S + S H - h H S H = h Cov(g_B)``: SGD's stationary covariance near a minimum."""
  return langevin_stationary_covariance(hessian, step_size, 0.0, gradient_noise_cov)


def ou_stationary_covariance(hessian, diffusion) -> np.ndarray:
  """Solves ``H S + S H^T = 2 D`` for ``d theta = -H theta dt + sqrt(2 D) dW``."""
  return continuous_lyapunov(hessian, 2.0 * _matrix(diffusion, "diffusion"))


def ou_current_matrix(hessian, diffusion) -> np.ndarray:
  """``Omega = D S^{-1} - H``: the stationary current is ``J(theta) = Omega theta P_ss(theta)``.

  ``Omega = 0`` iff ``H D = D H`` (detailed balance).
  """
  h, d = _matrix(hessian, "hessian"), _matrix(diffusion, "diffusion")
  s = ou_stationary_covariance(h, d)
  return d @ np.linalg.inv(s) - h


def minibatch_gradient_covariance(per_sample_cov, data_size: int, batch_size: int) -> np.ndarray:
  """``Cov`` of the mean of ``B`` distinct samples out of ``N``: ``(N - B) / (B (N - 1)) C``.

  ``C`` is the per-sample gradient covariance over the data (normalised by ``N``). Multiply by
  ``N^2`` for the gradient of the potential estimate ``(N / B) sum grad loss_i``.
  """
  if batch_size > data_size:
    raise ValueError(f"batch_size={batch_size} is larger than data_size={data_size}.")
  c = _matrix(per_sample_cov, "per_sample_cov")
  return (data_size - batch_size) / (batch_size * (data_size - 1)) * c


def stationary_area_rate(f, s, step_size: float, dims: Sequence[int] = (0, 1)) -> float:
  """``<theta_i theta'_j - theta_j theta'_i> / h`` of the linear chain ``theta' = F theta + noise``.

  ``E[theta theta'^T] = S F^T``, so the rate is ``((S F^T)_{ij} - (S F^T)_{ji}) / h``; it is the
  (Stratonovich) circulation of the probability current in the ``(i, j)`` plane, zero at
  equilibrium.
  """
  i, j = dims
  c = _matrix(s, "S") @ _matrix(f, "F").T
  return float((c[i, j] - c[j, i]) / step_size)


def area_rate(trajectory, step_size: float, dims: Sequence[int] = (0, 1),
              center=None) -> tuple[float, float]:
  """Estimate of :func:`stationary_area_rate` from a trajectory ``(T, d)``, with a standard error.

  The error bar treats the per-step terms as independent (they are uncorrelated when the
  increments are dominated by fresh noise; use a long trajectory or block it otherwise).
  """
  x = np.asarray(trajectory, np.float64)
  x = x - (x.mean(axis=0) if center is None else np.asarray(center, np.float64))
  i, j = dims
  terms = (x[:-1, i] * x[1:, j] - x[:-1, j] * x[1:, i]) / step_size
  return float(terms.mean()), float(terms.std() / np.sqrt(len(terms)))


def probability_current_2d(trajectory, step_size: float, dims: Sequence[int] = (0, 1),
                           bins: int = 12, extent: float = 3.0):
  """The probability current on a grid of a 2-D projection (Stratonovich estimate).

  ``J(cell) = sum_t (x_{t+1} - x_t) / h * 1[midpoint in cell] / (T * cell area)``.

  Returns:
    ``(centers_x, centers_y, J)`` with ``J`` of shape ``(bins, bins, 2)``; the grid spans
    ``extent`` standard deviations around the mean of each coordinate.
  """
  x = np.asarray(trajectory, np.float64)[:, list(dims)]
  mid, vel = 0.5 * (x[1:] + x[:-1]), (x[1:] - x[:-1]) / step_size
  mu, sd = x.mean(axis=0), x.std(axis=0)
  edges = [np.linspace(mu[k] - extent * sd[k], mu[k] + extent * sd[k], bins + 1) for k in (0, 1)]
  area = (edges[0][1] - edges[0][0]) * (edges[1][1] - edges[1][0])
  current = np.zeros((bins, bins, 2))
  for k in (0, 1):
    current[..., k] = np.histogram2d(mid[:, 0], mid[:, 1], bins=edges, weights=vel[:, k])[0]
  current /= len(mid) * area
  centers = [0.5 * (e[1:] + e[:-1]) for e in edges]
  return centers[0], centers[1], current


def coarse_grain(trajectory, dims: Sequence[int] = (0, 1), bins: int = 3) -> np.ndarray:
  """Maps a trajectory to discrete states: cells of a ``bins x bins`` grid in a 2-D projection.

  Cell edges are quantiles of each coordinate, so every state is visited.
  """
  x = np.asarray(trajectory, np.float64)[:, list(dims)]
  labels = []
  for k in range(x.shape[1]):
    edges = np.quantile(x[:, k], np.linspace(0, 1, bins + 1)[1:-1])
    labels.append(np.searchsorted(edges, x[:, k]))
  state = np.zeros(len(x), np.int64)
  for lab in labels:
    state = state * bins + lab
  return state


def transition_matrix(states, num_states: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Empirical transition matrix ``P_ij`` and occupation ``pi_i`` of a discrete trajectory."""
  states = np.asarray(states, np.int64)
  num_states = int(states.max()) + 1 if num_states is None else num_states
  counts = np.zeros((num_states, num_states))
  np.add.at(counts, (states[:-1], states[1:]), 1.0)
  rows = counts.sum(axis=1, keepdims=True)
  p = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
  pi = np.bincount(states[:-1], minlength=num_states) / (len(states) - 1)
  return p, pi


def entropy_production_rate(p, pi) -> float:
  """``sigma = sum_ij pi_i P_ij log(pi_i P_ij / (pi_j P_ji))`` per step (0 at detailed balance).

  Pairs with a one-way transition (``P_ij > 0 = P_ji``) make it infinite.
  """
  p, pi = _matrix(p, "P"), np.asarray(pi, np.float64)
  flux = pi[:, None] * p
  forward, backward = flux, flux.T
  mask = forward > 0
  if np.any(mask & (backward <= 0)):
    return float("inf")
  return float(np.sum(forward[mask] * np.log(forward[mask] / backward[mask])))


def segment_entropy_production(states, p, pi, length: int) -> np.ndarray:
  """Total entropy production ``Delta S`` of consecutive non-overlapping segments of ``length`` steps.

  ``Delta S = log pi(x_0) - log pi(x_L) + sum_k log(P(x_k, x_{k+1}) / P(x_{k+1}, x_k))``: the log
  ratio of the probability of the segment to that of its time reverse, both started from the
  stationary law. ``<exp(-Delta S)> = 1`` (integral fluctuation theorem) when the segments are
  drawn from the Markov chain ``(P, pi)``; for a coarse-grained, non-Markovian trajectory with the
  fitted ``(P, pi)`` it holds approximately.
  """
  if length < 1:
    raise ValueError(f"length={length}: segments need at least one step.")
  states = np.asarray(states, np.int64)
  p, pi = _matrix(p, "P"), np.asarray(pi, np.float64)
  count = (len(states) - 1) // length
  if count < 1:
    raise ValueError(f"The trajectory ({len(states)} states) is shorter than one segment.")
  with np.errstate(divide="ignore"):
    log_p, log_pi = np.log(p), np.log(pi)
  seg = states[:count * length + 1]
  step_terms = log_p[seg[:-1], seg[1:]] - log_p[seg[1:], seg[:-1]]
  sums = step_terms.reshape(count, length).sum(axis=1)
  starts, ends = seg[0:-1:length], seg[length::length]
  return log_pi[starts] - log_pi[ends] + sums


def integral_fluctuation_check(delta_s) -> tuple[float, float]:
  """``<exp(-Delta S)>`` and its standard error (should be 1 within the error)."""
  w = np.exp(-np.asarray(delta_s, np.float64))
  return float(w.mean()), float(w.std() / np.sqrt(len(w)))

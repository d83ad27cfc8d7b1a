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
* Convergence of several chains: the rank-normalised split ``R-hat`` and the bulk and tail effective
  sample sizes of Vehtari et al. (2021), :func:`rhat` and :func:`effective_sample_size`.

All closed forms are NumPy float64 (they are small dense problems).

Reference: Yuret, Kabakcioglu, Hinczewski, Strang & Adhikari, *Machine learning in and out of
equilibrium* (see docs/sampling.md); Seifert, *Stochastic thermodynamics, fluctuation
theorems and molecular machines*, Rep. Prog. Phys. 2012, for the fluctuation theorems;
Vehtari, Gelman, Simpson, Carpenter & Buerkner, *Rank-normalization, folding, and localization: an
improved R-hat for assessing convergence of MCMC*, Bayesian Analysis 2021 (arXiv 1903.08008), for
``rhat`` and ``effective_sample_size``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.special
import scipy.stats


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


# --- convergence of several chains (Vehtari et al. 2021) ---------------------------------------------

def _chains(chains, what: str, min_chains: int = 1) -> np.ndarray:
  x = np.asarray(chains, np.float64)
  if x.ndim == 1:
    x = x[None]
  if x.ndim != 2:
    raise ValueError(f"{what}: chains must be (num_chains, num_draws) for one quantity; got shape {x.shape}. "
                     "Pass one parameter at a time, e.g. chains[..., i].")
  if x.shape[1] < 4:
    raise ValueError(f"{what}: {x.shape[1]} draws per chain; at least 4 are needed (two halves of two).")
  if x.shape[0] < min_chains:
    raise ValueError(f"{what}: {x.shape[0]} chain(s); at least {min_chains} are needed. Run more chains.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: the chains contain NaN or inf.")
  return x


def _split_halves(x: np.ndarray) -> np.ndarray:
  """Each chain's first and last ``n // 2`` draws as two chains (an odd chain loses its middle draw)."""
  half = x.shape[1] // 2
  return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]])


def _normal_scores(x: np.ndarray) -> np.ndarray:
  """Rank normalisation: pooled average ranks ``r`` mapped to ``Phi^-1((r - 3/8) / (S + 1/4))``."""
  ranks = scipy.stats.rankdata(x, method="average", axis=None).reshape(x.shape)
  return scipy.special.ndtri((ranks - 0.375) / (x.size + 0.25))


def _basic_rhat(x: np.ndarray) -> float:
  """``sqrt(var+ / W)`` with ``var+ = (n - 1) / n W + B / n`` (``W`` within, ``B / n`` between chains)."""
  n = x.shape[1]
  within = np.mean(np.var(x, axis=1, ddof=1))
  between_over_n = np.var(np.mean(x, axis=1), ddof=1)
  return float(np.sqrt(((n - 1) / n * within + between_over_n) / within))


def _basic_ess(x: np.ndarray) -> float:
  """ESS of the mean of ``x`` (chains as rows): ``S / tau`` with Geyer's truncated autocorrelation sum."""
  m, n = x.shape
  total = m * n
  if np.ptp(x) < np.finfo(np.float64).resolution:
    return float(total)  # constant draws: every draw is "effective" (nothing to estimate)
  centered = x - x.mean(axis=1, keepdims=True)
  size = 1 << int(np.ceil(np.log2(2 * n)))  # zero padding: the FFT gives the linear, not circular, sums
  spectrum = np.fft.rfft(centered, n=size, axis=1)
  autocov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=1)[:, :n] / n
  within = np.mean(autocov[:, 0]) * n / (n - 1.0)
  var_plus = within * (n - 1.0) / n + (np.var(np.mean(x, axis=1), ddof=1) if m > 1 else 0.0)
  # Combined autocorrelation at lag t: 1 - (W - mean_m autocov_m(t)) / var+.
  rho = 1.0 - (within - np.mean(autocov, axis=0)) / var_plus
  # Geyer's initial positive sequence: sums of consecutive pairs (rho_{2k}, rho_{2k+1}) while positive.
  kept = np.zeros(n)
  kept[0], kept[1] = 1.0, rho[1]  # rho_0 = 1 by definition
  even, odd, t = 1.0, rho[1], 1
  while t < n - 3 and even + odd > 0.0:
    even, odd = rho[t + 1], rho[t + 2]
    if even + odd >= 0.0:
      kept[t + 1], kept[t + 2] = even, odd
    t += 2
  last = t - 2
  if even > 0.0:
    kept[last + 1] = even  # the positive even lag after the last pair (less variance for antithetic chains)
  # Geyer's initial monotone sequence: the pair sums may not increase.
  for t in range(1, last - 1, 2):
    if kept[t + 1] + kept[t + 2] > kept[t - 1] + kept[t]:
      kept[t + 1] = kept[t + 2] = 0.5 * (kept[t - 1] + kept[t])
  tau = -1.0 + 2.0 * np.sum(kept[:last + 1]) + kept[last + 1]
  # tau >= 1 / log10(S) caps the ESS of strongly antithetic chains at S log10(S).
  return float(total / max(tau, 1.0 / np.log10(total)))


def rhat(chains) -> float:
  """Rank-normalised split ``R-hat`` of one quantity from several chains.

  Each chain is split in halves; the draws are replaced by their normal scores (pooled ranks mapped
  through the normal quantile function), and ``R-hat = sqrt(var+ / W)`` compares the pooled variance
  estimate ``var+`` with the within-chain variance ``W``. The result is the larger of this value and the
  same for the folded draws ``|x - median|``, so that chains that agree in location but not in scale are
  caught too. Near 1 when the chains have mixed; Vehtari et al. recommend ``< 1.01``.

  Args:
    chains: ``(num_chains, num_draws)``, at least 2 chains of at least 4 draws.

  Returns:
    ``R-hat`` (float).

  Raises:
    ValueError: fewer than 2 chains or 4 draws, a wrong shape or non-finite draws.

  References:
    Vehtari, Gelman, Simpson, Carpenter & Buerkner, Bayesian Analysis 2021 (arXiv 1903.08008).

  Example:
    >>> rng = np.random.default_rng(0)
    >>> bool(rhat(rng.normal(size=(4, 1000))) < 1.01)
    True
    >>> bool(rhat(rng.normal(size=(4, 1000)) + np.arange(4)[:, None]) > 1.1)   # chains disagree
    True
  """
  x = _split_halves(_chains(chains, "rhat", min_chains=2))
  bulk = _basic_rhat(_normal_scores(x))
  tail = _basic_rhat(_normal_scores(np.abs(x - np.median(x))))
  return max(bulk, tail)


def effective_sample_size(chains, method: str = "bulk", prob: float = 0.05) -> float:
  """Effective sample size of one quantity from one or more chains.

  ``S / tau`` for ``S`` draws in all, with ``tau = 1 + 2 sum_t rho_t`` the integrated autocorrelation of
  split chains (autocorrelations combined over chains through the pooled variance, and the sum truncated
  by Geyer's initial positive and monotone sequences).

  Args:
    chains: ``(num_chains, num_draws)`` or ``(num_draws,)``, at least 4 draws per chain.
    method: ``"bulk"`` (normal scores of the draws: the ESS of the centre of the distribution, robust to
      heavy tails), ``"tail"`` (the smaller ESS of the indicators ``x <= q_prob`` and ``x <= q_{1-prob}``:
      how well the tails are explored) or ``"mean"`` (the raw draws: the ESS for the Monte-Carlo error of
      the mean, ``sd / sqrt(ESS)``).
    prob: tail probability for ``method="tail"`` (default 5% and 95% quantiles).

  Returns:
    The effective sample size (float; can exceed ``S`` for antithetic chains).

  Raises:
    ValueError: an unknown ``method``, ``prob`` outside ``(0, 1)``, fewer than 4 draws, a wrong shape or
      non-finite draws.

  References:
    Vehtari, Gelman, Simpson, Carpenter & Buerkner, Bayesian Analysis 2021 (arXiv 1903.08008); Geyer,
    *Practical Markov chain Monte Carlo*, Statistical Science 1992, for the truncation.

  Example:
    >>> rng = np.random.default_rng(0)
    >>> x = np.zeros((4, 4000))
    >>> for t in range(1, 4000):   # AR(1) with rho = 0.5: ESS ~ S (1 - rho) / (1 + rho) = 5333
    ...   x[:, t] = 0.5 * x[:, t - 1] + rng.normal(size=4)
    >>> 4500 < effective_sample_size(x, "mean") < 6200
    True
  """
  if method not in ("bulk", "tail", "mean"):
    raise ValueError(f"method='{method}' is unknown; use 'bulk', 'tail' or 'mean'.")
  if not 0.0 < prob < 1.0:
    raise ValueError(f"prob={prob} must lie in (0, 1), e.g. 0.05 for the 5% and 95% quantiles.")
  x = _chains(chains, "effective_sample_size")
  if method == "mean":
    return _basic_ess(_split_halves(x))
  if method == "bulk":
    return _basic_ess(_normal_scores(_split_halves(x)))
  low, high = sorted((prob, 1.0 - prob))
  return min(_basic_ess(_split_halves((x <= np.quantile(x, q)).astype(np.float64))) for q in (low, high))

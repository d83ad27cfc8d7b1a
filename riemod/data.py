"""Small bundled data sets for the demo, examples and benchmarks."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Digits(NamedTuple):
  """scikit-learn's 8x8 digits, pixels scaled to [0, 1]."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits(num_train: int = 1500, seed: int = 0, dtype=np.float32) -> Digits:
  """The 1797 digits split into ``num_train`` training and the rest test samples.

  Needs scikit-learn (``pip install riemod[demo]``), which bundles the data (no download).

  Example:
    >>> d = load_digits()
    >>> d.x_train.shape, d.x_test.shape
    ((1500, 64), (297, 64))
  """
  try:
    from sklearn.datasets import load_digits as _sk_load_digits
  except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("The digits data come with scikit-learn: pip install 'riemod[demo]'.") from error
  bunch = _sk_load_digits()
  x = (bunch.data / 16.0).astype(dtype)
  y = bunch.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  return Digits(x[:num_train], y[:num_train], x[num_train:], y[num_train:])

"""Data, initial parameters and batch orders, in NumPy only.

Both the main environment (riemod, jax 0.10) and the kfac-jax environment (jax 0.9) import this
file, so every optimizer of a seed starts from bit-identical parameters and sees the same batches.

* Digits: riemod's own split (``riemod/data.py``, loaded by path so that no jax import is needed):
  1500 training and 297 test images, pixels in [0, 1].
* Initialisation: LeCun normal kernels ``N(0, 1 / fan_in)``, zero biases, from
  ``numpy.random.default_rng(seed)``.
* Batch order: epochs of a fresh permutation of the training set per seed, the last incomplete
  batch of each epoch dropped; row ``i`` of the table is the batch of step ``i``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_DATA_FILE = Path(__file__).resolve().parents[1] / "riemod" / "data.py"


def digits(dtype=np.float32):
  """``(x_train, y_train, x_test, y_test)`` of riemod's digits split (split seed 0)."""
  spec = importlib.util.spec_from_file_location("_riemod_data", _DATA_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return tuple(module.load_digits(num_train=1500, seed=0, dtype=dtype))


def mlp_init(sizes: list[int], seed: int, dtype=np.float32) -> list[tuple[np.ndarray, np.ndarray]]:
  """``[(kernel (fan_in, fan_out), bias (fan_out,))]`` for consecutive ``sizes``."""
  rng = np.random.default_rng(seed)
  out = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    w = rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)
    out.append((w.astype(dtype), np.zeros(fan_out, dtype)))
  return out


def batch_table(seed: int, num_data: int, batch_size: int, num_steps: int) -> np.ndarray:
  """``(num_steps, batch_size)`` int32 indices: epoch-wise permutations from ``seed``."""
  rng = np.random.default_rng(10_000 + seed)
  per_epoch = num_data // batch_size
  rows = []
  while len(rows) < num_steps:
    perm = rng.permutation(num_data)
    rows += [perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
  return np.asarray(rows[:num_steps], np.int32)

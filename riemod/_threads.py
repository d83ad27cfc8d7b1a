"""BLAS threads: riemod limits OpenBLAS / MKL / BLIS to one thread when it is imported.

On CPU, jaxlib runs its LAPACK kernels (``potrf`` for every Cholesky factorisation of a riemod
step) in the BLAS library that scipy ships (``libscipy_openblas``), loaded on the first LAPACK call.
OpenBLAS starts one worker per core and lets its workers spin between calls, so while XLA's own
thread pool runs the rest of the step the two pools compete for the same cores. On a busy machine
that makes a step several times slower; one BLAS thread removes the contention (numbers:
``python -m benchmarks.bench_blas_threads``, results in ``benchmarks/results/blas_threads.md``).

What ``import riemod`` does (unless ``RIEMOD_BLAS_THREADS=keep``):

1. sets ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``BLIS_NUM_THREADS`` to ``1`` where they
   are unset, so a BLAS library loaded later starts with one thread (child processes inherit this);
2. loads scipy's LAPACK (the library jaxlib calls) so that it starts under those variables;
3. limits BLAS libraries that were already loaded to one thread (``threadpoolctl``), leaving alone
   a library whose variable you set yourself.

Opt-out and control:

* ``RIEMOD_BLAS_THREADS=keep``: riemod leaves threads and environment untouched;
* ``RIEMOD_BLAS_THREADS=<n>``: ``n`` threads for every BLAS library, overriding your variables;
* ``riemod.set_blas_threads(n)`` at run time; ``riemod.set_blas_threads(None)`` undoes riemod's
  changes (variables and thread counts).
"""

from __future__ import annotations

import os

import threadpoolctl

ENV_VAR = "RIEMOD_BLAS_THREADS"
# The variable each BLAS library reads when it is loaded (threadpoolctl's ``internal_api`` names).
LIBRARY_VARIABLES = {"openblas": "OPENBLAS_NUM_THREADS", "mkl": "MKL_NUM_THREADS",
                     "blis": "BLIS_NUM_THREADS"}

# What riemod found before its first change: {variable: value or None}, {library path: threads}.
_original_env: dict[str, str | None] = {}
_original_threads: dict[str, int] = {}


def _load_lapack() -> None:
  """Loads the LAPACK jaxlib uses on CPU (scipy's), so that its thread pool can be limited now."""
  try:
    import scipy.linalg.cython_lapack  # noqa: F401 - loading the shared library is the point
  except ImportError:  # jax requires scipy; without it there is no LAPACK of scipy's to limit
    pass


def _blas_controllers():
  return [c for c in threadpoolctl.ThreadpoolController().lib_controllers if c.user_api == "blas"]


def blas_threads() -> dict[str, int]:
  """The BLAS libraries loaded in this process and their thread counts, ``{path: threads}``."""
  return {c.filepath: c.num_threads for c in _blas_controllers()}


def _default_threads() -> int:
  """The pool a BLAS library starts with when no variable limits it: one thread per usable core."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _user_set(variable: str) -> bool:
  """Whether the user gave ``variable`` a value (an empty one counts as unset, as for OpenBLAS)."""
  return bool((_original_env.get(variable) or "").strip())


def _set(n: int, *, respect_user_env: bool) -> dict[str, int]:
  loaded = blas_threads()  # pools that exist before this call changes any variable
  for variable in LIBRARY_VARIABLES.values():
    _original_env.setdefault(variable, os.environ.get(variable))
    if not (respect_user_env and _user_set(variable)):
      os.environ[variable] = str(n)
  _load_lapack()
  limits = {}
  for controller in _blas_controllers():
    variable = LIBRARY_VARIABLES.get(controller.internal_api)
    if respect_user_env and variable is not None and _user_set(variable):
      continue
    # A library loaded under riemod's variable would otherwise have had its default pool.
    _original_threads.setdefault(controller.filepath,
                                 loaded.get(controller.filepath, _default_threads()))
    limits[controller.filepath] = n
  if limits:
    threadpoolctl.threadpool_limits(limits=limits)  # not a context: the limit stays
  return blas_threads()


def set_blas_threads(n: int | None) -> dict[str, int]:
  """Sets the number of BLAS threads (OpenBLAS, MKL, BLIS), now and for libraries loaded later.

  ``import riemod`` already calls this with ``n = 1`` (see the module docstring for why and for
  the ``RIEMOD_BLAS_THREADS`` opt-out); call it to choose another count at run time.

  Args:
    n: threads per BLAS library (a positive integer), or ``None`` to restore the
      ``*_NUM_THREADS`` variables found before riemod first changed them, and each library's
      thread count from before (one thread per usable core, OpenBLAS's default, for a library
      that loaded under riemod's variable).

  Returns:
    ``{library path: threads}`` for every BLAS library loaded in this process, after the change.

  Raises:
    ValueError: ``n`` is neither ``None`` nor a positive integer.

  Example:
    >>> import riemod
    >>> counts = riemod.set_blas_threads(1)
    >>> all(threads == 1 for threads in counts.values())
    True
  """
  if n is None:
    for variable, value in _original_env.items():
      if value is None:
        os.environ.pop(variable, None)
      else:
        os.environ[variable] = value
    if _original_threads:
      threadpoolctl.threadpool_limits(limits=dict(_original_threads))
    _original_env.clear()
    _original_threads.clear()
    return blas_threads()
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"set_blas_threads: n must be a positive integer or None, got {n!r}.")
  return _set(n, respect_user_env=False)


def _limit_at_import() -> None:
  """Applies ``RIEMOD_BLAS_THREADS`` (default: one thread where the user set no variable)."""
  setting = os.environ.get(ENV_VAR, "").strip().lower()
  if setting == "keep":
    return
  if setting in ("", "1"):
    _set(1, respect_user_env=setting == "")
    return
  try:
    n = int(setting)
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: use 'keep' (leave BLAS threads alone) "
                     "or a positive integer (threads per BLAS library); unset means 1.")
  _set(n, respect_user_env=False)


_limit_at_import()

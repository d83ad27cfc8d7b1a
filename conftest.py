"""Settings for every test run (tests/ and the docstring examples in riemod/).

The suite is compile-bound: an eager riemod call compiles each primitive it meets as its own small
XLA program. XLA's cheapest CPU settings roughly halve the CPU time of that work
(``python -m benchmarks.bench_test_flags``, results/test_flags.md), so the tests run with them.
They change how XLA generates code, not what it computes; tests/test_multidevice.py's subprocess
uses the same optimisation level, and the benchmarks run with XLA's defaults.
"""

import os

_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                 "--xla_cpu_use_fusion_emitters=false")

# XLA reads XLA_FLAGS when JAX creates its first backend, after this file is imported.
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in _FAST_COMPILE
                                             if f.split("=")[0] not in " ".join(_flags)])

"""The README quickstart runs as written, and every public name it mentions exists."""

from __future__ import annotations

import pathlib
import re

import riemod

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs():
  blocks = _python_blocks()
  assert blocks, "the README has no python quickstart"
  namespace: dict = {}
  exec(compile(blocks[0], "README quickstart", "exec"), namespace)  # asserts inside the block
  assert namespace["losses"][-1] < namespace["losses"][0]


def test_public_contract_names_exist():
  for name in ("value_grad_and_curvature", "layerwise_natural_gradient", "natural_gradient",
               "scale_by_layerwise_metric", "compose_metric"):
    assert callable(getattr(riemod, name))
  for name in ("Dense", "Conv", "Sequential", "Parallel"):
    assert hasattr(riemod.nn, name)
  for name in ("identity", "residual", "softmax_fisher", "sampled_softmax_fisher",
               "gaussian_sketch", "custom"):
    assert callable(getattr(riemod.metrics, name))

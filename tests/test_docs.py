"""The generated API page is current, and every public name has a docstring."""

from __future__ import annotations

import importlib.util
import pathlib

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _generator():
  spec = importlib.util.spec_from_file_location("gen_api", DOCS / "gen_api.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_page_is_current():
  assert (DOCS / "api.md").read_text() == _generator().render(), (
      "docs/api.md is stale: run `python docs/gen_api.py`.")


def test_every_public_name_is_documented():
  import inspect

  import riemod

  missing = []
  generator = _generator()
  for module_name, _ in generator.SECTIONS:  # every module the API page lists
    module = generator.resolve(module_name)
    for name in getattr(module, "__all__", []):
      obj = getattr(module, name)
      if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
        missing.append(f"{module_name}.{name}")
  assert not missing, f"undocumented public names: {missing}"
  assert riemod.__doc__

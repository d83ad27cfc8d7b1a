"""Every ``riemod.<name>`` the README and the docs mention in code spans exists.

(The README's and the docs' python snippets themselves run in ``tests/test_snippets.py``.)
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)  # fenced blocks and inline code spans
# One-letter segments are placeholders (`help(riemod.X)`); riemod has no public one-letter names.
_DOTTED = re.compile(r"(?<![\w.])riemod(?:\.[A-Za-z_]\w+)+")


def references(text: str) -> set[str]:
  """``riemod.a.b`` names inside the code of a Markdown text."""
  return {name for span in _CODE.findall(text) for name in _DOTTED.findall(span)}


def resolves(dotted: str) -> bool:
  """Whether ``riemod.a.b`` is an attribute chain (importing submodules on the way)."""
  parts = dotted.split(".")
  obj = importlib.import_module(parts[0])
  for i, part in enumerate(parts[1:], start=1):
    if hasattr(obj, part):
      obj = getattr(obj, part)
      continue
    try:
      obj = importlib.import_module(".".join(parts[:i + 1]))
    except ModuleNotFoundError:
      return False
  return True


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_mentioned_names_exist(page):
  missing = sorted(name for name in references(page.read_text()) if not resolves(name))
  assert not missing, f"{page.name} mentions names riemod does not have: {missing}"


def test_reference_extraction():
  text = ("Call `riemod.nn.Dense(3, 4)` or\n```python\nriemod.metrics.identity()\n```\n"
          "but not riemod.outside.code nor `myriemod.x`.")
  assert references(text) == {"riemod.nn.Dense", "riemod.metrics.identity"}
  assert resolves("riemod.nn.Dense") and not resolves("riemod.nn.NoSuchLayer")

"""Every python snippet of README.md and docs/*.md runs as written.

A page's ```python blocks run in order in one fresh namespace (a later block may use what an earlier
one defined), in a temporary working directory. A block that cannot run standalone is marked on
the line right before its fence with ``<!-- skip: the reason -->``; keep those rare. ```py,
```python3 and ```pycon fences count as python too, so no snippet escapes the test by its spelling.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")
PYTHON = {"python", "py", "python3", "pycon"}


@dataclasses.dataclass
class Snippet:
  page: pathlib.Path
  line: int  # of the opening fence, 1-based
  code: str
  skip: str | None  # the reason, when marked


def snippets(page: pathlib.Path) -> list[Snippet]:
  """The python blocks of ``page`` with their line and skip reason."""
  text = page.read_text()
  found = []
  for match in _FENCE.finditer(text):
    if match.group("lang").lower() not in PYTHON:
      continue
    line = text.count("\n", 0, match.start()) + 1
    before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
    skip = _SKIP.search(before)
    code = match.group("body")
    if match.group("lang").lower() == "pycon":  # keep the statements of a console transcript
      code = "\n".join(l[4:] for l in code.splitlines() if l.startswith((">>> ", "... ")))
    found.append(Snippet(page, line, code, skip.group("reason") if skip else None))
  return found


def _name(page: pathlib.Path) -> str:
  return str(page.relative_to(ROOT))


PAGES_WITH_CODE = [p for p in PAGES if snippets(p)]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
  """A temporary working directory, and jax's float64 switch restored afterwards."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  x64 = jax.config.jax_enable_x64
  yield tmp_path
  jax.config.update("jax_enable_x64", x64)


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_name)
def test_page_snippets_run(page, isolated):
  namespace: dict = {"__name__": "__snippet__"}
  ran = 0
  for snippet in snippets(page):
    if snippet.skip is not None:
      continue
    label = f"{_name(page)}:{snippet.line}"
    try:
      exec(compile(snippet.code, label, "exec"), namespace)  # asserts inside the blocks check results
    except Exception as error:
      raise AssertionError(f"the snippet at {label} fails: {type(error).__name__}: {error}") from error
    ran += 1
  assert ran or all(s.skip for s in snippets(page))


def test_skips_are_explained_and_rare():
  every = [s for p in PAGES for s in snippets(p)]
  skipped = [s for s in every if s.skip is not None]
  assert all(s.skip for s in skipped), "a skip marker needs a reason: <!-- skip: why -->"
  assert len(skipped) <= max(1, len(every) // 10), (
      "more than one python snippet in ten is skipped: "
      + ", ".join(f"{_name(s.page)}:{s.line} ({s.skip})" for s in skipped))


def test_extraction_finds_marked_and_spelled_blocks(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("text\n```python\nx = 1\n```\n<!-- skip: needs a GPU -->\n```py\ny = 2\n```\n"
                  "```bash\nls\n```\n```pycon\n>>> z = 3\n3\n```\n")
  found = snippets(page)
  assert [(s.line, s.code.strip(), s.skip) for s in found] == [
      (2, "x = 1", None), (6, "y = 2", "needs a GPU"), (12, "z = 3", None)]
  assert os.path.exists(page)

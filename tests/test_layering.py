"""riemod's parts import each other in one direction only: declare -> measure -> compose -> step
-> certify / conserve / sample -> cli. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "riemod"

# Lower layers first; a part may import its own layer and the layers below, never above.
LAYERS = [
    {"_convolutions", "_tape", "_threads", "_util", "data", "state", "metrics", "nn"},
    {"curvature"},
    {"composer"},
    {"transforms", "linesearch"},
    {"certify", "conservation", "sampling"},
    {"cli"},
]


def _part(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == "riemod" else None


def _imports(path: pathlib.Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
    elif isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
  return found


def _layer(part: str) -> int:
  for i, layer in enumerate(LAYERS):
    if part in layer:
      return i
  raise AssertionError(f"riemod.{part} is in no layer of tests/test_layering.py: place it.")


def test_parts_import_downwards_only():
  bad = []
  for path in sorted(ROOT.rglob("*.py")):
    relative = path.relative_to(ROOT.parent).with_suffix("")
    own = _part(".".join(relative.parts))
    if own is None or own == "__init__":
      continue
    for imported in _imports(path):
      other = _part(imported)
      if other is None or other == own or other == "__init__":
        continue
      if not (ROOT / other).exists() and not (ROOT / f"{other}.py").exists():
        continue  # a name imported from the package itself
      if _layer(other) > _layer(own):
        bad.append(f"{relative} imports riemod.{other}")
  assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
  graph: dict[str, set[str]] = {}
  modules = {}
  for path in ROOT.rglob("*.py"):
    name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    modules[name.removesuffix(".__init__")] = path
  for name, path in modules.items():
    if path.name == "__init__.py":
      continue  # packages re-export their modules; their edges are not dependencies
    graph[name] = {m for m in _imports(path) if m in modules
                   and modules[m].name != "__init__.py" and m != name}
  state: dict[str, int] = {}

  def visit(node, stack):
    state[node] = 1
    for child in graph.get(node, ()):
      if state.get(child) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack + [node, child]))
      if child not in state:
        visit(child, stack + [node])
    state[node] = 2

  for node in graph:
    if node not in state:
      visit(node, [])

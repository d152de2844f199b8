"""The package's layering, read from the source (ast) without importing anything.

(a) Every import between units follows ALLOWED (function-local and TYPE_CHECKING imports included).
(b) The module-level import graph of dsv4_jax/ and pallas_kernels/ has no cycle.

A unit is `pallas_kernels` or the first package below `dsv4_jax` (config, ops, ..., cli).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("dsv4_jax", "pallas_kernels")

# unit -> the other units it may import (a unit may always import itself); "*" means anything.
ALLOWED = {
    "pallas_kernels": set(),
    "config": set(),
    "ops": {"config", "pallas_kernels"},
    "parallel": {"config", "ops"},
    "layers": {"config", "ops", "parallel"},
    "data": {"config"},
    "optim": {"config", "layers"},
    "convert": {"config", "ops", "parallel", "layers"},
    "inference": {"config", "ops", "parallel", "layers"},
    "train": {"config", "ops", "parallel", "layers", "data", "optim"},
    "cli": {"*"},
}
ROOT_PACKAGE = "dsv4_jax"  # the empty top-level __init__: any unit may import it, it imports nothing


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  """Module name -> file, for every .py file of the packages (namespace packages included)."""
  return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = _modules()


def _unit(module: str) -> str | None:
  """The unit of a module of ours; None for third-party modules."""
  parts = module.split(".")
  if parts[0] == "pallas_kernels":
    return "pallas_kernels"
  if parts[0] != ROOT_PACKAGE:
    return None
  return parts[1] if len(parts) > 1 else ROOT_PACKAGE


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: pathlib.Path) -> list[tuple[str, int, bool]]:
  """(imported module of ours, line, executed at import time) for every import in the file.

  `from X import y` imports X.y when that is one of our modules, else X itself. Relative imports are
  resolved against the module's package. Imports inside functions (and under `if TYPE_CHECKING:`)
  are not executed at import time.
  """
  is_package = path.name == "__init__.py"
  found: list[tuple[str, int, bool]] = []

  def resolve(node: ast.ImportFrom) -> str:
    if not node.level:
      return node.module or ""
    base = module.split(".")
    drop = node.level - 1 if is_package else node.level
    assert drop < len(base), f"{path}:{node.lineno}: relative import beyond the top-level package"
    base = base[:len(base) - drop]
    return ".".join(base + ([node.module] if node.module else []))

  def add(target: str, line: int, eager: bool) -> None:
    if _unit(target) is not None:
      found.append((target, line, eager))

  def visit(node: ast.AST, eager: bool) -> None:
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name, node.lineno, eager)
    elif isinstance(node, ast.ImportFrom):
      target = resolve(node)
      for alias in node.names:
        sub = f"{target}.{alias.name}"
        add(sub if sub in MODULES else target, node.lineno, eager)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      eager = False
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      for child in node.body:
        visit(child, False)
      for child in node.orelse:
        visit(child, eager)
      return
    for child in ast.iter_child_nodes(node):
      visit(child, eager)

  visit(ast.parse(path.read_text(), str(path)), True)
  return found


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _where(module: str, line: int) -> str:
  return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_every_module_belongs_to_a_known_unit():
  unknown = sorted({f"{_unit(m)} ({m})" for m in MODULES if _unit(m) not in ALLOWED and m != ROOT_PACKAGE})
  assert not unknown, f"modules outside the layering table (add their unit to ALLOWED): {unknown}"
  assert not IMPORTS[ROOT_PACKAGE], f"dsv4_jax/__init__.py must import nothing of ours: {IMPORTS[ROOT_PACKAGE]}"


def test_cross_unit_imports_follow_the_layering():
  violations = []
  for module, imports in sorted(IMPORTS.items()):
    unit = _unit(module)
    allowed = ALLOWED.get(unit, set())
    for target, line in sorted({(target, line) for target, line, _ in imports}, key=lambda x: (x[1], x[0])):
      other = _unit(target)
      if other in (unit, ROOT_PACKAGE) or "*" in allowed or other in allowed:
        continue
      violations.append(f"{_where(module, line)}: {unit} imports {other} ({module} -> {target}); "
                        f"{unit} may import only {sorted(allowed) or 'nothing of ours'}")
  assert not violations, f"{len(violations)} import(s) break the layering:\n  " + "\n  ".join(violations)


def _first_cycle(graph: dict[str, list[tuple[str, int]]]) -> list[tuple[str, int]] | None:
  """Depth-first search: a cycle as [(module, line of its import of the next)], or None."""
  done: set[str] = set()
  path: list[tuple[str, int]] = []  # the modules being visited, each with the line of its current edge

  def visit(node: str):
    on_path = [m for m, _ in path]
    for target, line in graph[node]:
      if target in on_path:
        return path[on_path.index(target):] + [(node, line)]
      if target not in done:
        path.append((node, line))
        cycle = visit(target)
        path.pop()
        if cycle:
          return cycle
    done.add(node)
    return None

  for node in sorted(graph):
    if node not in done:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_module_level_import_graph_has_no_cycle():
  graph = {module: sorted({(t, line) for t, line, eager in imports if eager and t in MODULES and t != module})
           for module, imports in IMPORTS.items()}
  cycle = _first_cycle(graph)
  assert cycle is None, "module-level import cycle: " + " -> ".join(
      f"{m} ({_where(m, line)})" for m, line in cycle) + f" -> {cycle[0][0]}"


def test_the_scanner_sees_local_and_relative_imports(tmp_path):
  """The scanner itself: function-local, TYPE_CHECKING and relative imports are all found."""
  source = ("from typing import TYPE_CHECKING\nfrom . import model\nfrom ..config import ModelConfig\n"
            "if TYPE_CHECKING:\n  from dsv4_jax.train import loop\n"
            "def f():\n  import dsv4_jax.data.loader\n")
  path = tmp_path / "mod.py"
  path.write_text(source)
  found = _imports("dsv4_jax.layers.mod", path)
  assert found == [("dsv4_jax.layers.model", 2, True), ("dsv4_jax.config", 3, True),
                   ("dsv4_jax.train.loop", 5, False), ("dsv4_jax.data.loader", 7, False)]

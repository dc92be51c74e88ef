"""The package's import graph: no circles, and the entry points that are not training import no training code.

Read from the source (every `import` statement, also inside functions), not by importing: a
module `a.b.c` imported anywhere counts as importing `a.b` and `a` too, since Python runs their
`__init__` first, except from inside `a.b` itself, whose packages are already initialised then.
"""

import ast
import pathlib

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "detr_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO_ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The project modules `path` imports, with the packages each import initialises."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    else:
      continue
    for name in names:
      parts = name.split(".")
      found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
  return found


def import_graph(paths) -> dict[str, set[str]]:
  """{module: the project modules it imports} for the given files (scripts outside the package by file name)."""
  modules = {_module_name(path) for path in PACKAGE.rglob("*.py")}
  graph = {}
  for path in paths:
    name = _module_name(path) if path.is_relative_to(PACKAGE) else path.name
    parts = name.split(".")
    own_packages = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    graph[name] = _imports(path, modules) - own_packages
  return graph


def _cycle(graph) -> list[str]:
  """One import circle of `graph` as a list of module names, or []."""
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for child in sorted(graph.get(node, ())):
      if state.get(child) == "open":
        return stack[stack.index(child):] + [child]
      if child not in state:
        found = visit(child, stack + [child])
        if found:
          return found
    state[node] = "done"
    return []

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [node])
      if found:
        return found
  return []


def _reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for child in graph.get(todo.pop(), ()):
      if child not in seen:
        seen.add(child)
        todo.append(child)
  return seen


def test_no_module_imports_itself_in_a_circle():
  graph = import_graph(PACKAGE.rglob("*.py"))
  assert len(graph) > 30
  assert _cycle(graph) == []


def test_a_circle_would_be_found():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) == []


def test_eval_porting_and_serving_import_no_training_code():
  graph = import_graph([*PACKAGE.rglob("*.py"), REPO_ROOT / "eval.py", REPO_ROOT / "predict.py"])
  for entry in ("eval.py", "predict.py", "detr_jax.eval_cli", "detr_jax.porting.cli", "detr_jax.evaluation",
                "detr_jax.families", "detr_jax.inference", "detr_jax.predict_cli", "detr_jax.export"):
    training_code = sorted(m for m in _reachable(graph, entry) if m.startswith("detr_jax.training"))
    assert training_code == [], (entry, training_code)
  assert "detr_jax.training.loop" in _reachable(graph, "detr_jax.training")   # the check can see training code


def test_readme_layout_names_every_module():
  layout = (REPO_ROOT / "README.md").read_text().split("## Layout", 1)[1]
  modules = [path.relative_to(REPO_ROOT).as_posix() for path in PACKAGE.rglob("*.py")
             if path.name not in ("__init__.py", "__main__.py")]
  assert len(modules) > 25
  assert [m for m in modules if m not in layout] == []

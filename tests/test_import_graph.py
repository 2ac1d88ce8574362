"""cirjax's import graph: no cycle, and no import from a lower layer to a higher one.

`LAYERS` below is the one declaration of the layers (docs/architecture.md draws it, and
`test_architecture_page_draws_the_layers` keeps the two equal): a module may import modules
of its own layer and of the layers before it, never of a layer after it. Every module of
cirjax belongs to exactly one layer.

A cycle or an upward arrow that only a function-local import keeps from failing at import
time still ties the modules together (neither can be read, tested or replaced alone), so
every `import` / `from ... import` statement anywhere in a module counts, except those under
`if TYPE_CHECKING:`. The graph is built from the source with `ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "cirjax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
ARCHITECTURE = ROOT.parent / "docs" / "architecture.md"

# The layers, lowest first. An entry names a package (its modules and subpackages too) or a
# module; the longest entry holding a module decides (`cirjax.eval.encoders`, which turns any
# checkpoint, a training run's included, into features, sits above `train`, the rest of
# `cirjax.eval` below it). The package itself (`cirjax`, whose `load_blip2` / `load_llava`
# call the registry) stands alone, with the entry points.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("errors", ("cirjax.errors", "cirjax.console")),
    ("models", ("cirjax.models", "cirjax.prompts", "cirjax.losses")),
    ("data", ("cirjax.data",)),
    ("convert", ("cirjax.convert", "cirjax.lora")),
    ("eval", ("cirjax.eval",)),
    ("mining", ("cirjax.mining",)),
    ("train", ("cirjax.train",)),
    ("encoders", ("cirjax.eval.encoders", "cirjax.search")),
    ("drivers", ("cirjax.study", "cirjax.study_report", "cirjax.study_stats",
                 "cirjax.benchmarking", "cirjax.bench_load", "cirjax.bench_repeats")),
    ("commands", ("cirjax.commands", "cirjax.cli", "cirjax.__main__", "cirjax")),
)


def module_files(root: Path = ROOT) -> dict[str, Path]:
  """Dotted module name -> file, for every module and package of cirjax."""
  out = {}
  for f in sorted(root.rglob("*.py")):
    parts = list(f.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = f
  return out


def _is_type_checking(node: ast.If) -> bool:
  t = node.test
  return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
      isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
  """Every Import/ImportFrom in the tree, skipping `if TYPE_CHECKING:` bodies."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    if isinstance(node, ast.If) and _is_type_checking(node):
      stack.extend(node.orelse)
      continue
    stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
  """The deepest cirjax module that importing `name` executes last (None: not cirjax)."""
  parts = name.split(".")
  while parts:
    cand = ".".join(parts)
    if cand in modules:
      return cand
    parts.pop()
  return None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
  """Module -> the cirjax modules it imports (top-level and function-local)."""
  modules = module_files(root)
  graph: dict[str, set[str]] = {m: set() for m in modules}
  for mod, path in modules.items():
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in _import_nodes(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      else:
        base = node.module or ""
        if node.level:
          pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
          pkg = pkg[:len(pkg) - (node.level - 1)]
          base = ".".join(pkg + ([base] if base else []))
        # `from a.b import c`: c is a submodule or a name defined in a.b.
        targets = [f"{base}.{a.name}" for a in node.names] if base else []
      for t in targets:
        dst = _resolve(t, modules)
        if dst is not None and dst != mod:
          graph[mod].add(dst)
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (`[a, b, ..., a]`) per strongly connected component with more than one module
  (Tarjan's algorithm, iterative)."""
  index, low, on_stack, stack, sccs = {}, {}, set(), [], []
  counter = [0]
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = counter[0]
    counter[0] += 1
    stack.append(start)
    on_stack.add(start)
    while work:
      node, it = work[-1]
      advanced = False
      for nxt in it:
        if nxt not in index:
          index[nxt] = low[nxt] = counter[0]
          counter[0] += 1
          stack.append(nxt)
          on_stack.add(nxt)
          work.append((nxt, iter(sorted(graph[nxt]))))
          advanced = True
          break
        if nxt in on_stack:
          low[node] = min(low[node], index[nxt])
      if advanced:
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        comp = []
        while True:
          w = stack.pop()
          on_stack.discard(w)
          comp.append(w)
          if w == node:
            break
        if len(comp) > 1:
          sccs.append(sorted(comp))
  return [_cycle_in(graph, comp) for comp in sorted(sccs)]


def _cycle_in(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
  """A shortest cycle through the component's first module (breadth-first)."""
  members, start = set(comp), comp[0]
  prev = {start: None}
  frontier = [start]
  while frontier:
    nxt_frontier = []
    for node in frontier:
      for nxt in sorted(graph[node] & members):
        if nxt == start:
          path = [node]
          while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
          return path[::-1] + [start]
        if nxt not in prev:
          prev[nxt] = node
          nxt_frontier.append(nxt)
    frontier = nxt_frontier
  return comp


def layer_of(module: str, layers=LAYERS) -> int | None:
  """Index in `layers` of the layer holding `module` (the longest matching entry), or None."""
  best, best_len = None, -1
  for i, (_, entries) in enumerate(layers):
    for e in entries:
      hit = module == e or (e != PACKAGE and module.startswith(e + "."))
      if hit and len(e) > best_len:
        best, best_len = i, len(e)
  return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
  """Every edge from a module to a module of a later (higher) layer, named with both layers,
  and every module that no layer holds."""
  out = []
  for mod in sorted(graph):
    src = layer_of(mod, layers)
    if src is None:
      out.append(f"{mod}: in no layer (add it to LAYERS and docs/architecture.md)")
      continue
    for dst in sorted(graph[mod]):
      d = layer_of(dst, layers)
      if d is not None and d > src:
        out.append(f"{mod} ({layers[src][0]}) -> {dst} ({layers[d][0]})")
  return out


def test_graph_sees_local_imports(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from . import a\n")
  (pkg / "sub" / "a.py").write_text("def f():\n  from cirjax.sub import b\n")
  (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nimport cirjax.sub.a\n"
                                    "if TYPE_CHECKING:\n  from cirjax import c\n")
  (pkg / "c.py").write_text("from .sub.b import x\n")
  graph = import_graph(pkg)
  assert graph["cirjax.sub"] == {"cirjax.sub.a"}
  assert graph["cirjax.sub.a"] == {"cirjax.sub.b"}
  assert graph["cirjax.sub.b"] == {"cirjax.sub.a"}  # the TYPE_CHECKING import is not counted
  assert graph["cirjax.c"] == {"cirjax.sub.b"}
  assert find_cycles(graph) == [["cirjax.sub.a", "cirjax.sub.b", "cirjax.sub.a"]]


def test_no_import_cycles():
  cycles = find_cycles(import_graph())
  assert not cycles, "import cycles among cirjax modules:\n" + "\n".join(
      "  " + " -> ".join(c) for c in cycles)


def test_the_layer_rule_names_the_offending_edge(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / "low").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "low" / "__init__.py").write_text("")
  (pkg / "low" / "a.py").write_text("def f():\n  from cirjax import high\n")
  (pkg / "high.py").write_text("from cirjax.low import a\n")
  (pkg / "stray.py").write_text("")
  layers = (("low", ("cirjax.low",)), ("high", ("cirjax.high", "cirjax")))
  assert layer_of("cirjax", layers) == 1 and layer_of("cirjax.low.a", layers) == 0
  assert layer_of("cirjax.stray", layers) is None  # the package entry holds only itself
  assert upward_imports(import_graph(pkg), layers) == [
      "cirjax.low.a (low) -> cirjax.high (high)",
      "cirjax.stray: in no layer (add it to LAYERS and docs/architecture.md)"]


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
  bad = upward_imports(import_graph())
  assert not bad, "imports against the layers (LAYERS, docs/architecture.md):\n" + "\n".join(
      "  " + b for b in bad)


def _drawn_layers(page: str) -> list[tuple[str, tuple[str, ...]]]:
  """The layer table of docs/architecture.md: `| n | name | `module`, ... | ... |` rows."""
  rows = []
  for line in page.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 3 and cells[0].isdigit():
      rows.append((cells[1], tuple(re.findall(r"`([\w.]+)`", cells[2]))))
  return rows


def test_architecture_page_draws_the_layers():
  assert _drawn_layers(ARCHITECTURE.read_text()) == [(n, e) for n, e in LAYERS]

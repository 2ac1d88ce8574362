"""The library's shape rules (docs/architecture.md): no function over 100 lines and no class
over 350 lines, docstrings not counted, unless its docstring starts a line with "Long because"."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cirjax"
LIMITS = {ast.FunctionDef: 100, ast.AsyncFunctionDef: 100, ast.ClassDef: 350}


def _code_lines(node) -> int:
  n = node.end_lineno - node.lineno + 1
  body = node.body
  if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
      and isinstance(body[0].value.value, str):
    n -= body[0].end_lineno - body[0].lineno + 1
  return n


def oversized(root: Path = ROOT) -> list[str]:
  out = []
  for path in sorted(root.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      limit = LIMITS.get(type(node))
      if limit is None or _code_lines(node) <= limit:
        continue
      doc = ast.get_docstring(node) or ""
      if any(line.strip().startswith("Long because") for line in doc.splitlines()):
        continue
      out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}: "
                 f"{_code_lines(node)} lines (limit {limit})")
  return out


def test_no_oversized_functions_or_classes():
  assert not oversized(), "\n".join(oversized())


def test_the_rule_catches_a_long_function(tmp_path):
  body = "\n".join(f"  x{i} = {i}" for i in range(101))
  (tmp_path / "m.py").write_text(f'def f():\n  """Short doc."""\n{body}\n\n\ndef g():\n'
                                 f'  """Long because it is a test.\n\n  Long because: a test."""\n{body}\n')
  found = oversized(tmp_path)
  assert len(found) == 1 and " f: 102 lines" in found[0]

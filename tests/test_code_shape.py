"""The library's shape rules (docs/architecture.md): no module over 600 lines, no task file
(a module of `cirjax/train/` defining a `Task` subclass) over 400, no function over 80 lines
and no class over 350 lines (docstrings not counted), unless a function's or class's
docstring starts a line with "Long because"."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cirjax"
LIMITS = {ast.FunctionDef: 80, ast.AsyncFunctionDef: 80, ast.ClassDef: 350}
MODULE_LINES = 600
TASK_FILE_LINES = 400

# Files over their limit whose shrinking is under way on another branch, with their line
# count today: one may not grow, and an entry whose file is gone or within the limit must be
# removed (the test says so). Not a skip: both files are still checked.
PENDING: dict[str, int] = {}


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


def is_task_file(path: Path, root: Path = ROOT) -> bool:
  """A module under `train/` that defines a class deriving from `Task`."""
  if path.relative_to(root).parts[0] != "train":
    return False
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.ClassDef) and any(
        getattr(b, "id", getattr(b, "attr", None)) == "Task" for b in node.bases):
      return True
  return False


def long_modules(root: Path = ROOT, pending=None) -> list[str]:
  pending = PENDING if pending is None else pending
  out, seen = [], set()
  for path in sorted(root.rglob("*.py")):
    name = str(path.relative_to(root.parent))
    n = len(path.read_text().splitlines())
    limit = TASK_FILE_LINES if is_task_file(path, root) else MODULE_LINES
    if name in pending:
      seen.add(name)
      if n <= limit:
        out.append(f"{name}: {n} lines, within its limit {limit}: remove it from PENDING")
      elif n > pending[name]:
        out.append(f"{name}: {n} lines, grew past its pending {pending[name]} (limit {limit})")
    elif n > limit:
      out.append(f"{name}: {n} lines (limit {limit})")
  out += [f"{name}: gone: remove it from PENDING" for name in sorted(set(pending) - seen)]
  return out


def test_no_oversized_functions_or_classes():
  assert not oversized(), "\n".join(oversized())


def test_no_long_modules_or_task_files():
  assert not long_modules(), "\n".join(long_modules())


def test_the_rule_catches_a_long_function(tmp_path):
  body = "\n".join(f"  x{i} = {i}" for i in range(81))
  (tmp_path / "m.py").write_text(f'def f():\n  """Short doc."""\n{body}\n\n\ndef g():\n'
                                 f'  """Long because it is a test.\n\n  Long because: a test."""\n{body}\n')
  found = oversized(tmp_path)
  assert len(found) == 1 and " f: 82 lines" in found[0]


def test_the_rule_catches_long_modules_and_task_files(tmp_path):
  root = tmp_path / "cirjax"
  (root / "train").mkdir(parents=True)
  (root / "big.py").write_text("x = 1\n" * 601)
  (root / "ok.py").write_text("x = 1\n" * 600)
  task = "from cirjax.train.task import Task\n\n\nclass T(Task):\n  pass\n"
  (root / "train" / "t.py").write_text(task + "x = 1\n" * 396)  # 401 lines
  (root / "train" / "helper.py").write_text("x = 1\n" * 401)  # not a task: module limit
  (root / "train" / "wip.py").write_text(task + "x = 1\n" * 500)
  pending = {"cirjax/train/wip.py": 505, "cirjax/ok.py": 600, "cirjax/gone.py": 700}
  assert long_modules(root, pending) == [
      "cirjax/big.py: 601 lines (limit 600)",
      "cirjax/ok.py: 600 lines, within its limit 600: remove it from PENDING",
      "cirjax/train/t.py: 401 lines (limit 400)",
      "cirjax/gone.py: gone: remove it from PENDING"]
  assert long_modules(root, {**pending, "cirjax/train/wip.py": 504})[-2:] == [
      "cirjax/train/wip.py: 505 lines, grew past its pending 504 (limit 400)",
      "cirjax/gone.py: gone: remove it from PENDING"]

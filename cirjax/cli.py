"""`cirjax` command line: a thin dispatcher over `cirjax.commands.<name>` modules.

Errors: `main` is the one place a command's error becomes output. An error cirjax raises on
purpose (a `cirjax.errors.CirjaxError`) or the operating system's error about a named file
(`errors.describe`) is one `cirjax <command>: error: ...` message and exit status 1 (2 for a
usage error, or the module's `ERROR_EXIT`); anything else is a bug and keeps its traceback.
`--debug` (anywhere on the line) or CIRJAX_DEBUG=1 adds the traceback to expected errors.

`cirjax --help` and `cirjax --version` import no command module (so neither jax nor flax):
the list of commands shows each module's `HELP` line read from its source.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
import traceback

from cirjax import __version__, errors
from cirjax.commands import COMMANDS

DEBUG_FLAG = "--debug"


def _spec(modname: str):
  try:
    return importlib.util.find_spec(modname)
  except ModuleNotFoundError:
    return None


def _available():
  """Yields (name, module spec) for every command whose module is present."""
  for name, modname in COMMANDS.items():
    spec = _spec(modname)
    if spec is not None:
      yield name, spec


def command_help(spec) -> str:
  """A command module's `HELP = "..."` line, read from its source without importing it."""
  try:
    with open(spec.origin, encoding="utf-8") as f:
      tree = ast.parse(f.read(), spec.origin)
  except (OSError, SyntaxError, TypeError) as e:
    return f"(unavailable: {type(e).__name__}: {e})"
  for node in tree.body:
    if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HELP" for t in node.targets)
        and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
      return node.value.value
  return ""


def build_parser(only: str | None = None):
  """The parser. With `only`, imports just that command's module, so one command's heavy or
  broken dependencies never stand in the way of another; without, imports none (`--help`)."""
  parser = argparse.ArgumentParser(
      prog="cirjax",
      description="Composed Image Retrieval in JAX: convert weights, check parity, "
      "make data, train, evaluate, search and benchmark.",
      epilog="Exit status: 0 success, 1 an error (one 'cirjax COMMAND: error:' line naming "
      "the file, key or value), 2 a usage error; a command may add its own (see its --help). "
      "--debug or CIRJAX_DEBUG=1 prints the traceback of an error too.")
  parser.add_argument("--version", action="version", version=f"cirjax {__version__}")
  parser.add_argument(DEBUG_FLAG, action="store_true",
                      help="print the traceback of an error (also: CIRJAX_DEBUG=1)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, spec in _available():
    if name != only:
      sub.add_parser(name, help=command_help(spec) if only is None else argparse.SUPPRESS)
      continue
    mod = importlib.import_module(spec.name)
    p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run, _error_exit=getattr(mod, "ERROR_EXIT", None))
  return parser


def _pop_debug(argv: list[str]) -> tuple[bool, list[str]]:
  """`--debug` may stand anywhere before a `--` (a global flag, not one per command)."""
  end = argv.index("--") if "--" in argv else len(argv)
  head = [a for a in argv[:end] if a != DEBUG_FLAG]
  return len(head) < end, head + argv[end:]


def report_error(exc: BaseException, command: str | None, exit_status: int | None = None,
                 debug: bool = False) -> int | None:
  """Prints an expected error as `cirjax <command>: error: ...` and returns its exit
  status; None for an unexpected one (a bug: the caller re-raises it)."""
  found = errors.describe(exc)
  if found is None:
    return None
  msg, status = found
  if debug:
    traceback.print_exception(exc)
  prog = f"cirjax {command}" if command else "cirjax"
  print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
  return exit_status if exit_status is not None and status == 1 else status


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  debug, argv = _pop_debug(argv)
  debug = errors.debug_enabled(debug)
  only = argv[0] if argv and argv[0] in COMMANDS else None
  try:
    parser = build_parser(only)
  except Exception as e:  # pylint: disable=broad-except  (an import of the command's module)
    status = report_error(e, only, debug=debug)
    if status is None:
      raise
    return status
  args = parser.parse_args(argv)
  if getattr(args, "_run", None) is None:
    parser.print_help()
    return 2
  # `cirjax data check: error: ...`: a command's action (`data_command`) is part of its name.
  command = " ".join([args.command] + [v for k, v in sorted(vars(args).items())
                                       if k.endswith("_command") and isinstance(v, str)])
  try:
    return int(args._run(args) or 0)
  except Exception as e:  # pylint: disable=broad-except  (bugs are re-raised below)
    status = report_error(e, command, args._error_exit, debug)
    if status is None:
      raise
    return status


if __name__ == "__main__":
  sys.exit(main())

"""`cirjax` command line: a thin dispatcher over `cirjax.commands.<name>` modules.

Errors: `main` is the one place a command's error becomes output. An expected error (a
`cirjax.errors.CirjaxError`, an OS error naming a file, or one of the command module's
`EXPECTED_ERRORS`) is one `cirjax <command>: error: ...` message and exit status 1 (2 for a
usage error, or the module's `ERROR_EXIT`); anything else is a bug and keeps its traceback.
`--debug` (anywhere on the line) or CIRJAX_DEBUG=1 adds the traceback to expected errors.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback

from cirjax import errors
from cirjax.commands import COMMANDS

DEBUG_FLAG = "--debug"


def _available():
  """Yields (name, module) for every command whose module is present."""
  for name, modname in COMMANDS.items():
    try:
      spec = importlib.util.find_spec(modname)
    except ModuleNotFoundError:
      spec = None
    if spec is not None:
      yield name, modname


def build_parser(only: str | None = None):
  """The parser; with `only`, imports just that command's module, so one command's heavy or
  broken dependencies never stand in the way of another."""
  parser = argparse.ArgumentParser(
      prog="cirjax",
      description="Composed Image Retrieval in JAX: convert weights, check parity, "
      "make data, train, evaluate, search and benchmark.",
      epilog="Exit status: 0 success, 1 an error (one 'error:' line naming the file, key or "
      "value), 2 a usage error; a command may add its own (see its --help). --debug or "
      "CIRJAX_DEBUG=1 prints the traceback of an error too.")
  parser.add_argument(DEBUG_FLAG, action="store_true",
                      help="print the traceback of an error (also: CIRJAX_DEBUG=1)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, modname in _available():
    if only is not None and name != only:
      sub.add_parser(name, help=argparse.SUPPRESS)
      continue
    try:
      mod = importlib.import_module(modname)
    except Exception as e:  # pylint: disable=broad-except
      if only is not None:
        raise
      sub.add_parser(name, help=f"(unavailable: {type(e).__name__}: {e})")
      continue
    p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run, _expected=tuple(getattr(mod, "EXPECTED_ERRORS", ())),
                   _error_exit=getattr(mod, "ERROR_EXIT", None))
  return parser


def _pop_debug(argv: list[str]) -> tuple[bool, list[str]]:
  """`--debug` may stand anywhere before a `--` (a global flag, not one per command)."""
  end = argv.index("--") if "--" in argv else len(argv)
  head = [a for a in argv[:end] if a != DEBUG_FLAG]
  return len(head) < end, head + argv[end:]


def report_error(exc: BaseException, command: str | None, expected: tuple = (),
                 exit_status: int | None = None, debug: bool = False) -> int | None:
  """Prints an expected error as `cirjax <command>: error: ...` and returns its exit
  status; None for an unexpected one (a bug: the caller re-raises it)."""
  found = errors.describe(exc)
  if found is None and expected and isinstance(exc, expected):
    found = str(exc), 1
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
  parser = build_parser(only)
  args = parser.parse_args(argv)
  if getattr(args, "_run", None) is None:
    parser.print_help()
    return 2
  try:
    return int(args._run(args) or 0)
  except Exception as e:  # pylint: disable=broad-except  (bugs are re-raised below)
    status = report_error(e, args.command, args._expected, args._error_exit, debug)
    if status is None:
      raise
    return status


if __name__ == "__main__":
  sys.exit(main())

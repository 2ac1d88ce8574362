"""`cirjax` command line: a thin dispatcher over `cirjax.commands.<name>` modules."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from cirjax.commands import COMMANDS


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
      "make data, train, evaluate, search and benchmark.")
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
    p.set_defaults(_run=mod.run)
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  only = argv[0] if argv and argv[0] in COMMANDS else None
  parser = build_parser(only)
  args = parser.parse_args(argv)
  if getattr(args, "_run", None) is None:
    parser.print_help()
    return 2
  return int(args._run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())

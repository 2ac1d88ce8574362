"""`cirjax` command line: a thin dispatcher over `cirjax.commands.<name>` modules."""

import argparse
import importlib
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


def build_parser():
  parser = argparse.ArgumentParser(
      prog="cirjax",
      description="Composed Image Retrieval in JAX: convert weights, check parity, "
      "make data, train, evaluate, search and benchmark.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, modname in _available():
    mod = importlib.import_module(modname)
    p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)
  return parser


def main(argv=None):
  parser = build_parser()
  args = parser.parse_args(argv)
  if getattr(args, "_run", None) is None:
    parser.print_help()
    return 2
  return int(args._run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())

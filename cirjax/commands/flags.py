"""Renamed command-line options: the old spelling still works for one release, with a line.

Every command spells its options the same way (`--num-processes`, `--num-workers`,
`--batch-size`, `--max-length`; `--out` is a directory, a file option is named for what it
holds, `--json`, `--html`). An option renamed to follow that keeps its old spelling, hidden
from `--help`, until the release after next: using it prints
`cirjax <cmd>: warning: --old is deprecated; use --new (...)` on stderr and does what the new
spelling does. `RENAMED` lists them (docs: README "Commands").
"""

from __future__ import annotations

import argparse
import sys

# Old spelling -> new spelling, by command (what README and the tests list).
RENAMED = {
    "train": {"--num_processes": "--num-processes", "--process_id": "--process-id",
              "--cpu_devices": "--cpu-devices"},
    "data check": {"--workers": "--num-workers"},
    "parity": {"--batch": "--batch-size", "--text-len": "--max-length"},
    "eval": {"--out": "--json"},
}
REMOVED_IN = "0.3.0"


class _OldSpelling(argparse.Action):
  """Stores the value like the new option and says the spelling is deprecated."""

  def __init__(self, option_strings, dest, new: str = "", **kwargs):
    self.new = new
    super().__init__(option_strings, dest, **kwargs)

  def __call__(self, parser, namespace, values, option_string=None):
    print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new} (the old "
          f"spelling goes in cirjax {REMOVED_IN})", file=sys.stderr, flush=True)
    setattr(namespace, self.dest, values)


def add_renamed(parser: argparse.ArgumentParser, new: str, old: str, **kwargs) -> None:
  """`parser.add_argument(new, **kwargs)` plus `old` as a hidden deprecated spelling of it."""
  action = parser.add_argument(new, **kwargs)
  kw = {k: v for k, v in kwargs.items() if k in ("type", "choices", "nargs", "metavar")}
  parser.add_argument(old, dest=action.dest, action=_OldSpelling, new=new,
                      default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)

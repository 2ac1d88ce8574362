"""One module per `cirjax` subcommand.

Each module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
The CLI imports a module only when its command is run, so `cirjax --help` stays fast and
a command's heavy dependencies (torch for `parity`) are not needed by the others; `cirjax
--help` reads each module's `HELP` line from its source and imports none. `flags.py` (the
renamed options' old spellings) is a helper, not a command.
"""

# name -> (module, one-line help). Order is the order shown by `cirjax --help`.
COMMANDS = {
    "convert": "cirjax.commands.convert",
    "parity": "cirjax.commands.parity",
    "data": "cirjax.commands.data",
    "eval": "cirjax.commands.eval",
    "search": "cirjax.commands.search",
    "train": "cirjax.commands.train",
    "bench": "cirjax.commands.bench",
    "mine": "cirjax.commands.mine",
    "study": "cirjax.commands.study",
}

"""The errors a user can cause, and how `cirjax` reports them.

Library code raises a `CirjaxError` (or a subclass) for bad input it can name: a file, a key
or a value, and what to do about it. The CLI (`cirjax.cli.main`) prints the message as
`cirjax <command>: error: <message>` and exits with the error's `exit_code`: 1, or 2 for a
`UsageError` (a bad argument or config, as argparse does). The domain errors of each layer
(`DataError`, `ConfigError`, `WeightFileError`, `KeyAccountingError`, ...) subclass both
`CirjaxError` and `ValueError`, so code that catches `ValueError` keeps working.

`describe(exc)` also turns the operating system's and the decoders' errors about a named file
(not found, a directory where a file was expected, permission denied, undecodable text) into
one such line. Every other exception is a bug and keeps its traceback; `--debug` or
`CIRJAX_DEBUG=1` shows the traceback of expected errors too.

This module imports nothing from cirjax (every layer may raise its errors).
"""

from __future__ import annotations

import errno
import json
import os


class CirjaxError(Exception):
  """Bad input the user can fix; the message names the file, key or value at fault."""
  exit_code = 1


class UsageError(CirjaxError):
  """A bad command-line argument or config value (exit status 2, as argparse's)."""
  exit_code = 2


class ConfigError(UsageError, ValueError):
  """A config file, variant, override or config value that cannot be used; the message says
  which (a ValueError too, for code that catches those)."""


class MissingDependencyError(CirjaxError):
  """An optional package a command needs is not installed; the message names the extra."""


_OS_WHAT = {
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory (a path component is a file)",
    errno.EISDIR: "is a directory, expected a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EEXIST: "already exists",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
}


def debug_enabled(flag: bool = False) -> bool:
  """`--debug` given, or CIRJAX_DEBUG set to anything but '', '0' or 'false'."""
  env = os.environ.get("CIRJAX_DEBUG", "").strip().lower()
  return flag or env not in ("", "0", "false", "no")


def describe(exc: BaseException) -> tuple[str, int] | None:
  """(one-line message, exit status) for an expected error, else None (a bug)."""
  if isinstance(exc, CirjaxError):
    return str(exc), exc.exit_code
  if isinstance(exc, OSError) and exc.filename is not None:
    what = _OS_WHAT.get(exc.errno, exc.strerror or type(exc).__name__)
    where = str(exc.filename)
    if exc.filename2 is not None:
      where += f" -> {exc.filename2}"
    return f"{where}: {what}", 1
  if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                      PermissionError, FileExistsError)):
    return str(exc), 1  # raised by cirjax with a message that names the path
  if isinstance(exc, json.JSONDecodeError):
    return f"invalid JSON ({exc}); the file at fault is named in the traceback (--debug)", 1
  if isinstance(exc, UnicodeDecodeError):
    return (f"a file is not valid {exc.encoding} text ({exc.reason} at byte {exc.start}); "
            "the file at fault is named in the traceback (--debug)"), 1
  return None

"""One builder at a time: an exclusive file lock that makes concurrent builders of one store
wait for the first.

Two runs (or a run and `cirjax data tfds`) that build the same store in one shared
directory would otherwise both write it. `build_lock(path)` takes an exclusive `flock` on
`path` (created if missing, never deleted: removing a lock file while another process
waits on it would let a third one in), blocking until the holder releases it; the waiting
builder then finds the finished store and opens it instead of building. The holder writes
its host, pid and start time into the file so that a waiting one can say whom it waits for.
The kernel releases the lock when its holder exits, killed or not, so a crashed builder
never blocks the next one; its half-written temporary files are the builders' to clean.

Linux emulates `flock` on NFS with POSIX byte-range locks, so the lock holds across the
machines of a cluster sharing an NFS directory; Lustre needs its `flock` mount option
(without it `flock` fails, and the error names the file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from cirjax.errors import CirjaxError

# How often a waiting builder says it is still waiting.
REPORT_EVERY_S = 60.0
_POLL_S = 0.2


class LockError(CirjaxError, OSError):
  """The file system refused the lock (e.g. Lustre mounted without `flock`)."""


def holder(path: str | os.PathLike) -> str:
  """What the lock file says about its holder ("" when unreadable or empty)."""
  try:
    return Path(path).read_text().strip()
  except OSError:
    return ""


@contextlib.contextmanager
def build_lock(path: str | os.PathLike, what: str = "store",
               log: Callable[[str], None] | None = None) -> Iterator[float]:
  """Holds an exclusive lock on `path` for the block; yields the seconds spent waiting."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  t0 = time.perf_counter()
  try:
    reported = None
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise LockError(f"{path}: cannot lock it for the {what} build ({e.strerror}); on "
                          "Lustre mount with -o flock") from None
      now = time.perf_counter()
      if log is not None and (reported is None or now - reported >= REPORT_EVERY_S):
        log(f"waiting for another build of the {what}: {path} is held by "
            f"{holder(path) or 'another process'}")
        reported = now
      time.sleep(_POLL_S)
    waited = time.perf_counter() - t0
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
    if log is not None and reported is not None:
      log(f"{path}: the other build is done (waited {waited:.1f}s)")
    try:
      yield waited
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)

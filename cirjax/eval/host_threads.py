"""The host threads retrieval's NumPy work runs on (placing features for the CPU devices,
ranking scores on the host path). NumPy releases the GIL inside its loops, so pieces of one
array run in parallel; the pool is kept, since starting threads per call cost as much as
ranking a 256-row score block."""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


def count() -> int:
  """Threads to split host work over: one per core this process may run on, at most 4."""
  return min(4, len(os.sched_getaffinity(0)))


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="cirjax-host")


def run(fn: Callable[..., T], items: Iterable) -> list[T]:
  """`[fn(x) for x in items]`, on up to `count()` threads."""
  items = list(items)
  if len(items) <= 1 or count() == 1:
    return [fn(x) for x in items]
  return list(_pool(count()).map(fn, items))

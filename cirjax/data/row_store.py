"""The store engine: a file of fixed-shape rows, computed once per machine and mapped by
every process. Both the frozen-feature store (`cirjax.train.feature_store`: the ViT output
of every image) and the pixel store (`cirjax.data.pixel_store`: every image's preprocessed
uint8 pixels) are stores of this one engine.

* Layout: `<directory>/<kind>_<key[:24]>.bin` holds the rows (raw, C order) and
  `<kind>_<key[:24]>.json`, its sidecar, the kind, key, shape, dtype, SHA-256 of the data
  and build facts. Every process maps the file read-only, the kernel's page cache holds it
  once per machine, and `store[rows]` copies out only the rows asked for.
* Identity: the caller's `key` (a SHA-256 of whatever changes the rows). A changed key
  builds a new store; with `drop_stale` the other stores of the same kind in the directory
  (and temporary files of builds that died) are deleted once the new one is published.
* Integrity: the data is written under a temporary name and renamed when complete; the
  sidecar, written last (also by rename), records the data's SHA-256, checked (`verify`)
  when a store is opened. A truncated or altered file is reported and rebuilt, never used.
* Building: `fill(rows, lo, hi)` writes rows `lo:hi` into the open file. With several
  processes each fills its contiguous share (`share`); they must all see the same
  directory (e.g. the workdir on a shared file system). Process 0 decides whether to build,
  checks the free space, creates the file, checksums and publishes it, with a barrier
  between the phases; every process takes process 0's key and decisions.
* Concurrent builders: process 0 holds `<directory>/.<kind>.lock` (`cirjax.data.build_lock`)
  from its decision to the publication, so a second run building a store of the same kind
  in the same directory waits, then opens the finished store (or builds its own key's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np

from cirjax import console
from cirjax.data import build_lock
from cirjax.errors import CirjaxError

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float32": np.dtype(np.float32), "uint8": np.dtype(np.uint8)}
FORMAT = 1
_CHUNK = 64 << 20
# Free space kept beyond a new store's size (logs, checkpoints, the page cache's writeback).
SPACE_MARGIN = 1 << 30


class StoreError(CirjaxError, ValueError):
  """A store on disk that cannot be used (damaged, incomplete or for other rows)."""


class NoSpaceError(StoreError):
  """The directory lacks the free space a new store needs."""


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
  """Process 0's answer, on every process (so all take the same branch)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _agree_key(key: str) -> str:
  """Process 0's key on every process: one file, even if a process computed another key
  (e.g. a copy of the data with other modification times)."""
  if jax.process_count() == 1:
    return key
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(bytes.fromhex(key), np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw), np.uint8)).hex()


def share(n: int, processes: int, index: int) -> tuple[int, int]:
  """Rows `lo:hi` of `n` that process `index` of `processes` builds (contiguous, in order)."""
  return n * index // processes, n * (index + 1) // processes


def file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def json_sha256(value: Any) -> str:
  """SHA-256 of a JSON-able description (sorted keys; anything else by str)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def store_dtype(name: str) -> np.dtype:
  if str(name) not in DTYPES:
    raise ValueError(f"store dtype {name!r}: use one of {tuple(DTYPES)}")
  return DTYPES[str(name)]


class RowStore:
  """A read-only view of a published store: `store[rows]` gathers rows into a new array."""

  label = "store"

  def __init__(self, path: Path, meta: dict):
    self.path, self.meta = Path(path), meta
    self.shape = tuple(int(s) for s in meta["shape"])
    self.dtype = store_dtype(meta["dtype"])
    self._rows = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * self.dtype.itemsize

  @property
  def built(self) -> bool:
    """Whether this run built the store (False: a valid one was reused)."""
    return bool(self.meta.get("built_now", False))

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, rows) -> np.ndarray:
    return np.asarray(self._rows[np.asarray(rows)])

  def describe(self) -> str:
    return (f"{self.label} {self.shape} {self.dtype.name}, {self.nbytes / 2**20:.0f} MiB "
            f"at {self.path} (memory-mapped, shared by the processes of this machine)")


def paths(directory: Path, kind: str, key: str) -> tuple[Path, Path]:
  stem = Path(directory) / f"{kind}_{key[:24]}"
  return stem.with_suffix(".bin"), stem.with_suffix(".json")


def nbytes_of(shape: tuple, dtype: str) -> int:
  return int(np.prod(shape)) * store_dtype(dtype).itemsize


def check(directory: str | os.PathLike, kind: str, key: str, shape: tuple, dtype: str,
          verify: bool = True) -> dict:
  """The sidecar of a valid store for `key`; StoreError naming what is wrong otherwise
  (FileNotFoundError when there is none)."""
  data, side = paths(Path(directory), kind, key)
  if not side.is_file():
    raise FileNotFoundError(side)
  try:
    meta = json.loads(side.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise StoreError(f"{side}: unreadable sidecar ({e})") from None
  want = {"format": FORMAT, "key": key, "shape": list(shape), "dtype": str(dtype)}
  bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
  if bad:
    raise StoreError(f"{side}: " + ", ".join(f"{k} is {a!r}, expected {b!r}"
                                              for k, (a, b) in bad.items()))
  size = nbytes_of(shape, dtype)
  if not data.is_file() or data.stat().st_size != size:
    got = data.stat().st_size if data.is_file() else "missing"
    raise StoreError(f"{data}: {got} bytes, expected {size} (truncated or incomplete)")
  if verify and file_sha256(data) != meta.get("sha256"):
    raise StoreError(f"{data}: checksum mismatch (the file was altered after it was written)")
  return meta


log_line = console.log  # the stores' log lines


class BuildProgress:
  """`progress(done)` during a build: a log line every `every_s` seconds (and at the end)
  with rows done, rows/s and the time left, so a build of tens of minutes (CIRR's feature
  store on CPU) is not silent. Each process reports its own share."""

  def __init__(self, what: str, total: int, log: Callable[[str], None] = log_line,
               every_s: float = 30.0):
    self.what, self.total, self.log, self.every_s = what, int(total), log, float(every_s)
    self.t0 = self.last = time.perf_counter()

  def __call__(self, done: int) -> None:
    now = time.perf_counter()
    if now - self.last < self.every_s and done < self.total:
      return
    self.last = now
    rate = done / max(now - self.t0, 1e-9)
    left = (self.total - done) / rate if rate > 0 else float("inf")
    self.log(f"{self.what}: {done}/{self.total} rows ({rate:.1f}/s, about {left:.0f} s left)"
             if done < self.total else f"{self.what}: {done}/{self.total} rows in "
             f"{now - self.t0:.0f} s ({rate:.1f}/s)")


def _publish(directory: Path, kind: str, key: str, shape: tuple, dtype: str, tmp: Path,
             extra: dict, drop_stale: bool) -> None:
  data, side = paths(directory, kind, key)
  meta = {"format": FORMAT, "kind": kind, "key": key, "shape": list(shape),
          "dtype": str(dtype), "sha256": file_sha256(tmp),
          "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
  os.replace(tmp, data)
  side_tmp = side.with_suffix(".json.tmp")
  side_tmp.write_text(json.dumps(meta, indent=1))
  os.replace(side_tmp, side)
  if drop_stale:  # stores of other keys, and temporary files of builds that died
    for old in list(directory.glob(f"{kind}_*")) + list(directory.glob(f".{kind}_*.tmp")):
      if old not in (data, side):
        old.unlink(missing_ok=True)


def _usable(directory: Path, kind: str, key: str, shape: tuple, dtype: str, verify: bool,
            log: Callable[[str], None], what: str) -> bool:
  try:
    check(directory, kind, key, shape, dtype, verify)
    return True
  except FileNotFoundError:
    return False
  except StoreError as e:
    log(f"{what} not usable, rebuilding it: {e}")
    for p in paths(directory, kind, key):  # never used again; its space goes to the new one
      p.unlink(missing_ok=True)
    return False


def _space_error(directory: Path, need: int) -> str:
  free = shutil.disk_usage(directory).free
  if free >= need + SPACE_MARGIN:
    return ""
  return (f"{directory}: {free / 2**30:.1f} GiB free, a new store needs {need / 2**30:.1f} GiB "
          f"(+{SPACE_MARGIN / 2**30:.0f} GiB margin)")


def open_or_build(directory: str | os.PathLike, kind: str, key: str, shape: tuple, dtype: str,
                  fill: Callable[[np.ndarray, int, int], None], *, verify: bool = True,
                  extra: dict | None = None, log: Callable[[str], None] | None = None,
                  drop_stale: bool = True, what: str = "store", cls: type = RowStore
                  ) -> RowStore:
  """The store for `key` in `directory`: opened if a valid one is there, else built.

  `fill(rows, lo, hi)` must write rows `lo:hi` into `rows` (a writable memory map of the
  whole store); each process is asked for its contiguous share. A build that lacks the free
  space raises NoSpaceError (on every process) before anything is written.
  """
  log = log or log_line
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  shape = tuple(int(s) for s in shape)
  if not shape or shape[0] < 1:
    raise ValueError(f"a {what} needs at least one row, got shape {shape}")
  np_dtype = store_dtype(dtype)
  key = _agree_key(key)
  # Another run building this kind of store in this directory: wait for it, then (usually)
  # open what it built. Process 0 decides for its run, so it alone takes the lock.
  lock = (build_lock.build_lock(directory / f".{kind}.lock", what, log)
          if jax.process_index() == 0 else contextlib.nullcontext())
  with lock:
    ok = jax.process_index() == 0 and _usable(directory, kind, key, shape, dtype, verify, log,
                                              what)
    built = False
    if not agree(ok):
      space = (_space_error(directory, nbytes_of(shape, dtype)) if jax.process_index() == 0
               else "")
      if not agree(not space):
        raise NoSpaceError(space or f"{directory}: not enough free space for the {what} "
                           "(reported by process 0)")
      t0 = time.perf_counter()
      tmp = directory / f".{kind}_{key[:24]}.bin.tmp"
      if jax.process_index() == 0:
        np.memmap(tmp, dtype=np_dtype, mode="w+", shape=shape).flush()
      barrier(f"{kind}_store_created")
      rows = np.memmap(tmp, dtype=np_dtype, mode="r+", shape=shape)
      lo, hi = share(shape[0], jax.process_count(), jax.process_index())
      if hi > lo:
        fill(rows, lo, hi)
      rows.flush()
      del rows
      barrier(f"{kind}_store_filled")
      if jax.process_index() == 0:
        _publish(directory, kind, key, shape, dtype, tmp,
                 {**(extra or {}), "build_s": round(time.perf_counter() - t0, 3)}, drop_stale)
      barrier(f"{kind}_store_published")
      built = True
    # Opened under the lock, before a build of another key may drop it (drop_stale).
    data, side = paths(directory, kind, key)
    return cls(data, {**json.loads(side.read_text()), "built_now": built})

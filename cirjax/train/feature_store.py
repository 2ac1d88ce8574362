"""The frozen-feature store: the ViT output of every image of a run, once per machine.

QuRe freezes the vision tower, so its output for an image never changes during a run. The
store holds it for every training and evaluation image in one memory-mapped file (raw rows,
C order; shape, dtype and checksum in a JSON sidecar) instead of an array on each process's
heap: every process of a machine maps the same file, the kernel's page cache holds it once,
and a step reads only its batch's rows (`store[rows]`).

* Precision: float16 by default, what the reference's frozen fp16 ViT hands the Q-Former;
  bfloat16 and float32 on request (`config.qure.feature_dtype`).
* Identity: the file name carries a hash (`store_key`) of the vision parameters and of
  everything else that changes the features (model shape, preprocessing, image list,
  precision). A resumed run finds its store and reuses it; a changed model or image list
  gets a new key, builds a new store and deletes the stale ones in the directory.
* Integrity: the file is written under a temporary name and renamed when complete; the
  sidecar, written last (also by rename), records the SHA-256 of the data, which is checked
  when a store is opened. A truncated or altered file is reported and rebuilt, never used.
* Building: the caller's `fill(rows, lo, hi)` writes rows `lo:hi` into the open file. With
  several processes each one fills its contiguous share of the rows (they must all see the
  same directory, e.g. the workdir on a shared file system); process 0 creates the file,
  checksums it and publishes it, with a barrier between the phases.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float32": np.dtype(np.float32)}
FORMAT = 1
_CHUNK = 64 << 20


class StoreError(ValueError):
  """A store on disk that cannot be used (damaged, incomplete or for another model)."""


def storage_dtype(name: str) -> np.dtype:
  """The numpy dtype of a store precision name; a clear error for anything else."""
  if str(name) not in DTYPES:
    raise ValueError(f"config.qure.feature_dtype={name!r}: use one of {tuple(DTYPES)}")
  return DTYPES[str(name)]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _agree(flag: bool) -> bool:
  """Process 0's answer, on every process (so all take the same branch)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def store_key(host_params: Any, spec: dict) -> str:
  """SHA-256 of every array of `host_params` (path, dtype, shape, bytes) and of `spec` (a
  JSON-able description of the preprocessing, model shape, image list and precision)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(host_params):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}".encode())
    h.update(a.view(np.uint8).reshape(-1).data)
  h.update(json.dumps(spec, sort_keys=True, default=str).encode())
  return h.hexdigest()


def file_sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


class FeatureStore:
  """A read-only view of a published store: `store[rows]` gathers rows into a new array."""

  def __init__(self, path: Path, meta: dict):
    self.path, self.meta = Path(path), meta
    self.shape = tuple(int(s) for s in meta["shape"])
    self.dtype = storage_dtype(meta["dtype"])
    self._rows = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, rows) -> np.ndarray:
    return np.asarray(self._rows[np.asarray(rows)])

  def describe(self) -> str:
    return (f"feature store {self.shape} {self.dtype.name}, {self.nbytes / 2**20:.0f} MiB "
            f"at {self.path} (memory-mapped, shared by the processes of this machine)")


def _paths(directory: Path, key: str) -> tuple[Path, Path]:
  stem = directory / f"vision_{key[:24]}"
  return stem.with_suffix(".bin"), stem.with_suffix(".json")


def check(directory: str | os.PathLike, key: str, shape: tuple, dtype: str,
          verify: bool = True) -> dict:
  """The sidecar of a valid store for `key`; StoreError naming what is wrong otherwise
  (FileNotFoundError when there is none)."""
  data, side = _paths(Path(directory), key)
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
  size = int(np.prod(shape)) * storage_dtype(dtype).itemsize
  if not data.is_file() or data.stat().st_size != size:
    got = data.stat().st_size if data.is_file() else "missing"
    raise StoreError(f"{data}: {got} bytes, expected {size} (truncated or incomplete)")
  if verify and file_sha256(data) != meta.get("sha256"):
    raise StoreError(f"{data}: checksum mismatch (the file was altered after it was written)")
  return meta


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[cirjax] {msg}", file=sys.stderr, flush=True)


def _publish(directory: Path, key: str, shape: tuple, dtype: str, tmp: Path, extra: dict
             ) -> None:
  data, side = _paths(directory, key)
  meta = {"format": FORMAT, "key": key, "shape": list(shape), "dtype": str(dtype),
          "sha256": file_sha256(tmp), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
  os.replace(tmp, data)
  side_tmp = side.with_suffix(".json.tmp")
  side_tmp.write_text(json.dumps(meta, indent=1))
  os.replace(side_tmp, side)
  # Stale stores of other models or image lists, and temporary files of builds that died.
  for old in list(directory.glob("vision_*")) + list(directory.glob(".vision_*.tmp")):
    if old not in (data, side):
      old.unlink(missing_ok=True)


def open_or_build(directory: str | os.PathLike, key: str, shape: tuple, dtype: str,
                  fill: Callable[[np.ndarray, int, int], None], *, verify: bool = True,
                  extra: dict | None = None, log: Callable[[str], None] = _log) -> FeatureStore:
  """The store for `key` in `directory`: opened if a valid one is there, else built.

  `fill(rows, lo, hi)` must write rows `lo:hi` of the features into `rows` (a writable
  memory map of the whole store); each process is asked for its contiguous share.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  shape = tuple(int(s) for s in shape)
  storage_dtype(dtype)
  ok = False
  if jax.process_index() == 0:
    try:
      check(directory, key, shape, dtype, verify)
      ok = True
    except FileNotFoundError:
      pass
    except StoreError as e:
      log(f"feature store not usable, rebuilding it: {e}")
  if not _agree(ok):
    t0 = time.perf_counter()
    tmp = directory / f".vision_{key[:24]}.bin.tmp"
    if jax.process_index() == 0:
      np.memmap(tmp, dtype=DTYPES[dtype], mode="w+", shape=shape).flush()
    _barrier("feature_store_created")
    rows = np.memmap(tmp, dtype=DTYPES[dtype], mode="r+", shape=shape)
    n, p, i = shape[0], jax.process_count(), jax.process_index()
    lo, hi = n * i // p, n * (i + 1) // p
    if hi > lo:
      fill(rows, lo, hi)
    rows.flush()
    del rows
    _barrier("feature_store_filled")
    if jax.process_index() == 0:
      _publish(directory, key, shape, dtype, tmp,
               {**(extra or {}), "build_s": round(time.perf_counter() - t0, 3)})
    _barrier("feature_store_published")
  data, side = _paths(directory, key)
  return FeatureStore(data, json.loads(side.read_text()))

"""The pixel store: every image's preprocessed pixels, decoded once per machine.

A training run that feeds pixels to its model (QuRe with the ViT trained or without the
feature cache, InstructCIR) reads each image many times: every epoch, every mining round,
every evaluation. The preprocessing (`images.Transform`: decode, pad, bicubic resize, centre
crop) is deterministic, so its uint8 result is computed once into a store of the engine in
`cirjax.data.row_store` (kind `pixels`: one memory-mapped file, atomic publish, SHA-256
sidecar checked on open, parallel build by process share, stale and damaged stores rebuilt)
and a batch gathers its rows and normalises them (`images.normalize_pixels`), which gives
the same float32 bits as decoding. At 224 px a row is 150 KB: CIRR's 19,236 training and
validation images 2.8 GiB, FashionIQ's 62k 8.7 GiB, on disk and in the page cache once per
machine instead of a decode per image per use.

* Identity (`store_key`): the transform's name and size and, per image in row order, its
  name, its reference (path, crop box) and its file's size and modification time (ns). A
  changed, replaced or touched image file, another image list or another transform gives a
  new key and a new store; reading every file's bytes to hash them would cost as much I/O
  as decoding, and a file rewritten with the same size and a restored modification time is
  the one change it misses.
* Modes (`config.data.pixel_store`): `auto` (default) uses a store when the run reads its
  images at least twice on average (`wanted`) and the directory has the space (else it
  decodes, and says so); `on` always (a clear error when the space is missing); `off`
  never.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cirjax.data import images as images_lib
from cirjax.data import row_store
from cirjax.data.records import DataError, ImageRef
from cirjax.errors import UsageError

KIND = "pixels"
MODES = ("auto", "on", "off")
# 'auto' builds a store when images are read at least this many times on average: building
# decodes each once, so below that the loader's overlapped decoding costs no more.
AUTO_MIN_READS = 2.0


class PixelStoreConfigError(UsageError, ValueError):
  """A bad `data.pixel_store` value."""


def mode(dc) -> str:
  """`config.data.pixel_store` ('auto' when absent), checked."""
  m = str(dc.get("pixel_store", "auto") if dc is not None else "auto")
  if m not in MODES:
    raise PixelStoreConfigError(f"config.data.pixel_store={m!r}: use one of {MODES}")
  return m


def wanted(mode_name: str, reads_per_image: float) -> bool:
  """Whether a run in `mode_name` that reads each image `reads_per_image` times on average
  should use a store."""
  if mode_name not in MODES:
    raise PixelStoreConfigError(f"pixel store mode {mode_name!r}: use one of {MODES}")
  return mode_name == "on" or (mode_name == "auto" and reads_per_image >= AUTO_MIN_READS)


def image_identity(name: str, ref: ImageRef | str | os.PathLike) -> list:
  """[name, reference, file size, modification time in ns] of one image."""
  path = ref.path if isinstance(ref, ImageRef) else ref
  if "#" in str(path) and not os.path.exists(path):  # FILE#name: an image inside an ArrayRecord
    path = str(path).rsplit("#", 1)[0]
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise DataError(f"image file not found: {path}") from None
  return [str(name), repr(ref), int(st.st_size), int(st.st_mtime_ns)]


def store_key(transform: images_lib.Transform, identities: Sequence[list]) -> str:
  return row_store.json_sha256({"format": row_store.FORMAT, "transform": transform.name,
                                "dim": int(transform.dim), "images": list(identities)})


class PixelStore(row_store.RowStore):
  """A published pixel store: `store[rows]` gathers uint8 [n, dim, dim, 3] rows."""

  label = "pixel store (preprocessed uint8 pixels, before normalisation)"


def _decode_into(rows: np.ndarray, lo: int, hi: int, names: Sequence[str],
                 transform: images_lib.Transform, source: Callable, workers: int,
                 progress: Callable[[int], None] | None = None) -> None:
  def one(i):
    rows[i] = transform.pixels(source(names[i]))

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    # map re-raises a decode error naming the file
    for done, _ in enumerate(pool.map(one, range(lo, hi)), 1):
      if progress is not None:
        progress(done)


def open_or_build(directory: str | os.PathLike, names: Sequence[str], refs: dict[str, Any],
                  transform: images_lib.Transform, source: Callable[[str], Any], *,
                  workers: int = 1, drop_stale: bool = True,
                  log: Callable[[str], None] | None = None) -> PixelStore:
  """The pixel store of `names` (row i = `names[i]`; `refs[name]` its ImageRef or path,
  `source(name)` its PIL image) in `directory`: opened when a valid one is there, else
  decoded by `workers` threads in each process (each its share of the rows). Raises
  `row_store.NoSpaceError` when a build would not fit."""
  log = log or row_store.log_line
  names = list(names)
  key = store_key(transform, [image_identity(n, refs[n]) for n in names])
  shape = (len(names), transform.dim, transform.dim, 3)
  built: dict = {"images": len(names), "transform": transform.name, "dim": transform.dim}

  def fill(rows, lo, hi):
    log(f"decoding {hi - lo} images into the pixel store (this process's share of "
        f"{len(names)}, {workers} thread(s))")
    t0 = time.perf_counter()
    _decode_into(rows, lo, hi, names, transform, source, workers,
                 row_store.BuildProgress("pixel store", hi - lo, log))
    built["decode_s"] = round(time.perf_counter() - t0, 3)
    built["images_per_s"] = (hi - lo) / max(built["decode_s"], 1e-9)

  return row_store.open_or_build(Path(directory), KIND, key, shape, "uint8", fill,
                                 extra=built, log=log, drop_stale=drop_stale,
                                 what="pixel store", cls=PixelStore)


def store_dir(dc, workdir: str) -> tuple[str, bool]:
  """(the directory of a run's pixel store, whether the run owns it): `data.pixel_store_dir`
  when set (it may hold other runs' stores: stale ones stay), else `<workdir>/pixel_store`
  (stale stores are deleted when a new one is published)."""
  given = str(dc.get("pixel_store_dir", "") or "") if dc is not None else ""
  if given:
    return os.path.expanduser(given), False
  return os.path.join(workdir, "pixel_store"), True

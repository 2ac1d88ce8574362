"""The frozen-feature store: the ViT output of every image of a run, once per machine.

QuRe freezes the vision tower, so its output for an image never changes during a run. The
store holds it for every training and evaluation image in one memory-mapped file instead of
an array on each process's heap: every process of a machine maps the same file, the
kernel's page cache holds it once, and a step reads only its batch's rows (`store[rows]`).
It is a store of the engine in `cirjax.data.row_store` (atomic publish, SHA-256 sidecar
checked on open, parallel build by process share, stale and damaged stores rebuilt), of
kind `vision`: `<directory>/vision_<key>.bin` + `.json`.

* Precision: float16 by default, what the reference's frozen fp16 ViT hands the Q-Former;
  bfloat16 and float32 on request (`config.qure.feature_dtype`).
* Identity: the file name carries a hash (`store_key`) of the vision parameters and of
  everything else that changes the features (model shape, preprocessing, image list with
  each file's size and modification time, precision). A resumed run finds its store and
  reuses it; a changed model or image gets a new key, builds a new store and deletes the
  stale ones in the directory.
* Building: the caller's `fill(rows, lo, hi)` writes rows `lo:hi` into the open file; with
  several processes each fills its share (see `row_store.open_or_build`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from cirjax.data import row_store
from cirjax.data.row_store import StoreError, file_sha256  # noqa: F401  (the public names)

KIND = "vision"
DTYPES = {k: row_store.DTYPES[k] for k in ("float16", "bfloat16", "float32")}
FORMAT = row_store.FORMAT


def storage_dtype(name: str) -> np.dtype:
  """The numpy dtype of a store precision name; a clear error for anything else."""
  if str(name) not in DTYPES:
    raise ValueError(f"config.qure.feature_dtype={name!r}: use one of {tuple(DTYPES)}")
  return DTYPES[str(name)]


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


class FeatureStore(row_store.RowStore):
  """A read-only view of a published feature store: `store[rows]` gathers rows."""

  label = "feature store"


def check(directory: str | os.PathLike, key: str, shape: tuple, dtype: str,
          verify: bool = True) -> dict:
  """The sidecar of a valid feature store for `key`; StoreError naming what is wrong
  otherwise (FileNotFoundError when there is none)."""
  storage_dtype(dtype)
  return row_store.check(directory, KIND, key, shape, dtype, verify)


def open_or_build(directory: str | os.PathLike, key: str, shape: tuple, dtype: str,
                  fill: Callable[[np.ndarray, int, int], None], *, verify: bool = True,
                  extra: dict | None = None,
                  log: Callable[[str], None] | None = None) -> FeatureStore:
  """The feature store for `key` in `directory`: opened if a valid one is there, else built
  (`fill(rows, lo, hi)` writes rows `lo:hi`; each process is asked for its share)."""
  storage_dtype(dtype)
  return row_store.open_or_build(Path(directory), KIND, key, shape, dtype, fill, verify=verify,
                                 extra=extra, log=log, what="feature store", cls=FeatureStore)

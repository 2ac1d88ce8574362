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

`FeatureCache` is a run's view of its store: it works out the key from the run's vision
parameters, opens or builds the store on first use (encoding with the run's vision encoder)
and gathers rows for the steps, the mining rounds and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from cirjax.errors import ConfigError
from cirjax.data import pixel_store, row_store
from cirjax.data.loader import Prefetcher, default_workers
from cirjax.eval import encode as encode_lib
from cirjax.eval import retrieval
from cirjax.models import blip2
from cirjax.data.row_store import StoreError, file_sha256  # noqa: F401  (the public names)

KIND = "vision"
DTYPES = {k: row_store.DTYPES[k] for k in ("float16", "bfloat16", "float32")}
FORMAT = row_store.FORMAT


def storage_dtype(name: str) -> np.dtype:
  """The numpy dtype of a store precision name; a clear error for anything else."""
  if str(name) not in DTYPES:
    raise ConfigError(f"config.qure.feature_dtype={name!r}: use one of {tuple(DTYPES)}")
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


class FeatureCache:
  """The frozen vision features of a run's images, from the feature store for the current
  vision parameters: opened on first use when `config.qure.feature_store_dir` (default
  `<workdir>/feature_store`) holds a valid one for these parameters, images and
  preprocessing, else built there (each process encoding its share of the images).

  Args:
    config: the run's config (`qure.feature_dtype`, `feature_store_dir`,
      `feature_store_verify`; `data.transform`, `data.workers`).
    cfg: the BLIP-2 config (the vision tower's shape, the layer layout of the params).
    encoder: `(params, pixels) -> features`, the vision tower as the steps run it.
    pixels: `(image rows) -> [n, H, W, 3]` preprocessed pixels.
    refs: image name -> reference (file path, or a record of the grain pipeline's store).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, cfg: blip2.Blip2Config, *,
               compute_dtype: str, image_names: Sequence[str], refs: dict[str, Any],
               encoder: Callable, pixels: Callable[[np.ndarray], np.ndarray],
               mesh: jax.sharding.Mesh, batch_size: int,
               log: Callable[[str], None] | None = None):
    qc = config.qure
    self.dtype = str(qc.get("feature_dtype", "float16"))
    storage_dtype(self.dtype)
    self.directory = os.path.expanduser(
        qc.get("feature_store_dir", "") or os.path.join(workdir, "feature_store"))
    self.verify = bool(qc.get("feature_store_verify", True))
    self.transform = str(config.data.get("transform", "targetpad"))
    workers = config.data.get("workers", -1)
    self.workers = default_workers() if workers is None or workers < 0 else int(workers)
    self.cfg, self.compute_dtype = cfg, compute_dtype
    self.image_names, self.refs = list(image_names), refs
    self.encoder, self.pixels, self.mesh, self.batch_size = encoder, pixels, mesh, batch_size
    self.log = log or (lambda msg: None)
    self.store: FeatureStore | None = None
    self.stats: dict = {}

  def __getitem__(self, rows) -> np.ndarray:
    return self.store[rows]

  def open(self, params) -> FeatureStore:
    """The store for `params`' vision tower (opened or built once; later calls return it)."""
    if self.store is None:
      self.store = self._open(params)
      self.log(self.store.describe())
    return self.store

  def _open(self, params) -> FeatureStore:
    n, vcfg = len(self.image_names), self.cfg.vision
    shape = (n, (vcfg.image_size // vcfg.patch_size) ** 2 + 1, vcfg.hidden_size)
    # Keyed by the per-layer tree: a run that changes scan_layers reuses the store.
    vision = blip2.unstack_layers({"vision": encode_lib.host_tree(params["vision"])},
                                  self.cfg)["vision"]
    spec = {"vision": repr(vcfg), "compute_dtype": self.compute_dtype, "dtype": self.dtype,
            "transform": self.transform,
            "images": [pixel_store.image_identity(k, self.refs[k]) for k in self.image_names]}
    t0 = time.perf_counter()
    built = {"images": n}  # the sidecar records it, with this process's encoding speed
    store = open_or_build(self.directory, store_key(vision, spec), shape, self.dtype,
                          lambda rows, lo, hi: self._fill(params, rows, lo, hi, built),
                          verify=self.verify, extra=built, log=self.log)
    self.stats = {"store_path": str(store.path), "store_bytes": store.nbytes,
                  "store_shape": list(store.shape), "store_dtype": store.dtype.name,
                  "store_built": "encode_s" in built, "store_open_s": time.perf_counter() - t0,
                  **{f"store_{k}": v for k, v in built.items()}}
    return store

  def _fill(self, params, rows: np.ndarray, lo: int, hi: int, built: dict) -> None:
    """Encodes images `lo:hi` into `rows` (this process's share of the store)."""
    self.log(f"encoding frozen vision features of {hi - lo} images into the store "
             f"(this process's share of {len(self.image_names)})")
    t1 = time.perf_counter()
    # Each process encodes its rows on its own devices, with its own copy of the params.
    single = jax.process_count() == 1
    mesh = self.mesh if single else retrieval.make_mesh(jax.local_devices())
    enc_params = params if single else encode_lib.host_tree(params)
    bs = self.batch_size

    def sink(start, y):
      rows[lo + start:lo + start + len(y)] = y

    # Decoding is most of a shallow ViT's encoding time: worker threads decode ahead.
    with Prefetcher(lambda i: (self.pixels(np.arange(i, min(hi, i + bs))),),
                    range(lo, hi, bs), workers=self.workers, name="feature-store") as pixels:
      encode_lib.encode(self.encoder, enc_params, pixels, mesh=mesh, batch_size=bs,
                        dtype=rows.dtype, sink=sink,
                        progress=row_store.BuildProgress("feature store", hi - lo, self.log))
    built["encode_s"] = time.perf_counter() - t1
    built["images_per_s"] = (hi - lo) / max(built["encode_s"], 1e-9)

"""The one data-parallel encode loop: training (mining, frozen-feature cache, evaluation),
`cirjax eval` and `cirjax search` all encode through `encode`.

Rows are split into batches of a fixed size (a multiple of the mesh's device count), the last
batch is padded by repeating its last row (a real input, so the padded rows compute finite
values) and the padded rows are dropped from the result. Each batch is placed with its rows
split over every axis of the mesh (all of them are data-parallel for a forward pass) and run
through one jitted function per (function, mesh, output placement), which compiles once per
input shape. Parameters already on the mesh keep their sharding (FSDP-sharded training
parameters stay sharded); anything else is replicated over the mesh once per call.
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

_JIT_CACHE_SIZE = 64
_jit_cache: collections.OrderedDict = collections.OrderedDict()
_jit_lock = threading.Lock()


def row_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Rows (the leading axis) split over every axis of `mesh`."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names), *([None] * (ndim - 1))))


def _jitted(fn: Callable, mesh: jax.sharding.Mesh, sharded: bool) -> Callable:
  key = (fn, mesh, sharded)
  with _jit_lock:
    if key in _jit_cache:
      _jit_cache.move_to_end(key)
      return _jit_cache[key]
    # Host results come back replicated so every process can read all rows; sharded results
    # keep the batch's row split.
    out = None if sharded else NamedSharding(mesh, P())
    jfn = jax.jit(fn, out_shardings=out)
    _jit_cache[key] = jfn
    if len(_jit_cache) > _JIT_CACHE_SIZE:
      _jit_cache.popitem(last=False)
    return jfn


def host_tree(tree: Any) -> Any:
  """A host copy of a tree of (possibly sharded, possibly multi-process) global arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def _on_mesh(params: Any, mesh: jax.sharding.Mesh) -> Any:
  rep = NamedSharding(mesh, P())

  def place(x):
    sh = getattr(x, "sharding", None)
    if isinstance(sh, NamedSharding) and sh.mesh == mesh:
      return x
    return jax.device_put(x, rep)

  return jax.tree.map(place, params)


def _batches(data: Any, batch_size: int | None) -> Iterable[tuple[np.ndarray, ...]]:
  if isinstance(data, np.ndarray):
    data = (data,)
  if not isinstance(data, tuple):  # an iterable of batches
    for b in data:
      yield tuple(b) if isinstance(b, (tuple, list)) else (b,)
    return
  n = len(data[0])
  if any(len(a) != n for a in data):
    raise ValueError(f"encode: inputs have different numbers of rows {[len(a) for a in data]}")
  step = batch_size or n
  for i in range(0, n, step):
    yield tuple(a[i:i + step] for a in data)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], axis=0)])


def encode(fn: Callable, params: Any, data: Any, *, mesh: jax.sharding.Mesh,
           batch_size: int | None = None, sharded: bool = False, pad_rows: bool = False,
           dtype: Any = None, progress: Callable[[int], None] | None = None,
           sink: Callable[[int, np.ndarray], None] | None = None
           ) -> np.ndarray | jax.Array | None:
  """Runs `fn(params, *batch)` (or `fn(*batch)` when `params` is None) over all rows.

  Args:
    fn: a pure function returning `[B, ...]`; keep it the same object between calls (a
      module-level function or a stored `functools.partial`) so its compilation is reused.
    params: a pytree passed as `fn`'s first argument, or None.
    data: an array or a tuple of arrays with the same number of rows (split here into
      batches), or any other iterable of batches (an array or a tuple of arrays each), e.g.
      a generator that decodes images one batch at a time.
    mesh: the devices to encode on; rows are split over all of its axes.
    batch_size: rows per compiled call, rounded down to a multiple of the device count (at
      least one row per device); a larger given batch is padded to a multiple of it. None:
      each batch's own size.
    sharded: return one jax.Array on the mesh (rows split over it when their number divides
      the device count, else replicated) instead of host numpy.
    pad_rows: with `sharded`, append zero rows up to a multiple of the device count so that
      the rows are always split over the mesh, never replicated (evaluation's features;
      the caller keeps the real row count, e.g. `retrieval.FeatureScorer(num_corpus=...)`).
    dtype: host result dtype, applied batch by batch (bounded host memory for large outputs).
    progress: called with the number of rows done after each batch.
    sink: called as `sink(first_row, rows)` with each batch's host result (in `dtype`)
      instead of collecting them, so that outputs larger than memory can be streamed to a
      file (the frozen-feature store); `encode` then returns None.

  Returns:
    `[N, ...]` results in input order: host numpy (every process gets all rows), a
    jax.Array with `sharded=True` (`pad_rows`: N rounded up to the device count), or None
    with a `sink`.
  """
  ndev = mesh.devices.size
  if batch_size:
    batch_size = max(ndev, batch_size // ndev * ndev)
  if sink is not None and sharded:
    raise ValueError("encode: a sink takes host rows; it cannot be combined with sharded=True")
  if pad_rows and not sharded:
    raise ValueError("encode: pad_rows lays out a sharded result; pass sharded=True")
  jfn = _jitted(fn, mesh, sharded)
  if params is not None:
    params = _on_mesh(params, mesh)
  outs, done = [], 0
  for parts in _batches(data, batch_size):
    parts = [np.asarray(p) for p in parts]
    m = parts[0].shape[0]
    bs = -(-max(batch_size or m, m) // ndev) * ndev
    dev = []
    for p in parts:
      p = _pad_rows(p, bs)
      dev.append(jax.make_array_from_callback(p.shape, row_sharding(mesh, p.ndim),
                                              lambda idx, p=p: p[idx]))
    y = jfn(params, *dev) if params is not None else jfn(*dev)
    if sharded:
      outs.append((y, m))
    else:
      y = np.asarray(jax.device_get(y))[:m]
      y = y.astype(dtype) if dtype is not None else y
      if sink is not None:
        sink(done, y)
      else:
        outs.append(y)
    done += m
    if progress is not None:
      progress(done)
  if not done:
    raise ValueError("encode: no rows to encode (empty corpus or query set)")
  if sink is not None:
    return None
  if not sharded:
    return np.concatenate(outs)
  return _concat_rows(outs, mesh, pad_rows)


def _concat_rows(outs: list[tuple[jax.Array, int]], mesh: jax.sharding.Mesh,
                 pad_rows: bool) -> jax.Array:
  counts = tuple(m for _, m in outs)
  n = sum(counts)
  ndev = mesh.devices.size
  pad = -n % ndev if pad_rows else 0
  out_sh = row_sharding(mesh, outs[0][0].ndim) if (n + pad) % ndev == 0 else \
      NamedSharding(mesh, P())
  return _concatenation(counts, pad, out_sh)(*(y for y, _ in outs))


@functools.lru_cache(maxsize=16)
def _concatenation(counts: tuple[int, ...], pad: int, out_sh: NamedSharding) -> Callable:
  """One jitted concatenation per layout, so that a training run's repeated mining rounds
  and evaluations compile it once."""

  def cat(*ys):
    rows = [y[:m] for y, m in zip(ys, counts)]
    if pad:
      rows.append(jnp.zeros((pad,) + ys[0].shape[1:], ys[0].dtype))
    return jnp.concatenate(rows)

  return jax.jit(cat, out_shardings=out_sh)

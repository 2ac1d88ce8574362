"""The CPU path of the mining (`method="numpy"`, the default on a CPU backend).

Each block comes to the host, is cut into cache-sized chunks of rows mined in a thread pool,
and each chunk costs one `np.sort` of its packed 64-bit keys (the order-preserving bit
pattern of the negated score in the high word, the corpus position in the low word, as in
`cirjax.mining.accelerator`) plus a `np.partition` of the drops' packed keys for the
steepest ones and a few cheap vectorised passes. NumPy's sort of those keys is ~3x faster
than XLA's on a CPU, and NumPy keeps subnormals (no exact path needed). Results equal the
accelerator path's bit for bit (tested).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import sys
import threading
import time
from typing import Optional

import numpy as np

from cirjax.mining.blocks import assemble, checked_block, progress_line, raise_non_finite
from cirjax.mining.sets import (STATUS_FEW_AFTER, STATUS_NO_PAIR, STATUS_OK,
                                dedup_minus_target)

# ---------------------------------------------------------------------------------------
# The CPU path: the same algorithm in NumPy, over chunks of rows in threads (NumPy releases
# the GIL in its sorts and ufuncs). On a CPU, XLA's sort of the packed keys is ~3x slower
# than NumPy's (a vectorised quicksort), and the sort is most of the work, so here a
# block costs about one `np.sort` of its keys plus a few cheap passes. NumPy (like the
# reference) computes with gradual underflow, so subnormal scores and drops need no exact
# path; every ordering still goes through the same integer keys as the XLA kernels, so the
# two paths agree bit for bit (tested).

_LOW32 = np.uint64(0xFFFFFFFF)
_INVALID = np.uint32(0xFFFFFFFF)   # a high word no finite score or drop maps to
_LOW_HALF = 0 if sys.byteorder == "little" else 1   # a uint64's low word among its 2 uint32


class _Scratch(threading.local):
  """Per-thread arrays reused from chunk to chunk. Fresh multi-megabyte arrays come from
  `mmap` and pay a page fault per 4 KiB on first touch, which cost more than the sort."""

  def get(self, name: str, shape: tuple, dtype) -> np.ndarray:
    size = int(np.prod(shape))
    arr = self.__dict__.get(name)
    if arr is None or arr.size < size or arr.dtype != dtype:
      arr = self.__dict__[name] = np.empty(max(size, 1), dtype)
    return arr[:size].reshape(shape)


_SCRATCH = _Scratch()


def _np_desc_bits(s: np.ndarray, name: str = "desc") -> np.ndarray:
  """uint32 keys whose ascending order is `s`'s descending float order, -0.0 == 0.0.

  Same map as the accelerator path's `_desc_bits(_canonical_bits(s))`: negative floats keep
  their bits, the others become `0x7FFFFFFF - bits`, written as shifts and xors (several
  times faster than `np.where`). The result lives in this thread's scratch array `name`."""
  x = np.add(s, np.float32(0), out=_SCRATCH.get("canonical", s.shape, np.float32))
  x = x.view(np.int32)                      # -0.0 + 0.0 = +0.0: canonical zeros
  m = np.right_shift(x, 31, out=_SCRATCH.get(name, s.shape, np.int32))  # -1: negative
  m &= 0x7FFFFFFF
  m ^= 0x7FFFFFFF
  m ^= x
  return m.view(np.uint32)


def _np_floats_from_desc(hi: np.ndarray) -> np.ndarray:
  """Inverse of `_np_desc_bits` (the map is an involution on each half). `hi` may be
  strided (the high words of keys): one contiguous copy first halves the cost."""
  h = _SCRATCH.get("high_words", hi.shape, np.int32)
  np.copyto(h, hi.view(np.int32))
  m = np.right_shift(h, 31, out=_SCRATCH.get("floats", hi.shape, np.int32))
  m &= 0x7FFFFFFF
  m ^= 0x7FFFFFFF
  m ^= h
  return m.view(np.float32)


def _np_words(keys: np.ndarray) -> np.ndarray:
  """uint32 view `[..., 2]` of uint64 `keys`: `[..., _LOW_HALF]` is each key's low word."""
  return np.ascontiguousarray(keys).view(np.uint32).reshape(keys.shape + (2,))


def _np_pack(hi: np.ndarray, lo: np.ndarray, name: Optional[str] = None) -> np.ndarray:
  """uint64 `hi << 32 | lo` (`lo` broadcast along rows), in scratch array `name` if given."""
  key = np.empty(hi.shape, np.uint64) if name is None else _SCRATCH.get(name, hi.shape,
                                                                          np.uint64)
  np.copyto(key, hi)
  key <<= np.uint64(32)
  key |= lo.astype(np.uint64)
  return key


def _np_rank(desc: np.ndarray, target: np.ndarray, strict_below: bool, sorted_keys=None):
  """(target rank, first after-target position) per row; `sorted_keys` when at hand."""
  b, n = desc.shape
  rows = np.arange(b)
  dt = desc[rows, target]
  if sorted_keys is not None:
    tkey = _np_pack(dt, target)
    rank = np.fromiter((np.searchsorted(sorted_keys[r], tkey[r]) for r in range(b)),
                       np.int64, b)
  else:
    col = np.arange(n)
    rank = ((desc < dt[:, None]).sum(1)
            + ((desc == dt[:, None]) & (col < target[:, None])).sum(1))
  if strict_below:
    start = (desc <= dt[:, None]).sum(1)
  else:
    start = rank + 1
  return rank.astype(np.int64), start.astype(np.int64), dt


def _np_walk(ks: np.ndarray, nvalid: np.ndarray, threshold: int):
  """`_walk` in NumPy: the first acceptable adjacent pair of ranked drop positions."""
  a, b = ks[:, :-1], ks[:, 1:]
  in_range = np.arange(1, ks.shape[1])[None, :] < nvalid[:, None]
  ok = (np.abs(a - b) > threshold) & in_range
  found = ok.any(axis=1)
  first = ok.argmax(axis=1)[:, None]
  ka = np.take_along_axis(a, first, axis=1)[:, 0]
  kb = np.take_along_axis(b, first, axis=1)[:, 0]
  return found, np.minimum(ka, kb), np.maximum(ka, kb)


def _np_ragged(cand: np.ndarray, lo: np.ndarray, size: np.ndarray) -> np.ndarray:
  """Flat int32 `cand[r, lo[r]:lo[r] + size[r]]` over rows r (the positions, i.e. the low
  words, when `cand` holds packed keys). A slice copy per row: sets can hold a third of the
  corpus, where index arithmetic over every element would cost several passes."""
  if cand.dtype == np.uint64:
    cand = _np_words(np.ascontiguousarray(cand))[..., _LOW_HALF]
  out = np.empty(int(size.sum()), np.int32)
  end = np.cumsum(size)
  for r in np.nonzero(size)[0]:
    out[end[r] - size[r]:end[r]] = cand[r, lo[r]:lo[r] + size[r]]
  return out


def _np_qure(s, target, *, threshold: int, strict_below: bool, top_drops: int):
  """One chunk of rows: `_qure_kernel` in NumPy. Returns (flat positions, sizes, stats)."""
  b, n = s.shape
  desc = _np_desc_bits(s)
  keys = _np_pack(desc, np.arange(n, dtype=np.uint32), "keys")
  keys.sort(axis=1)                                 # the one big sort
  # NaN and +-inf sort to a row's ends (NaN bits lie beyond inf's): only the ends decide.
  ends = _np_floats_from_desc(_np_words(keys[:, [0, -1]])[..., 1 - _LOW_HALF])
  finite = np.isfinite(ends).all(axis=1)
  rank, start, _ = _np_rank(desc, target, strict_below, keys)
  num_after = n - start
  nvalid = np.maximum(num_after - 1, 0)
  found = np.zeros(b, bool)
  k1 = k2 = np.zeros(b, np.int64)
  d = None
  if n >= 4:  # an after-target list of 3 needs N >= 4
    a = _np_floats_from_desc(_np_words(keys)[..., 1 - _LOW_HALF])
    # Drops <= 0, IEEE float32 with gradual underflow (NumPy does not flush subnormals).
    d = np.subtract(a[:, 1:], a[:, :-1], out=_SCRATCH.get("drops", (b, n - 1), np.float32))
    # Steepest first, ties by position: 0x7FFFFFFF - |d| bits; drops before the
    # after-target list get the invalid high word and rank last.
    dk = np.bitwise_and(d.view(np.uint32), np.uint32(0x7FFFFFFF),
                        out=_SCRATCH.get("drop_bits", (b, n - 1), np.uint32))
    dk ^= np.uint32(0x7FFFFFFF)
    for r in range(b):
      dk[r, :start[r]] = _INVALID
    dkeys = _np_pack(dk, np.arange(n - 1, dtype=np.uint32), "drop_keys")
    rk = min(top_drops, n - 1)
    if rk < n - 1:
      dkeys.partition(rk - 1, axis=1)               # the rk smallest keys first (unique keys)
      top = np.sort(dkeys[:, :rk], axis=1)
    else:
      top = np.sort(dkeys, axis=1)
    found, k1, k2 = _np_walk((top & _LOW32).astype(np.int64), nvalid, threshold)
    need = ~found & (nvalid > rk) & (num_after >= 3)
    if need.any():  # the walk did not finish within the top ranks: rank all drops
      full = np.sort(dkeys[need], axis=1)
      found[need], k1[need], k2[need] = _np_walk((full & _LOW32).astype(np.int64),
                                                 nvalid[need], threshold)
  found &= num_after >= 3
  size = np.where(found, k2 - k1, 0)
  flat = _np_ragged(keys, np.where(found, k1 + 1, 0), size)
  rows = np.arange(b)
  nan = np.float32(np.nan)
  gs = [np.where(found, np.abs(d[rows, np.where(found, k, 0)]), nan) if d is not None
        else np.full(b, nan, np.float32) for k in (k1, k2)]
  status = np.where(num_after < 3, STATUS_FEW_AFTER, np.where(found, STATUS_OK, STATUS_NO_PAIR))
  stats = dict(rank=rank, num_after=num_after, gap1=np.where(found, k1, -1),
               gap2=np.where(found, k2, -1), gap1_size=gs[0], gap2_size=gs[1], status=status,
               finite=finite)
  return flat, size, stats


def _np_best(keys: np.ndarray, kk: int) -> np.ndarray:
  """The `kk` smallest keys of each row, sorted (a partition first when it saves work)."""
  if kk < keys.shape[1]:
    keys.partition(kk - 1, axis=1)
    keys = keys[:, :kk]
  return np.sort(keys, axis=1)


def _np_topk(s, target, *, k: int):
  """One chunk: `_topk_kernel` in NumPy."""
  b, n = s.shape
  desc = _np_desc_bits(s)
  rank, _, _ = _np_rank(desc, target, False)
  kk = min(k + 1, n)
  keys = _np_pack(desc, np.arange(n, dtype=np.uint32), "keys")
  cand = (_np_best(keys, kk) & _LOW32).astype(np.int64)
  is_t = cand == target[:, None]
  tpos = np.where(is_t.any(axis=1), is_t.argmax(axis=1), kk - 1)
  j = np.arange(kk - 1)[None, :]
  shifted = np.where(j >= tpos[:, None], cand[:, 1:], cand[:, :-1])
  size = np.full(b, min(k, n - 1), np.int64)
  return _np_ragged(shifted, np.zeros(b, np.int64), size), size, _np_plain_stats(
      s, rank, n - rank - 1, size)


def _np_after_topk(s, target, *, k: int, strict_below: bool):
  """One chunk: `_after_topk_kernel` in NumPy."""
  b, n = s.shape
  desc = _np_desc_bits(s)
  rank, start, dt = _np_rank(desc, target, strict_below)
  col = np.arange(n)
  after = desc > dt[:, None]
  if not strict_below:
    after |= (desc == dt[:, None]) & (col > target[:, None])
  hi = np.where(after, desc, _INVALID)
  kk = min(k, n)
  cand = _np_best(_np_pack(hi, col.astype(np.uint32), "keys"), kk)
  num_after = n - start
  size = np.minimum(num_after, kk)
  return _np_ragged(cand, np.zeros(b, np.int64), size), size, _np_plain_stats(
      s, rank, num_after, size)


def _np_plain_stats(s, rank, num_after, size):
  b = len(rank)
  return dict(rank=rank, num_after=num_after, gap1=np.full(b, -1), gap2=np.full(b, -1),
              gap1_size=np.full(b, np.nan, np.float32),
              gap2_size=np.full(b, np.nan, np.float32),
              status=np.where(size > 0, STATUS_OK, STATUS_FEW_AFTER),
              finite=np.isfinite(s).all(axis=1))


# ---------------------------------------------------------------------------------------
# The blocked loop.

# Rows of one NumPy chunk: its packed keys (8 bytes an entry) stay cache-sized.
_CHUNK_BYTES = 4 << 20


def chunk_miner(strategy: str, ids: Optional[np.ndarray], threshold, strict_below, k,
                top_drops):
  """The function mining one chunk of rows `(scores, targets) -> (flat, sizes, stats)` for
  `strategy`; with `ids`, its sets de-duplicated in the threads, while cache-hot."""
  chunk = functools.partial(
      {"qure": _np_qure, "topk": _np_topk, "after_target_topk": _np_after_topk}[strategy],
      **_np_options(strategy, threshold, strict_below, k, top_drops))
  if ids is not None:
    chunk = functools.partial(_np_dedup_chunk, chunk, ids)
  return chunk


def _np_options(strategy, threshold, strict_below, k, top_drops) -> dict:
  if strategy == "qure":
    return dict(threshold=int(threshold), strict_below=bool(strict_below),
                top_drops=int(top_drops))
  if strategy == "topk":
    return dict(k=int(k))
  return dict(k=int(k), strict_below=bool(strict_below))


def _np_dedup_chunk(chunk_fn, ids, s, target):
  """`chunk_fn`'s sets as unique image ids minus the target's (`dedup_minus_target` on one
  chunk's rows); their sizes before it go back as the `span` stat."""
  flat, size, stats = chunk_fn(s, target)
  offsets = np.zeros(len(size) + 1, np.int64)
  np.cumsum(size, out=offsets[1:])
  offsets, flat = dedup_minus_target(offsets, ids[flat], ids[target])
  return flat, np.diff(offsets), dict(stats, span=np.asarray(size, np.int64))


def _np_chunk(chunk_fn, s, target):
  # Rows holding NaN/inf are reported by the caller; drops of +-3e38 overflow to -inf, as
  # in the reference.
  with np.errstate(invalid="ignore", over="ignore"):
    return chunk_fn(s, target)


def mine(block_fn, targets, q, n, rows, chunk_fn, threads, progress):
  """The CPU path: blocks of `rows` queries to the host, each cut into cache-sized chunks
  of rows mined by `chunk_fn` in a thread pool; the next block is requested (and, for a
  jitted block function, computed asynchronously) before this one is mined."""
  threads = int(threads) if threads else len(os.sched_getaffinity(0))
  sizes, pieces, stat_pieces = [], [], []
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    nxt = checked_block(block_fn, 0, min(rows, q), n) if q else None
    for start in range(0, q, rows):
      stop = min(start + rows, q)
      blk = nxt
      if stop < q:
        nxt = checked_block(block_fn, stop, min(stop + rows, q), n)
      s = np.asarray(blk).astype(np.float32, copy=False)
      tb = targets[start:stop].astype(np.int64)
      step = max(1, min(_CHUNK_BYTES // (8 * n), -(-(stop - start) // max(1, threads))))
      finite = []
      for flat, size, stats in pool.map(lambda a: _np_chunk(chunk_fn, s[a:a + step],
                                                            tb[a:a + step]),
                                        range(0, stop - start, step)):
        pieces.append(flat)
        sizes.append(size)
        stat_pieces.append(stats)
        finite.append(stats["finite"])
      raise_non_finite(start, np.concatenate(finite), s)
      progress_line(progress, stop, q, t0)
  return assemble(sizes, pieces, stat_pieces)

"""QuRe hard-negative mining, vectorised and exact to the reference code.

For every training query, QuRe ranks its mining corpus by score and takes as hard negatives
the images lying between the two steepest score drops *below the target* (paper §3.2,
Eqs. 4-7). The exact algorithm (docs/reference_semantics.md#mining) is, per query:

1. Rank the corpus by score, descending; ties by corpus position, ascending (a stable sort).
2. `p` = the target's position in that order. The *after-target list* is positions
   `p+1 .. N-1` (positional: entries tied with the target but sorted after it are included).
   With `strict_below=True` (the paper's Eq. 5) it is every entry scoring strictly below the
   target instead.
3. Drops `d_j = a_{j+1} - a_j` along the after-target list; rank the `j` by `d_j` ascending
   (steepest first), ties by `j` ascending.
4. Walk that ranking in adjacent pairs `(r, r+1)`, r = 0, 1, ...; with `i1 < i2` the pair's
   drops, accept the first pair with `i2 - i1 > consecutive_threshold`.
5. The set is after-target positions `i1+1 .. i2` inclusive, in descending score order.
6. With `image_ids` (corpus entries may repeat an image), the set becomes the unique image ids
   in order of first occurrence, without the target's id.
7. Fewer than 3 after-target entries, or no acceptable pair: an empty set (counted in the
   statistics; the sampler falls back to the warm-up pool).
8. NaN or +-inf scores are a `ValueError` naming the query row and the column: with an
   infinite score the drops are undefined (inf - inf = NaN), so no rule would be faithful.

How it runs: the query axis is cut into blocks sized to a memory budget, and each block is
mined by one of two paths with identical results (`method=`; tested bit for bit):

* `"numpy"`, the CPU path (the default on a CPU backend): the block comes to the host, is
  cut into cache-sized chunks of rows mined in a thread pool, and each chunk costs one
  `np.sort` of its packed 64-bit keys (below) plus a `np.partition` of the drops' packed
  keys for the steepest ones and a few cheap vectorised passes. NumPy's sort of those keys
  is ~3x faster than XLA's on a CPU, and NumPy keeps subnormals (no exact path needed).
* `"xla"`, the accelerator path (the default elsewhere): each block is one `jax.jit` call
  (optionally sharded over a mesh's devices along the query axis) that

  * sorts every row once, as a single 64-bit integer key per entry: the order-preserving bit
    pattern of the (negated) score in the high word and the corpus position in the low word,
    so one single-operand sort yields both the descending scores and the stable order (a
    single-operand integer sort is the fast path on CPU and GPU, several times faster than a
    key/value float sort);
  * computes the drop vector and ranks it with `lax.top_k` over the steepest `top_drops`
    drops, walking the pairs as a vectorised argmax; rows where the walk does not finish inside
    those ranks (many near-equal drops) get the full ranking from a second packed sort,
    under a `lax.cond` so blocks that never need it never pay for it;
  * stays exact for subnormal scores: XLA flushes subnormals to zero in float comparisons and
    arithmetic (NumPy and PyTorch do not), so ranks are counted on integer keys, and a block
    holding a nonzero score below 2**-101 in magnitude (the only way a drop can be subnormal)
    recomputes its drops exactly from the bits and ranks them with the integer sort (a
    `lax.cond`: free when unused). -0.0 and 0.0 tie, as they compare equal;
  * gathers the selected corpus positions into a flat buffer on device, so only the ragged
    result (not the `[Q, N]` order) comes back to the host.

Results are numpy arrays on the host, ragged: `indices[offsets[i]:offsets[i+1]]` is query
`i`'s set. They do not depend on the block size or the number of devices (tested).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
import threading
import time
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

# `MiningStats.status` codes.
STATUS_OK = 0
STATUS_FEW_AFTER = 1      # fewer than 3 entries after the target
STATUS_NO_PAIR = 2        # every pair of steepest drops lies too close together
STATUS_EMPTY_AFTER_DEDUP = 3  # the set held only copies of the target's image id
STATUS_NAMES = {STATUS_OK: "ok", STATUS_FEW_AFTER: "fewer than 3 after target",
                STATUS_NO_PAIR: "no acceptable pair of drops",
                STATUS_EMPTY_AFTER_DEDUP: "only the target's image id"}

STRATEGIES = ("qure", "topk", "after_target_topk")

# Bytes of device memory one score entry costs inside a block (the scores, two 64-bit sort
# keys, order, sorted values, drops and the fallback's keys) -- a deliberate over-estimate.
_BYTES_PER_ENTRY = 48
DEFAULT_MEMORY_BUDGET = 1 << 30

ScoresOrBlockFn = Union[np.ndarray, jax.Array, Callable[[int, int], Any]]


@dataclasses.dataclass(frozen=True)
class HardNegativeSets:
  """Ragged per-query sets: query i's set is `indices[offsets[i]:offsets[i+1]]`.

  `indices` are image ids when mining was given `image_ids`, else corpus positions; each set
  is in descending score order.
  """
  offsets: np.ndarray  # int64 [Q+1]
  indices: np.ndarray  # int32 [offsets[-1]]

  @property
  def num_queries(self) -> int:
    return len(self.offsets) - 1

  @property
  def sizes(self) -> np.ndarray:
    return np.diff(self.offsets)

  def __getitem__(self, i: int) -> np.ndarray:
    return self.indices[self.offsets[i]:self.offsets[i + 1]]

  def to_list(self) -> list[np.ndarray]:
    return [self[i] for i in range(self.num_queries)]


@dataclasses.dataclass(frozen=True)
class MiningStats:
  """Per-query diagnostics of one mining (numpy arrays of length Q).

  Positions are in the query's full descending ranking (0 = best score). For QuRe, the first
  accepted drop lies between positions `gap1` and `gap1 + 1`, the second between `gap2` and
  `gap2 + 1`, and the set (before de-duplication) is positions `gap1+1 .. gap2`; `gap*_size`
  are the drops' magnitudes (>= 0). They are -1 / NaN where no pair was accepted and for the
  top-k strategies.
  """
  set_size: np.ndarray     # final set size (after de-duplication by image id)
  span: np.ndarray         # corpus entries selected before de-duplication
  target_rank: np.ndarray  # the target's position in the stable descending ranking
  num_after: np.ndarray    # length of the after-target list
  gap1: np.ndarray
  gap2: np.ndarray
  gap1_size: np.ndarray
  gap2_size: np.ndarray
  status: np.ndarray       # STATUS_* codes

  def summary(self) -> dict:
    """Aggregate numbers for logs: mean/median size, empties by reason."""
    q = len(self.set_size)
    out = {"num_queries": q,
           "mean_set_size": float(self.set_size.mean()) if q else 0.0,
           "median_set_size": float(np.median(self.set_size)) if q else 0.0,
           "max_set_size": int(self.set_size.max()) if q else 0,
           "empty": int((self.set_size == 0).sum())}
    for code, name in STATUS_NAMES.items():
      if code != STATUS_OK:
        out[f"empty: {name}"] = int((self.status == code).sum())
    return out


# ---------------------------------------------------------------------------------------
# Order-preserving keys. XLA on CPU (and on GPU with flush-to-zero) treats subnormal
# float32 values as zero in comparisons and arithmetic, while the reference (NumPy, PyTorch)
# orders and subtracts them exactly. Every comparison here therefore goes through integer
# keys built from the bit patterns, and drops that could involve subnormals are recomputed
# exactly (`_exact_drop_bits`), so the selected indices are the reference's on any backend.

_SIGN = 0x80000000
_MIN_NORMAL = 2.0 ** -126


def _canonical_bits(s: jax.Array) -> jax.Array:
  """uint32 bits of float32 `s` with -0.0 mapped to +0.0 (they compare equal)."""
  bits = lax.bitcast_convert_type(s.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits == jnp.uint32(_SIGN), jnp.uint32(0), bits)


def _asc_bits(bits: jax.Array) -> jax.Array:
  """uint32 whose ascending order is the float order of the canonical float32 `bits`."""
  neg = (bits >> 31) == 1
  return jnp.where(neg, ~bits, bits | jnp.uint32(_SIGN))


def _desc_bits(bits: jax.Array) -> jax.Array:
  return ~_asc_bits(bits)


def _bits_from_desc(hi: jax.Array) -> jax.Array:
  asc = ~hi
  return jnp.where((asc >> 31) == 1, asc ^ jnp.uint32(_SIGN), ~asc)


def _pack(hi: jax.Array, lo: jax.Array) -> jax.Array:
  return (hi.astype(jnp.uint64) << jnp.uint64(32)) | lo.astype(jnp.uint32).astype(jnp.uint64)


def _low_word(key: jax.Array) -> jax.Array:
  return (key & jnp.uint64(0xFFFFFFFF)).astype(jnp.int32)


def _high_word(key: jax.Array) -> jax.Array:
  return (key >> jnp.uint64(32)).astype(jnp.uint32)


def _f64_from_bits(bits: jax.Array) -> jax.Array:
  """The exact float64 value of float32 `bits`, built with integer arithmetic only (a
  float conversion would flush subnormal inputs to zero under XLA's denormals-are-zero)."""
  exp = ((bits >> 23) & jnp.uint32(0xFF)).astype(jnp.int64)
  man = (bits & jnp.uint32(0x7FFFFF)).astype(jnp.int64)
  man = jnp.where(exp > 0, man | (1 << 23), man)
  e2 = jnp.where(exp > 0, exp, 1) - 150          # value = man * 2**e2, e2 in [-149, 104]
  scale = lax.bitcast_convert_type((e2 + 1023) << 52, jnp.float64)
  mag = man.astype(jnp.float64) * scale            # exact: man < 2**24, scale a power of two
  return jnp.where((bits >> 31) == 1, -mag, mag)


def _exact_drop_bits(hi_bits: jax.Array, lo_bits: jax.Array) -> jax.Array:
  """float32 bits of `lo - hi` rounded as IEEE float32 with gradual underflow.

  In float64 the difference of two float32 values is never subnormal, and rounding the
  float64 difference to float32 gives the correctly rounded float32 result (53 >= 2*24+2)
  whenever that result is normal. When it is subnormal (|d| < 2**-126) the difference is an
  exact multiple of 2**-149 below 2**23 * 2**-149, so it is written out bit by bit.
  """
  d = _f64_from_bits(lo_bits) - _f64_from_bits(hi_bits)
  normal = lax.bitcast_convert_type(d.astype(jnp.float32), jnp.uint32)
  units = jnp.round(jnp.abs(d) * 2.0 ** 149).astype(jnp.uint32)
  sub = jnp.where(d < 0, units | jnp.uint32(_SIGN), units)
  return jnp.where(jnp.abs(d) >= _MIN_NORMAL, normal, sub)


def _is_subnormal(bits: jax.Array) -> jax.Array:
  return ((bits & jnp.uint32(0x7F800000)) == 0) & ((bits & jnp.uint32(0x7FFFFFFF)) != 0)


def _needs_exact_drops(bits: jax.Array) -> jax.Array:
  """Whether float32 drops of these (canonical) scores could be subnormal or see a subnormal
  input, which XLA would flush to zero. Nonzero scores all >= 2**-101 in magnitude keep
  every nonzero difference >= ulp(2**-101) = 2**-124, a normal number, so only blocks with
  a tinier nonzero score need the exact path."""
  exponent = bits & jnp.uint32(0x7F800000)
  return jnp.any((exponent < jnp.uint32(26 << 23)) & ((bits & jnp.uint32(0x7FFFFFFF)) != 0))


def _best_k(bits: jax.Array, eligible: jax.Array, kk: int) -> jax.Array:
  """Columns of the `kk` largest scores among `eligible` entries, ties by column.

  Float `top_k` is the fast path (an integer `top_k` is ~10x slower on CPU), exact when no
  score is subnormal; blocks holding a subnormal take a packed integer sort instead.
  """
  def fast():
    s = lax.bitcast_convert_type(bits, jnp.float32)   # canonical zeros, no subnormals here
    # Barrier: see `_qure_kernel` (keeps top_k from becoming a full sort).
    return lax.optimization_barrier(lax.top_k(jnp.where(eligible, s, -jnp.inf), kk))[1]

  def exact():
    hi = jnp.where(eligible, _desc_bits(bits), jnp.uint32(0xFFFFFFFF))
    col = lax.broadcasted_iota(jnp.int32, bits.shape, 1)
    return _low_word(jnp.sort(_pack(hi, col), axis=1))[:, :kk]

  return lax.cond(jnp.any(_is_subnormal(bits)), exact, fast)


# ---------------------------------------------------------------------------------------
# Per-block kernels (run under jax.enable_x64 for the 64-bit keys; every dtype is explicit).

def _prepare(scores: jax.Array, target: jax.Array):
  """Canonical bits, descending keys, finiteness flags and the target's rank and key."""
  s = scores.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(s), axis=1)
  # Non-finite rows are reported as errors by the host; keep the arithmetic tame meanwhile.
  bits = jnp.where(jnp.isfinite(s), _canonical_bits(s), jnp.uint32(0))
  hi = _desc_bits(bits)                          # ascending hi = descending score
  col = lax.broadcasted_iota(jnp.int32, s.shape, 1)
  ht = jnp.take_along_axis(hi, target[:, None], axis=1)
  above = jnp.sum(hi < ht, axis=1, dtype=jnp.int32)
  tie_before = jnp.sum((hi == ht) & (col < target[:, None]), axis=1, dtype=jnp.int32)
  return bits, hi, finite, col, ht, above + tie_before


def _after_start(hi, ht, rank, strict_below: jax.Array):
  """First position of the after-target list (`strict_below` is traced: one compile)."""
  return jnp.where(strict_below, jnp.sum(hi <= ht, axis=1, dtype=jnp.int32), rank + 1)


def _walk(ks: jax.Array, nvalid: jax.Array, threshold: int):
  """First acceptable adjacent pair of ranked drop positions `ks` [B, R] (R >= 2)."""
  r = ks.shape[1]
  a, b = ks[:, :-1], ks[:, 1:]
  in_range = (jnp.arange(1, r, dtype=jnp.int32)[None, :] < nvalid[:, None])
  ok = (jnp.abs(a - b) > threshold) & in_range
  found = jnp.any(ok, axis=1)
  first = jnp.argmax(ok, axis=1)
  ka = jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  kb = jnp.take_along_axis(b, first[:, None], axis=1)[:, 0]
  return found, jnp.minimum(ka, kb), jnp.maximum(ka, kb)


def _drop_size(dbits, k):
  """|drop k| as float32 (for the statistics only)."""
  b = jnp.take_along_axis(dbits, k[:, None], axis=1)[:, 0] & jnp.uint32(0x7FFFFFFF)
  return lax.bitcast_convert_type(b, jnp.float32)


def _qure_kernel(scores, target, threshold, strict_below, *, top_drops: int):
  bits, hi, finite, col, ht, rank = _prepare(scores, target)
  bsz, n = hi.shape
  start = _after_start(hi, ht, rank, strict_below)
  num_after = n - start
  key = jnp.sort(_pack(hi, col), axis=1)
  order = _low_word(key)
  if n < 4:  # an after-target list of 3 needs N >= 4: every set is empty.
    zeros = jnp.zeros((bsz,), jnp.int32)
    stats = dict(rank=rank, num_after=num_after, gap1=zeros - 1, gap2=zeros - 1,
                 gap1_size=jnp.full((bsz,), jnp.nan, jnp.float32),
                 gap2_size=jnp.full((bsz,), jnp.nan, jnp.float32),
                 status=jnp.full((bsz,), STATUS_FEW_AFTER, jnp.int32))
    return order, zeros, zeros, finite, stats
  a_bits = _bits_from_desc(_high_word(key))
  kpos = lax.broadcasted_iota(jnp.int32, (bsz, n - 1), 1)   # drop k lies between k, k+1
  valid = kpos >= start[:, None]
  nvalid = jnp.maximum(num_after - 1, 0)
  rk = min(top_drops, n - 1)

  def full_ranking(dbits):
    # Ascending drops, ties by position: one packed single-operand sort; invalid last.
    # Integer keys: exact for subnormal drops too.
    dk = jnp.where(valid, _asc_bits(dbits), jnp.uint32(0xFFFFFFFF))
    ranked = _low_word(jnp.sort(_pack(dk, kpos), axis=1))
    return _walk(ranked, nvalid, threshold)

  def exact_path():
    # Drops rounded exactly as IEEE float32 with gradual underflow, ranked on integer keys.
    dbits = _exact_drop_bits(a_bits[:, :-1], a_bits[:, 1:])
    dbits = jnp.where(dbits == jnp.uint32(_SIGN), jnp.uint32(0), dbits)
    found, k1, k2 = full_ranking(dbits)
    return found, k1, k2, _drop_size(dbits, k1), _drop_size(dbits, k2)

  def fast_path():
    # No subnormal can appear here: plain float drops, float top_k over -drop (zeros
    # canonical: top_k orders -0.0 below 0.0); ties by lower position, as required.
    # Positions before the after-target list get -inf and rank last.
    a = lax.bitcast_convert_type(a_bits, jnp.float32)
    d = a[:, 1:] - a[:, :-1]                   # <= 0
    neg = jnp.where(valid, -d, -jnp.inf)
    neg = jnp.where(neg == 0, jnp.float32(0), neg)
    # The barrier keeps XLA (CPU) from rewriting top_k into a full two-operand sort when
    # its indices feed further ops: that rewrite is ~5x slower than the whole kernel.
    _, ks = lax.optimization_barrier(lax.top_k(neg, rk))
    found, k1, k2 = _walk(ks, nvalid, threshold)
    if rk < n - 1:
      # Rows whose walk does not finish within the top ranks get the full ranking.
      need_full = (~found) & (nvalid > rk) & (num_after >= 3)
      f2, k1b, k2b = lax.cond(jnp.any(need_full),
                              lambda: full_ranking(_canonical_bits(d)),
                              lambda: (found, k1, k2))
      found = jnp.where(need_full, f2, found)
      k1 = jnp.where(need_full, k1b, k1)
      k2 = jnp.where(need_full, k2b, k2)
    size = lambda k: -jnp.take_along_axis(d, k[:, None], axis=1)[:, 0]  # noqa: E731
    return found, k1, k2, size(k1), size(k2)

  found, k1, k2, gs1, gs2 = lax.cond(_needs_exact_drops(bits), exact_path, fast_path)
  found = found & (num_after >= 3)
  lo = jnp.where(found, k1 + 1, 0)
  size = jnp.where(found, k2 - k1, 0)
  g1 = jnp.where(found, k1, -1)
  g2 = jnp.where(found, k2, -1)
  gs1 = jnp.where(found, gs1, jnp.nan)
  gs2 = jnp.where(found, gs2, jnp.nan)
  status = jnp.where(num_after < 3, STATUS_FEW_AFTER,
                     jnp.where(found, STATUS_OK, STATUS_NO_PAIR)).astype(jnp.int32)
  stats = dict(rank=rank, num_after=num_after, gap1=g1, gap2=g2, gap1_size=gs1,
               gap2_size=gs2, status=status)
  return order, lo, size, finite, stats


def _topk_kernel(scores, target, *, k: int):
  """The k best-scoring entries other than the target (ties by position)."""
  bits, _, finite, _, _, rank = _prepare(scores, target)
  bsz, n = bits.shape
  kk = min(k + 1, n)
  cand = _best_k(bits, jnp.ones(bits.shape, bool), kk)
  is_t = cand == target[:, None]
  # Drop the target if it is among the candidates, else the (k+1)-th candidate.
  tpos = jnp.where(jnp.any(is_t, axis=1), jnp.argmax(is_t, axis=1), kk - 1)
  j = jnp.arange(kk - 1, dtype=jnp.int32)[None, :]
  shifted = jnp.where(j >= tpos[:, None], cand[:, 1:], cand[:, :-1])
  size = jnp.full((bsz,), min(k, n - 1), jnp.int32)
  zeros = jnp.zeros((bsz,), jnp.int32)
  stats = _plain_stats(rank, n - rank - 1, size)
  return shifted.astype(jnp.int32), zeros, size, finite, stats


def _after_topk_kernel(scores, target, strict_below, *, k: int):
  """The k entries ranked right after the target (or strictly below it)."""
  bits, hi, finite, col, ht, rank = _prepare(scores, target)
  bsz, n = bits.shape
  start = _after_start(hi, ht, rank, strict_below)
  after = (hi > ht) | (~strict_below & (hi == ht) & (col > target[:, None]))
  kk = min(k, n)
  cand = _best_k(bits, after, kk)
  num_after = n - start
  size = jnp.minimum(num_after, kk).astype(jnp.int32)
  zeros = jnp.zeros((bsz,), jnp.int32)
  stats = _plain_stats(rank, num_after, size)
  return cand.astype(jnp.int32), zeros, size, finite, stats


def _plain_stats(rank, num_after, size):
  bsz = rank.shape[0]
  minus = jnp.full((bsz,), -1, jnp.int32)
  nan = jnp.full((bsz,), jnp.nan, jnp.float32)
  status = jnp.where(size > 0, STATUS_OK, STATUS_FEW_AFTER).astype(jnp.int32)
  return dict(rank=rank, num_after=num_after.astype(jnp.int32), gap1=minus, gap2=minus,
              gap1_size=nan, gap2_size=nan, status=status)


def _gather_kernel(cand, lo, starts, *, total_pad: int):
  """Flat `cand[row, lo[row] + t - starts[row]]` for t < total_pad (ragged compaction)."""
  t = jnp.arange(total_pad, dtype=jnp.int32)
  # row(t) = the last row starting at or before t (rows with empty sets share the next
  # row's start and are skipped): a cumulative count of row starts, ~4x faster on CPU
  # than `searchsorted`. Starts past the buffer (padded rows) are dropped.
  marks = jnp.zeros((total_pad,), jnp.int32).at[starts].add(1, mode="drop")
  row = jnp.clip(jnp.cumsum(marks) - 1, 0, cand.shape[0] - 1)
  pos = jnp.clip(lo[row] + t - starts[row], 0, cand.shape[1] - 1)
  return cand[row, pos]


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

  Same map as `_desc_bits(_canonical_bits(s))`: negative floats keep their bits, the others
  become `0x7FFFFFFF - bits`, written as shifts and xors (several times faster than
  `np.where`). The result lives in this thread's scratch array `name`."""
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
# Host driver.

@functools.lru_cache(maxsize=64)
def _compiled(kind: str, params: tuple, mesh, axes):
  """A jitted kernel with explicit shardings for `mesh` (None: default device)."""
  if kind == "qure":
    fn = functools.partial(_qure_kernel, **dict(params))
  elif kind == "topk":
    fn = functools.partial(_topk_kernel, **dict(params))
  elif kind == "after_target_topk":
    fn = functools.partial(_after_topk_kernel, **dict(params))
  else:
    raise AssertionError(kind)
  if mesh is None:
    return jax.jit(fn)
  rows2 = NamedSharding(mesh, P(axes, None))
  rows1 = NamedSharding(mesh, P(axes))
  scalar = NamedSharding(mesh, P())
  num_dynamic = {"qure": 2, "topk": 0, "after_target_topk": 1}[kind]
  stats_sh = {k: rows1 for k in ("rank", "num_after", "gap1", "gap2", "gap1_size",
                                 "gap2_size", "status")}
  return jax.jit(fn, in_shardings=(rows2, rows1) + (scalar,) * num_dynamic,
                 out_shardings=(rows2, rows1, rows1, rows1, stats_sh))


@functools.lru_cache(maxsize=64)
def _compiled_gather(total_pad: int):
  return jax.jit(functools.partial(_gather_kernel, total_pad=total_pad))


def block_rows_for_budget(corpus_size: int, memory_budget_bytes: int, multiple: int = 1) -> int:
  """Query rows per block so one block's working set stays within the budget."""
  rows = max(1, int(memory_budget_bytes) // (_BYTES_PER_ENTRY * max(1, corpus_size)))
  rows = max(multiple, rows // multiple * multiple)
  return rows


def _as_block_fn(scores, num_queries, corpus_size):
  """(block_fn, Q, N) from a score matrix or a block function."""
  if callable(scores):
    if num_queries is None or corpus_size is None:
      raise ValueError("scores is a block function: pass num_queries= and corpus_size= too")
    return scores, int(num_queries), int(corpus_size)
  shape = getattr(scores, "shape", None)
  if shape is None:
    scores = np.asarray(scores)
    shape = scores.shape
  if len(shape) != 2:
    raise ValueError(f"scores must be a [num_queries, corpus_size] matrix, got shape {shape}")
  q, n = int(shape[0]), int(shape[1])
  if num_queries is not None and int(num_queries) != q:
    raise ValueError(f"num_queries={num_queries} disagrees with scores.shape[0]={q}")
  if corpus_size is not None and int(corpus_size) != n:
    raise ValueError(f"corpus_size={corpus_size} disagrees with scores.shape[1]={n}")
  return (lambda a, b: scores[a:b]), q, n


def _check_targets(target_index, q: int, n: int) -> np.ndarray:
  t = np.asarray(target_index)
  if t.shape != (q,):
    raise ValueError(f"target_index must have shape ({q},) (one per query), got {t.shape}")
  if q and not np.issubdtype(t.dtype, np.integer):
    raise ValueError(f"target_index must be integers, got dtype {t.dtype}")
  bad = np.nonzero((t < 0) | (t >= n))[0]
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"target_index[{i}] = {int(t[i])} is out of range for a corpus of "
                     f"{n} entries ({bad.size} queries out of range)")
  return t.astype(np.int32)


def _check_image_ids(image_ids, n: int) -> Optional[np.ndarray]:
  if image_ids is None:
    return None
  ids = np.asarray(image_ids)
  if ids.shape != (n,):
    raise ValueError(f"image_ids must have shape ({n},) (one per corpus entry), got {ids.shape}")
  if n and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError("image_ids must be integers (map names with "
                     f"np.unique(names, return_inverse=True)), got dtype {ids.dtype}")
  if n and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
    raise ValueError("image_ids must lie in [0, 2**31)")
  return ids.astype(np.int32)


def _first_occurrences(seg: np.ndarray, flat: np.ndarray, key_bits: int = 63) -> np.ndarray:
  """Bool per element: the first occurrence of its value within its segment.

  One sort of packed int64 keys (segment, value, element index) when they fit in `key_bits`
  bits -- every key unique, so an unstable sort keeps the order of first occurrence: a value
  sort is ~2x faster than a stable argsort and the index comes back with the key. Otherwise a
  stable argsort of (segment, value)."""
  first = np.zeros(flat.size, bool)
  if not flat.size:
    return first
  q = int(seg[-1]) + 1
  m = int(flat.max()) + 1
  pbits = max(1, int(flat.size - 1).bit_length())
  if (q * m - 1).bit_length() + pbits <= key_bits:
    key = seg * m
    key += flat
    key <<= pbits
    key |= np.arange(flat.size, dtype=np.int64)
    key.sort()
    group = key >> pbits
    starts = np.empty(key.size, bool)
    starts[0] = True
    np.not_equal(group[1:], group[:-1], out=starts[1:])
    first[key[starts] & ((1 << pbits) - 1)] = True
    return first
  key = seg * m + flat.astype(np.int64)
  order = np.argsort(key, kind="stable")
  ks = key[order]
  starts = np.ones(ks.size, bool)
  starts[1:] = ks[1:] != ks[:-1]
  first[order] = starts
  return first


def _dedup_minus_target(offsets, flat, target_ids, key_bits: int = 63):
  """Per segment: unique values in order of first occurrence, minus the target's id."""
  q = len(offsets) - 1
  seg = np.repeat(np.arange(q, dtype=np.int64), np.diff(offsets))
  keep = flat != target_ids[seg]
  keep &= _first_occurrences(seg, flat, key_bits)
  sizes = np.bincount(seg[keep], minlength=q) if q else np.zeros(0, np.int64)
  new_offsets = np.zeros(q + 1, np.int64)
  np.cumsum(sizes, out=new_offsets[1:])
  return new_offsets, flat[keep]


def _progress(enabled, done, total, t0):
  if enabled:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(f"\rmining: {done}/{total} queries ({rate:,.0f} queries/s)", end="",
          file=sys.stderr, flush=True)
    if done >= total:
      print(file=sys.stderr)


def hard_negative_sets(
    scores: ScoresOrBlockFn,
    target_index,
    *,
    strategy: str = "qure",
    image_ids=None,
    consecutive_threshold: int = 1,
    strict_below: bool = False,
    k: int = 100,
    block_size: Optional[int] = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    mesh: Optional[jax.sharding.Mesh] = None,
    mesh_axes: Optional[Union[str, tuple]] = None,
    num_queries: Optional[int] = None,
    corpus_size: Optional[int] = None,
    top_drops: int = 32,
    progress: bool = False,
    method: str = "auto",
    threads: Optional[int] = None,
) -> tuple[HardNegativeSets, MiningStats]:
  """Mines each query's negative set over its corpus (QuRe by default).

  Long because: a 19-line signature and the checks that name each bad argument; the two
  blocked loops are `_mine_numpy` and `_mine_xla`.

  Args:
    scores: a `[Q, N]` score matrix (numpy or jax), or a block function
      `(start, stop) -> scores[start:stop]` of shape `[stop-start, N]` (numpy or jax; e.g.
      query-block x corpus on device) so the full matrix never has to exist. A block
      function needs `num_queries` and `corpus_size`.
    target_index: `[Q]` ints, the corpus position of each query's target (as given; with a
      repeating corpus, the position you pass decides which copy is "the target").
    strategy: `"qure"` (default), `"topk"` (k best other than the target) or
      `"after_target_topk"` (the k entries right after the target). The whole-corpus
      strategy is `whole_corpus_sets`.
    image_ids: optional `[N]` ints, the image id of each corpus entry (entries may repeat).
      Sets are then unique image ids, first occurrence kept, the target's id removed.
    consecutive_threshold: minimum distance between the two drops is this + 1 (reference: 1;
      0 gives the paper's plain top-2).
    strict_below: the after-target list is the entries scoring strictly below the target
      (paper Eq. 5) instead of the positions after it (reference code).
    k: set size for the top-k strategies.
    block_size: query rows per device call; default from `memory_budget_bytes`.
    memory_budget_bytes: device memory one block may use (default 1 GiB).
    mesh: shard each block's query axis over this mesh (block rows rounded to its size).
    mesh_axes: mesh axes for the query axis (default: all of them).
    top_drops: steepest drops ranked with `top_k` before falling back to a full ranking of
      the drops; a speed knob only, results never depend on it.
    progress: print queries/s to stderr.
    method: `"numpy"` (the CPU path: NumPy sorts in threads), `"xla"` (the jitted kernels:
      the accelerator path) or `"auto"` (NumPy when the mesh's or the default backend is a
      CPU, else XLA). Results are identical bit for bit; a speed knob only.
    threads: worker threads of the NumPy path (default: the CPUs this process may use).

  Returns:
    `(HardNegativeSets, MiningStats)`, numpy on the host.

  Raises:
    ValueError: on NaN/inf scores (naming the query row and column), out-of-range or
      mis-shaped targets, an empty corpus, `k` larger than the corpus, bad options.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r}; expected one of {STRATEGIES} "
                     "(the whole-corpus strategy is whole_corpus_sets)")
  block_fn, q, n = _as_block_fn(scores, num_queries, corpus_size)
  if n == 0:
    raise ValueError("scores: the corpus is empty (corpus_size 0); nothing to mine")
  if n >= 2 ** 31 - 1:
    raise ValueError(f"corpus_size={n} does not fit 32-bit positions")
  targets = _check_targets(target_index, q, n)
  ids = _check_image_ids(image_ids, n)
  if int(consecutive_threshold) != consecutive_threshold or consecutive_threshold < 0:
    raise ValueError(f"consecutive_threshold must be an integer >= 0, got {consecutive_threshold}")
  if strategy != "qure" and not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, corpus_size={n}]")
  if top_drops < 2:
    raise ValueError(f"top_drops must be >= 2, got {top_drops}")

  method = resolve_method(method, mesh)
  if block_size and int(block_size) < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  if method == "numpy":
    chunk = functools.partial(
        {"qure": _np_qure, "topk": _np_topk, "after_target_topk": _np_after_topk}[strategy],
        **_np_options(strategy, consecutive_threshold, strict_below, k, top_drops))
    if ids is not None:  # de-duplicated chunk by chunk, in the threads, while cache-hot
      chunk = functools.partial(_np_dedup_chunk, chunk, ids)
    rows = int(block_size) if block_size else block_rows_for_budget(n, memory_budget_bytes)
    offsets, flat, st = _mine_numpy(block_fn, targets, q, n, min(rows, max(q, 1)), chunk,
                                    threads, progress)
  else:
    offsets, flat, st = _mine_xla(block_fn, targets, q, n, strategy, block_size,
                                  memory_budget_bytes, mesh, mesh_axes, top_drops, k,
                                  consecutive_threshold, strict_below, progress)
  span = st.pop("span", None)
  if span is None:
    span = np.diff(offsets)
    if ids is not None:
      offsets, flat = _dedup_minus_target(offsets, ids[flat], ids[targets])
  if ids is not None:
    emptied = (np.diff(offsets) == 0) & (span > 0)
    st["status"] = np.where(emptied, STATUS_EMPTY_AFTER_DEDUP, st["status"]).astype(np.int32)
  sets = HardNegativeSets(offsets=offsets, indices=flat)
  stats = MiningStats(set_size=np.diff(offsets), span=span, target_rank=st["rank"],
                      num_after=st["num_after"], gap1=st["gap1"], gap2=st["gap2"],
                      gap1_size=st["gap1_size"], gap2_size=st["gap2_size"],
                      status=st["status"])
  return sets, stats


METHODS = ("auto", "numpy", "xla")
# Rows of one NumPy chunk: its packed keys (8 bytes an entry) stay cache-sized.
_CHUNK_BYTES = 4 << 20


def resolve_method(method: str, mesh=None) -> str:
  """`"numpy"` or `"xla"`: `"auto"` takes NumPy on a CPU backend (its sort is ~3x faster
  than XLA's there) and the jitted XLA kernels on an accelerator."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}; expected one of {METHODS}")
  if method != "auto":
    return method
  platform = (mesh.devices.flat[0].platform if mesh is not None
              else jax.default_backend())
  return "numpy" if platform == "cpu" else "xla"


def _np_options(strategy, threshold, strict_below, k, top_drops) -> dict:
  if strategy == "qure":
    return dict(threshold=int(threshold), strict_below=bool(strict_below),
                top_drops=int(top_drops))
  if strategy == "topk":
    return dict(k=int(k))
  return dict(k=int(k), strict_below=bool(strict_below))


def _raise_non_finite(start: int, finite: np.ndarray, blk) -> None:
  if finite.all():
    return
  r = int(np.argmin(finite))
  row = np.asarray(blk[r])
  c = int(np.nonzero(~np.isfinite(row))[0][0])
  raise ValueError(f"scores row {start + r} (query {start + r}) has a non-finite value "
                   f"{row[c]} at column {c}: NaN/inf scores cannot be mined (check the "
                   "model's outputs; an infinite score makes the drops undefined)")


def _checked_block(block_fn, start: int, stop: int, n: int):
  blk = block_fn(start, stop)
  if tuple(blk.shape) != (stop - start, n):
    raise ValueError(f"scores block [{start}:{stop}] has shape {tuple(blk.shape)}, "
                     f"expected {(stop - start, n)}")
  return blk


_STAT_DTYPES = dict(rank=np.int32, num_after=np.int32, gap1=np.int32, gap2=np.int32,
                    gap1_size=np.float32, gap2_size=np.float32, status=np.int32)


def _assemble(sizes: list, pieces: list, stat_pieces: list):
  """(offsets, flat, stats) from per-block pieces, with the XLA kernels' dtypes."""
  offsets = np.zeros(sum(len(s) for s in sizes) + 1, np.int64)
  if sizes:
    np.cumsum(np.concatenate(sizes), out=offsets[1:])
  flat = (np.concatenate(pieces).astype(np.int32, copy=False) if pieces
          else np.zeros(0, np.int32))
  st = {key: (np.concatenate([p[key] for p in stat_pieces]).astype(dt) if stat_pieces
              else np.zeros(0, dt)) for key, dt in _STAT_DTYPES.items()}
  if stat_pieces and "span" in stat_pieces[0]:  # sets were de-duplicated chunk by chunk
    st["span"] = np.concatenate([p["span"] for p in stat_pieces])
  return offsets, flat, st


def _np_dedup_chunk(chunk_fn, ids, s, target):
  """`chunk_fn`'s sets as unique image ids minus the target's (`_dedup_minus_target` on one
  chunk's rows); their sizes before it go back as the `span` stat."""
  flat, size, stats = chunk_fn(s, target)
  offsets = np.zeros(len(size) + 1, np.int64)
  np.cumsum(size, out=offsets[1:])
  offsets, flat = _dedup_minus_target(offsets, ids[flat], ids[target])
  return flat, np.diff(offsets), dict(stats, span=np.asarray(size, np.int64))


def _np_chunk(chunk_fn, s, target):
  # Rows holding NaN/inf are reported by the caller; drops of +-3e38 overflow to -inf, as
  # in the reference.
  with np.errstate(invalid="ignore", over="ignore"):
    return chunk_fn(s, target)


def _mine_numpy(block_fn, targets, q, n, rows, chunk_fn, threads, progress):
  """The CPU path: blocks of `rows` queries to the host, each cut into cache-sized chunks
  of rows mined by `chunk_fn` in a thread pool; the next block is requested (and, for a
  jitted block function, computed asynchronously) before this one is mined."""
  threads = int(threads) if threads else len(os.sched_getaffinity(0))
  sizes, pieces, stat_pieces = [], [], []
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    nxt = _checked_block(block_fn, 0, min(rows, q), n) if q else None
    for start in range(0, q, rows):
      stop = min(start + rows, q)
      blk = nxt
      if stop < q:
        nxt = _checked_block(block_fn, stop, min(stop + rows, q), n)
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
      _raise_non_finite(start, np.concatenate(finite), s)
      _progress(progress, stop, q, t0)
  return _assemble(sizes, pieces, stat_pieces)


def _mine_xla(block_fn, targets, q, n, strategy, block_size, memory_budget_bytes, mesh,
              mesh_axes, top_drops, k, consecutive_threshold, strict_below, progress):
  """The jitted path (the accelerator path): one kernel call per block, sharded over the
  mesh's devices, the ragged result gathered on device."""
  ndev = 1
  axes = None
  if mesh is not None:
    axes = tuple(mesh.axis_names) if mesh_axes is None else mesh_axes
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    ndev = int(np.prod([mesh.shape[a] for a in axes_t]))
  rows = int(block_size) if block_size else block_rows_for_budget(n, memory_budget_bytes, ndev)
  rows = -(-rows // ndev) * ndev
  rows = min(rows, -(-max(q, 1) // ndev) * ndev)

  # Static options change the compiled shapes; the others are traced (one compile for all).
  if strategy == "qure":
    params = (("top_drops", int(top_drops)),)
    # A threshold >= N - 2 accepts no pair, so clipping it to N keeps int32 safe.
    dynamic = (np.int32(min(int(consecutive_threshold), n)), np.bool_(strict_below))
  elif strategy == "topk":
    params = (("k", int(k)),)
    dynamic = ()
  else:
    params = (("k", int(k)),)
    dynamic = (np.bool_(strict_below),)
  kernel = _compiled(strategy, params, mesh, axes)

  sizes, pieces, stat_pieces = [], [], []
  t0 = time.perf_counter()
  with jax.enable_x64(True):
    pending = None
    for start in range(0, q, rows):
      stop = min(start + rows, q)
      blk = _checked_block(block_fn, start, stop, n)
      pad = rows - (stop - start)
      tb = targets[start:stop]
      if pad:
        xp = jnp if isinstance(blk, jax.Array) else np
        blk = xp.concatenate([blk, xp.zeros((pad, n), blk.dtype)], axis=0)
        tb = np.concatenate([tb, np.zeros(pad, np.int32)])
      if mesh is not None:
        blk = jax.device_put(blk, NamedSharding(mesh, P(axes, None)))
        tb = jax.device_put(tb, NamedSharding(mesh, P(axes)))
      out = kernel(blk, tb, *dynamic)
      # Finish the previous block while this one runs (asynchronous dispatch).
      if pending is not None:
        _finish_block(pending, pieces, stat_pieces, sizes)
        _progress(progress, pending[1], q, t0)
      pending = (start, stop, blk, out)
    if pending is not None:
      _finish_block(pending, pieces, stat_pieces, sizes)
      _progress(progress, pending[1], q, t0)
  return _assemble(sizes, pieces, stat_pieces)


def _finish_block(pending, pieces, stat_pieces, sizes):
  start, stop, blk, (cand, lo, size, finite, stats) = pending
  nrow = stop - start
  _raise_non_finite(start, np.asarray(finite)[:nrow], blk)
  size_h = np.asarray(size)[:nrow].astype(np.int64)
  total = int(size_h.sum())
  if total:
    starts = np.full(len(np.asarray(size)), total, np.int32)  # padded rows own nothing
    starts[:nrow] = np.concatenate([[0], np.cumsum(size_h)[:-1]])
    # Powers of two (at least 4096) bound the number of gather shapes ever compiled.
    total_pad = max(4096, 1 << max(0, (total - 1).bit_length()))
    mesh = getattr(getattr(cand, "sharding", None), "mesh", None)
    if mesh is not None and getattr(mesh, "size", 1) > 1:
      # The compaction indexes rows across shards: replicate the block's order on device
      # (an all-gather, never a trip through the host) and gather everywhere.
      rep = NamedSharding(mesh, P())
      cand, lo = jax.device_put(cand, rep), jax.device_put(lo, rep)
      flat = _compiled_gather(total_pad)(cand, lo, jax.device_put(starts, rep))
    else:
      flat = _compiled_gather(total_pad)(cand, lo, jnp.asarray(starts))
    pieces.append(np.asarray(flat)[:total])
  sizes.append(size_h)
  stat_pieces.append({k_: np.asarray(v)[:nrow] for k_, v in stats.items()})


# ---------------------------------------------------------------------------------------
# The whole-corpus set (warm-up and the "All corpus" ablation), kept implicit.

@dataclasses.dataclass(frozen=True)
class WholeCorpusSets:
  """Every corpus entry whose image id differs from the target's, for every query.

  Kept implicit (Q x N indices would be huge); the sampler draws from it directly.
  `pool_ids[j]` is corpus entry j's image id (its position when mining had no image ids);
  `target_ids[i]` is query i's target id.
  """
  pool_ids: np.ndarray
  target_ids: np.ndarray

  @property
  def num_queries(self) -> int:
    return len(self.target_ids)

  def materialize(self) -> HardNegativeSets:
    """Explicit ragged sets of unique ids minus the target (only for small problems)."""
    uniq = np.unique(self.pool_ids)
    sets = [uniq[uniq != t] for t in self.target_ids]
    sizes = np.array([len(s) for s in sets], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = np.concatenate(sets).astype(np.int32) if sets else np.zeros(0, np.int32)
    return HardNegativeSets(offsets=offsets, indices=flat)


def whole_corpus_sets(target_index, *, corpus_size: Optional[int] = None,
                      image_ids=None) -> WholeCorpusSets:
  """The warm-up / "All corpus" set: the corpus minus the target's image id, per query."""
  ids = None
  if image_ids is not None:
    ids = np.asarray(image_ids)
    n = len(ids)
    if corpus_size is not None and corpus_size != n:
      raise ValueError(f"corpus_size={corpus_size} disagrees with len(image_ids)={n}")
  elif corpus_size is None:
    raise ValueError("whole_corpus_sets needs corpus_size= or image_ids=")
  else:
    n = int(corpus_size)
  if n == 0:
    raise ValueError("the corpus is empty (corpus_size 0)")
  t = np.asarray(target_index)
  targets = _check_targets(t, t.shape[0] if t.ndim == 1 else -1, n)
  ids = _check_image_ids(ids, n) if ids is not None else np.arange(n, dtype=np.int32)
  tid = ids[targets]
  if len(np.unique(ids)) < 2:
    raise ValueError("the corpus holds a single image id: no negative can differ from the target")
  return WholeCorpusSets(pool_ids=ids, target_ids=tid)


def first_positions(image_ids, query_target_ids) -> np.ndarray:
  """Corpus position of the first entry of each query's target image id (helper for
  callers that know target *ids*). Raises if an id is absent from the corpus."""
  ids = np.asarray(image_ids)
  want = np.asarray(query_target_ids)
  order = np.argsort(ids, kind="stable")
  pos = np.searchsorted(ids[order], want)
  pos = np.clip(pos, 0, len(ids) - 1)
  found = ids[order][pos] == want
  if not found.all():
    i = int(np.argmin(found))
    raise ValueError(f"query_target_ids[{i}] = {want[i]} is not in image_ids")
  return order[pos].astype(np.int32)


__all__ = ["HardNegativeSets", "MiningStats", "WholeCorpusSets", "hard_negative_sets",
           "whole_corpus_sets", "first_positions", "block_rows_for_budget", "STRATEGIES",
           "STATUS_OK", "STATUS_FEW_AFTER", "STATUS_NO_PAIR", "STATUS_EMPTY_AFTER_DEDUP"]

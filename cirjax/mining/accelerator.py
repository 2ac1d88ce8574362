"""The accelerator path of the mining (`method="xla"`, the default off a CPU backend).

Each block is one `jax.jit` call (optionally sharded over a mesh's devices along the query
axis) that

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
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from cirjax.mining.blocks import (assemble, block_rows_for_budget, checked_block,
                                  progress_line, raise_non_finite)
from cirjax.mining.sets import STATUS_FEW_AFTER, STATUS_NO_PAIR, STATUS_OK

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
# Compiled kernels and the blocked loop.

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


def mine(block_fn, targets, q, n, strategy, block_size, memory_budget_bytes, mesh,
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
      blk = checked_block(block_fn, start, stop, n)
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
        progress_line(progress, pending[1], q, t0)
      pending = (start, stop, blk, out)
    if pending is not None:
      _finish_block(pending, pieces, stat_pieces, sizes)
      progress_line(progress, pending[1], q, t0)
  return assemble(sizes, pieces, stat_pieces)


def _finish_block(pending, pieces, stat_pieces, sizes):
  start, stop, blk, (cand, lo, size, finite, stats) = pending
  nrow = stop - start
  raise_non_finite(start, np.asarray(finite)[:nrow], blk)
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

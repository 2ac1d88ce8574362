"""Retrieval on device: a blocked top-k over a corpus that stays where it was encoded
(encoding is `cirjax.eval.encode`).

`FeatureScorer` holds query features `[Nq, D]` and corpus features `[N, Q, D]` (or `[N, D]`)
on a mesh, rows split over all of its axes, in the dtype they were given (the encoder's
output; scores are computed in fp32). Features that arrive as jax.Arrays on a mesh stay
there (`encode(..., sharded=True, pad_rows=True)` leaves them so); NumPy features are placed
the same way, so both run the one engine below.

Ranking (`top_k`) never moves the corpus: each device scores a query block (gathered from the
query rows' owners) against its own corpus rows, streamed through in blocks, and keeps a
running `lax.top_k` of them; the devices' top-k lists are then all-gathered and merged with
one more `top_k`, so only `[query_block, k]` scores and indices leave a device and reach the
host. Several processes each hold their devices' rows; the merged lists are replicated, so
every process reads the same ranking. The `Nq x N` score matrix never exists anywhere.

Score = max over the target's Q feature tokens of the dot product with the query feature
(QuRe/BLIP-2). Features of shape [N, D] are treated as Q = 1 (LLaVA/InstructCIR embeddings).
Ties are broken by corpus index, ascending: `lax.top_k` keeps the lower position first,
earlier blocks of a device hold its lower rows, and the devices' lists are concatenated in
device (= row) order.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from cirjax.data.records import DataError
from cirjax.eval.encode import row_sharding
from cirjax.eval.mesh import build_mesh
from cirjax.models.scoring import max_over_tokens

NEG = -np.inf  # masked entries; no gradients flow through retrieval
_FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16))


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over all (or the given) devices (`mesh.build_mesh`)."""
  return build_mesh((("data", -1),), devices)


def as_tokens(feats: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """[N, D] -> [N, 1, D]; [N, Q, D] unchanged."""
  if feats.ndim == 2:
    return feats[:, None, :]
  if feats.ndim != 3:
    raise ValueError(f"target features must be [N, D] or [N, Q, D], got shape {feats.shape}")
  return feats


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if x.shape[0] == n:
    return x
  pad = np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad], axis=0)


def _round_up(n: int, m: int) -> int:
  return int(math.ceil(n / m) * m)


def _to_host(x: jax.Array) -> np.ndarray:
  """The one way results leave the devices here (tests count what passes): a replicated
  array, read from this process's first copy."""
  if not x.sharding.is_fully_replicated:
    raise AssertionError(f"retrieval fetches replicated results only, got {x.sharding}")
  return np.asarray(jax.device_get(x.addressable_data(0)))


def _replicated(x: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """A small host array on every device of `mesh` (every process passes the same value)."""
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


# ----------------------------------------------------------------------------- placement

def _mesh_of(x) -> jax.sharding.Mesh | None:
  sh = getattr(x, "sharding", None)
  return sh.mesh if isinstance(sh, NamedSharding) else None


def _feature_array(x):
  """NumPy features in a dtype the devices take (fp64 and integers become fp32)."""
  if isinstance(x, jax.Array):
    return x
  x = np.asarray(x)
  return x if x.dtype in _FEATURE_DTYPES else x.astype(np.float32)


def _rows_on_mesh(x, n: int, mesh: jax.sharding.Mesh) -> jax.Array:
  """`x[:n]` with zero rows appended up to a multiple of the device count, rows split over
  every axis of `mesh`. An array already laid out so (what `encode(..., pad_rows=True)`
  returns) is used as it is; NumPy rows go straight to their devices."""
  rows = _round_up(n, mesh.devices.size)
  sh = row_sharding(mesh, x.ndim)
  if isinstance(x, jax.Array):
    if x.shape[0] == rows and x.sharding.is_equivalent_to(sh, x.ndim):
      return x

    def fit(a):
      a = a[:n]
      return jnp.pad(a, [(0, rows - n)] + [(0, 0)] * (a.ndim - 1))

    return jax.jit(fit, out_shardings=sh)(x)

  def rows_of(idx):
    start, stop, _ = idx[0].indices(rows)
    part = np.asarray(x[min(start, n):min(stop, n)])
    return _pad_rows(part, stop - start)[(slice(None),) + tuple(idx[1:])]

  return jax.make_array_from_callback((rows,) + x.shape[1:], sh, rows_of)


_ALIGN = 64  # XLA's CPU client aliases host memory this aligned instead of copying it
_CHUNK_BYTES = 8 << 20


def _aligned_empty(shape, dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  off = (-raw.ctypes.data) % _ALIGN
  return raw[off:off + nbytes].view(dtype).reshape(shape)


def _cpu_host_rows(x: np.ndarray, n: int, rows: int) -> tuple[np.ndarray, bool]:
  """`x[:n]` and zero rows up to `rows`, in 64-byte aligned memory that the CPU devices use
  in place, and whether those `n` rows are finite. `x` itself when it is already laid out so;
  otherwise one copy, made with the finite check in cache-sized chunks on a few threads
  (NumPy releases the GIL): a 268 MB corpus took 0.23 s to check and hand to `device_put`
  (which copies unaligned memory on one thread), 0.05 s so."""
  reuse = (rows == n == x.shape[0] and x.flags.c_contiguous and x.ctypes.data % _ALIGN == 0)
  out = x if reuse else _aligned_empty((rows,) + x.shape[1:], x.dtype)
  step = max(1, _CHUNK_BYTES // max(1, x[:1].nbytes))

  def chunk(a):
    b = min(a + step, n)
    if not reuse:
      np.copyto(out[a:b], x[a:b])
    return bool(np.isfinite(out[a:b]).all())

  with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
    finite = all(pool.map(chunk, range(0, n, step)))
  if not reuse:  # `x` may be read-only (a fetched jax.Array): written only when copied
    out[n:] = 0
  return out, finite


def _checked_rows_on_mesh(x, n: int, mesh: jax.sharding.Mesh) -> jax.Array:
  """`_rows_on_mesh` once the first `n` rows are known finite (else a DataError, before
  anything is placed). NumPy rows for this process's CPU devices are checked while they are
  laid out for the devices to use in place (`_cpu_host_rows`)."""
  devices = mesh.devices.flat
  if not isinstance(x, jax.Array) and all(
      d.platform == "cpu" and d.process_index == jax.process_index() for d in devices):
    rows = _round_up(n, mesh.devices.size)
    x, finite = _cpu_host_rows(x, n, rows)
    n = rows
  else:
    finite = _finite(x, n)
  if not finite:
    raise DataError("non-finite (NaN/inf) features: refusing to rank")
  return _rows_on_mesh(x, n, mesh)


def _finite(x, n: int) -> bool:
  """Whether the first `n` rows are finite: NumPy on the host, device arrays where they are
  (one flag comes back)."""
  if not isinstance(x, jax.Array):
    return bool(np.isfinite(x[:n]).all())
  return bool(_to_host(_rows_finite(x, n=n)))


@functools.partial(jax.jit, static_argnames=("n",))
def _rows_finite(x, *, n):
  ok = jnp.isfinite(x).reshape(x.shape[0], -1).all(1) | (jnp.arange(x.shape[0]) >= n)
  return ok.all()


# ----------------------------------------------------------------------------- scorers

class Scorer:
  """Scores queries against corpus items. Subclasses define `block` and `pairs`."""
  num_queries: int
  num_corpus: int

  def block(self, q0: int, q1: int, c0: int, c1: int) -> np.ndarray:
    """Host scores [q1-q0, c1-c0] (baselines); feature scorers score on device instead."""
    raise NotImplementedError

  def pairs(self, query_idx: np.ndarray, corpus_idx: np.ndarray) -> np.ndarray:
    """Scores of specific items: query_idx [M], corpus_idx [M, S] -> [M, S]."""
    raise NotImplementedError


class FeatureScorer(Scorer):
  """Model features on device: queries [Nq, D], corpus [N, Q, D] (or [N, D]).

  Args:
    query_feats, corpus_feats: NumPy arrays or jax.Arrays. jax.Arrays on a mesh stay on it
      (rows split over all of its axes, as `encode(..., sharded=True, pad_rows=True)` returns
      them; any other layout is re-laid once); NumPy features are placed the same way on
      `mesh`. The dtype is kept (fp16/bf16/fp32; others become fp32); scores are fp32.
    mesh: where NumPy (or single-device) features go; default: the mesh of the features
      that have one, else all devices.
    num_queries, num_corpus: the real rows when the arrays end in padding rows (default:
      all rows).
  """

  def __init__(self, query_feats, corpus_feats, *, mesh: jax.sharding.Mesh | None = None,
               num_queries: int | None = None, num_corpus: int | None = None):
    query_feats = _feature_array(query_feats)
    # [N, D] stays 2-D on device (the kernels add the token axis for free): no copy.
    corpus_feats = _feature_array(corpus_feats)
    if corpus_feats.ndim not in (2, 3):
      raise ValueError(f"target features must be [N, D] or [N, Q, D], got shape "
                       f"{corpus_feats.shape}")
    tokens = 1 if corpus_feats.ndim == 2 else corpus_feats.shape[1]
    if query_feats.ndim != 2 or query_feats.shape[1] != corpus_feats.shape[-1]:
      raise ValueError(f"query features {query_feats.shape} do not match corpus features "
                       f"{corpus_feats.shape} (need [Nq, D] and [N, Q, D])")
    self.num_queries = query_feats.shape[0] if num_queries is None else int(num_queries)
    self.num_corpus = corpus_feats.shape[0] if num_corpus is None else int(num_corpus)
    for what, x, n in (("query", query_feats, self.num_queries),
                       ("corpus", corpus_feats, self.num_corpus)):
      if not 0 < n <= x.shape[0]:
        raise ValueError(f"{what} features have {x.shape[0]} rows; cannot score {n} of them")
    self.tokens = int(tokens)
    self.mesh = _mesh_of(corpus_feats) or _mesh_of(query_feats) or mesh or make_mesh()
    self._given = (query_feats, corpus_feats)
    self.query_rows = _checked_rows_on_mesh(query_feats, self.num_queries, self.mesh)
    self.corpus_rows = _checked_rows_on_mesh(corpus_feats, self.num_corpus, self.mesh)

  @property
  def query(self) -> np.ndarray | jax.Array:
    """[Nq, D] query features as given (device arrays: a copy without padding rows)."""
    q = self._given[0]
    return q if q.shape[0] == self.num_queries else q[:self.num_queries]

  @property
  def corpus(self) -> np.ndarray | jax.Array:
    """[N, Q, D] corpus features as given (device arrays: a copy without padding rows)."""
    c = self._given[1]
    return as_tokens(c if c.shape[0] == self.num_corpus else c[:self.num_corpus])

  def pairs(self, query_idx, corpus_idx, chunk: int = 512):
    query_idx, corpus_idx = np.asarray(query_idx), np.asarray(corpus_idx)
    for what, idx, n in (("query", query_idx, self.num_queries),
                         ("corpus", corpus_idx, self.num_corpus)):
      if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"{what} index out of range [0, {n}): "
                         f"{int(idx.min())}..{int(idx.max())}")
    fn = _pair_scorer(self.mesh)
    out = []
    for i in range(0, len(query_idx), chunk):  # bounded memory: [chunk, S, Q, D] at a time
      qi = _replicated(query_idx[i:i + chunk].astype(np.int32), self.mesh)
      ci = _replicated(corpus_idx[i:i + chunk].astype(np.int32), self.mesh)
      out.append(_to_host(fn(self.query_rows, self.corpus_rows, qi, ci)))
    return np.concatenate(out) if out else np.zeros(corpus_idx.shape, np.float32)


# ----------------------------------------------------------------------------- device kernels

def _merge(top_s, top_i, s, idx, keep, k):
  """The k best of a running top-k and a block of scores `s` [B, C] of items `idx` [C]."""
  s = jnp.where(keep, s, NEG)
  cat_s = jnp.concatenate([top_s, s], axis=1)
  cat_i = jnp.concatenate([top_i, jnp.broadcast_to(idx[None, :], s.shape)], axis=1)
  new_s, pos = lax.top_k(cat_s, k)
  return new_s, jnp.take_along_axis(cat_i, pos, axis=1)


def _gather_rows(x, rows, axes):
  """Rows `rows` (global indices) of a row-split array, on every device: each row's owner
  contributes it, the others zeros, summed (exact)."""
  n = x.shape[0]
  local = rows - lax.axis_index(axes) * n
  mine = (local >= 0) & (local < n)
  g = jnp.take(x, jnp.clip(local, 0, n - 1), axis=0)
  g = jnp.where(mine.reshape(mine.shape + (1,) * (g.ndim - mine.ndim)), g, jnp.zeros((), g.dtype))
  return lax.psum(g, axes)


def _rank_local(q, c, rows, exclude, *, k, block, num_corpus, devices, buffered, axes):
  """shard_map body: the query block `rows` against this device's corpus rows, scored
  `block` rows at a time, then the devices' top-k lists merged. Returns ([B, k] scores,
  [B, k] corpus indices).

  Buffered (the CPU path): every block's scores go into one `[B, local rows]` row, ranked by
  one `top_k` at the end (XLA's CPU `top_k` costs about 10 us per row and call whatever its
  length: one call, not one per block). Streamed (accelerators): a running `top_k` merged
  with each block, so no more than `[B, block]` scores exist at once. Both score a block with
  the same flat matmul (`max_over_tokens(flat=True)`: same GEMM shapes, same bits) and keep
  the lower corpus index first among equal scores, so they rank alike bit for bit
  (tests/test_retrieval_paths.py).
  """
  qb = _gather_rows(q, rows, axes).astype(jnp.float32)
  c = as_tokens(c)
  n = c.shape[0]
  first = lax.axis_index(axes) * n
  if buffered:
    top_s, top_i = _buffered_top_k(qb, c, exclude, first, k=k, block=block,
                                   num_corpus=num_corpus, axes=axes)
  else:
    top_s, top_i = _streamed_top_k(qb, c, exclude, first, k=k, block=block,
                                   num_corpus=num_corpus, axes=axes)
  if devices == 1:  # already the merged list (a k-wide top_k costs ~10 us a row on CPU);
    return lax.pmax(top_s, axes), lax.pmax(top_i, axes)  # pmax over one device: replicated
  all_s, all_i = _gather_lists(top_s, top_i, devices, axes)
  best, pos = lax.top_k(all_s, k)
  return best, jnp.take_along_axis(all_i, pos, axis=1)


def _block_starts(n, block):
  """Start rows of the `block`-row steps over `n` rows: the last step shifted back to end at
  the last row (its rows before `b * block` repeat the previous step's)."""
  return -(-n // block), lambda b: jnp.minimum(b * block, n - block)


def _streamed_top_k(qb, c, exclude, first, *, k, block, num_corpus, axes):
  n = c.shape[0]
  blocks, start_of = _block_starts(n, block)
  init = lax.pcast((jnp.full((qb.shape[0], k), NEG, jnp.float32),
                    jnp.full((qb.shape[0], k), -1, jnp.int32)), axes, to="varying")

  def step(carry, b):
    start = start_of(b)
    local = start + jnp.arange(block, dtype=jnp.int32)
    idx = first + local
    keep = ((local >= b * block) & (idx < num_corpus))[None, :] & (idx[None, :] != exclude[:, None])
    cb = (c if block == n else lax.dynamic_slice_in_dim(c, start, block)).astype(jnp.float32)
    return _merge(*carry, max_over_tokens(qb, cb, flat=True), idx, keep, k), None

  if blocks == 1:  # no loop to compile
    return step(init, jnp.int32(0))[0]
  return lax.scan(step, init, jnp.arange(blocks, dtype=jnp.int32))[0]


def _buffered_top_k(qb, c, exclude, first, *, k, block, num_corpus, axes):
  n = c.shape[0]
  blocks, start_of = _block_starts(n, block)
  score = lambda cb: max_over_tokens(qb, cb.astype(jnp.float32), flat=True)
  if blocks == 1:
    s = score(c)
  else:
    def step(buf, b):
      start = start_of(b)
      new = (start + jnp.arange(block, dtype=jnp.int32)) >= b * block
      old = lax.dynamic_slice_in_dim(buf, start, block, axis=1)
      cb = lax.dynamic_slice_in_dim(c, start, block)
      # The shifted last step leaves the repeated rows' scores as the step before wrote them.
      return lax.dynamic_update_slice_in_dim(buf, jnp.where(new[None, :], score(cb), old),
                                             start, axis=1), None

    buf = lax.pcast(jnp.zeros((qb.shape[0], n), jnp.float32), axes, to="varying")
    s = lax.scan(step, buf, jnp.arange(blocks, dtype=jnp.int32))[0]
  idx = first + jnp.arange(n, dtype=jnp.int32)
  s = jnp.where((idx[None, :] < num_corpus) & (idx[None, :] != exclude[:, None]), s, NEG)
  if n < k:  # fewer local rows than k: -inf fillers, as the streamed path's initial list
    s = jnp.concatenate([s, jnp.full((s.shape[0], k - n), NEG, s.dtype)], axis=1)
  top_s, pos = lax.top_k(s, k)
  return top_s, jnp.where(pos < n, first + pos, -1)


def _gather_lists(top_s, top_i, devices, axes):
  """Every device's [B, k] list side by side, [B, devices * k] in device (= row) order, on
  every device: each device fills its own slot, the others hold -inf / -1, and a max over the
  devices (exact, unlike a sum for -0.0) assembles them."""
  slot = lax.axis_index(axes)
  b, k = top_s.shape
  s = jnp.full((devices, b, k), NEG, top_s.dtype).at[slot].set(top_s)
  i = jnp.full((devices, b, k), -1, top_i.dtype).at[slot].set(top_i)
  s, i = lax.pmax(s, axes), lax.pmax(i, axes)
  return s.transpose(1, 0, 2).reshape(b, -1), i.transpose(1, 0, 2).reshape(b, -1)


def _pairs_local(q, c, qi, ci, *, axes):
  """shard_map body: scores [M, S] of queries `qi` [M] against corpus items `ci` [M, S];
  each item is scored by its owner (max over the devices, the others masked)."""
  qs = _gather_rows(q, qi, axes).astype(jnp.float32)
  c = as_tokens(c)
  n = c.shape[0]
  local = ci - lax.axis_index(axes) * n
  cs = jnp.take(c, jnp.clip(local, 0, n - 1), axis=0).astype(jnp.float32)
  s = max_over_tokens(qs, cs, paired=True)
  return lax.pmax(jnp.where((local >= 0) & (local < n), s, NEG), axes)


def _mapped(body, mesh, n_row_args: int, n_rep_args: int, n_out: int):
  """`body` as one jitted shard_map over `mesh`: row-split features, replicated small
  arguments, replicated results."""
  axes = tuple(mesh.axis_names)
  specs = (P(axes),) * n_row_args + (P(),) * n_rep_args
  out = (P(),) * n_out if n_out > 1 else P()
  fn = jax.shard_map(functools.partial(body, axes=axes), mesh=mesh, in_specs=specs,
                     out_specs=out)
  named = lambda s: jax.tree.map(lambda p: NamedSharding(mesh, p), s,
                                 is_leaf=lambda p: isinstance(p, P))
  return jax.jit(fn, in_shardings=named(specs), out_shardings=named(out))


@functools.lru_cache(maxsize=32)
def _ranker(mesh, k: int, block: int, num_corpus: int, buffered: bool):
  body = functools.partial(_rank_local, k=k, block=block, num_corpus=num_corpus,
                           devices=mesh.devices.size, buffered=buffered)
  return _mapped(body, mesh, 2, 2, 2)


@functools.lru_cache(maxsize=8)
def _pair_scorer(mesh):
  return _mapped(_pairs_local, mesh, 2, 2, 1)


@functools.partial(jax.jit, static_argnames=("k",))
def _step_scores(top_s, top_i, s, offset, n_valid, exclude, *, k):
  idx = offset + jnp.arange(s.shape[1], dtype=jnp.int32)
  keep = (idx[None, :] < n_valid) & (idx[None, :] != exclude[:, None])
  return _merge(top_s, top_i, s, idx, keep, k)


# ----------------------------------------------------------------------------- top-k

# Bytes of one query block's fp32 score tile on CPU: [query_block, corpus_block] for one
# feature per image (one GEMM and one top_k per query block over a cache-sized slice of the
# corpus; a 4,096-row slice made single-vector retrieval pay two merges per query block), and
# the token scores [query_block, corpus_block * Q] for multi-token features (benchmarks/
# bench_eval.py, 512 x 8,192 x 32 tokens: 256-row blocks, 8 MiB, rank about a third faster
# than 4,096-row ones, whose 128 MiB tiles miss the cache between the GEMM and the max).
_TILE_BYTES = 8 << 20
_SINGLE_MIN_BLOCK = 4096
_MULTI_TOKEN_MIN_BLOCK = 256  # smaller blocks pay more running-top_k merges than they save
_MULTI_TOKEN_BLOCK = 4096  # off CPU (no cache-sized tiles measured there)


PATHS = ("buffered", "streamed")


def default_path(scorer: FeatureScorer) -> str:
  """How a `FeatureScorer` ranks (`_rank_local`): "buffered" on CPU, "streamed" elsewhere."""
  return "buffered" if scorer.mesh.devices.flat[0].platform == "cpu" else "streamed"


def default_corpus_block(scorer: Scorer, query_block: int) -> int:
  """Corpus rows per step: a cache-sized score tile for single-vector features, and on CPU
  for multi-token features (at least 256 rows); 4,096 rows for multi-token features on other
  backends and for host scorers."""
  if not isinstance(scorer, FeatureScorer):
    return _MULTI_TOKEN_BLOCK
  tile_rows = _TILE_BYTES // (4 * max(1, query_block) * scorer.tokens)
  if scorer.tokens == 1:
    return max(_SINGLE_MIN_BLOCK, tile_rows)
  if scorer.mesh.devices.flat[0].platform == "cpu":
    return max(_MULTI_TOKEN_MIN_BLOCK, tile_rows)
  return _MULTI_TOKEN_BLOCK


def top_k(scorer: Scorer, k: int, exclude: np.ndarray | None = None,
          mesh: jax.sharding.Mesh | None = None, query_block: int = 256,
          corpus_block: int | None = None, progress: Callable[[int, int], None] | None = None,
          path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The k best corpus items per query: (scores [Nq, k], indices [Nq, k]), best first.

  Args:
    exclude: [Nq] corpus index to leave out per query (CIRR's reference image), -1 for none.
    mesh: the devices a host scorer (`block`) ranks on (default: all); a `FeatureScorer`
      ranks where its features are (`FeatureScorer.mesh`).
    query_block: queries ranked per call.
    corpus_block: corpus rows scored per step on each device (default:
      `default_corpus_block`).
    path: a `FeatureScorer`'s ranking program, "buffered" or "streamed" (default:
      `default_path`); both give the same rankings.
  """
  nq, nc = scorer.num_queries, scorer.num_corpus
  exclude = np.full(nq, -1, np.int32) if exclude is None else np.asarray(exclude, np.int32)
  if exclude.shape != (nq,):
    raise ValueError(f"exclude must have shape ({nq},), got {exclude.shape}")
  n_cand = nc - (1 if (exclude >= 0).any() else 0)
  if k > n_cand:
    raise DataError(f"asked for the top {k} of a corpus with only {n_cand} candidates per query")
  if path is not None and path not in PATHS:
    raise ValueError(f"path must be one of {PATHS}, got {path!r}")
  if isinstance(scorer, FeatureScorer):
    out_s, out_i = _top_k_features(scorer, k, exclude, query_block, corpus_block, progress,
                                   path or default_path(scorer))
  else:
    out_s, out_i = _top_k_host_scores(scorer, k, exclude, mesh or make_mesh(), query_block,
                                      corpus_block, progress)
  if (out_i < 0).any():
    raise AssertionError("top_k returned a padded entry; corpus too small for k")
  return out_s, out_i


def _top_k_features(scorer: FeatureScorer, k, exclude, query_block, corpus_block, progress,
                    path):
  mesh = scorer.mesh
  nq = scorer.num_queries
  n_local = scorer.corpus_rows.shape[0] // mesh.devices.size
  qb = max(1, min(query_block, nq))
  block = max(1, min(corpus_block or default_corpus_block(scorer, qb), n_local))
  rank = _ranker(mesh, k, block, scorer.num_corpus, path == "buffered")
  pending = []  # every block is dispatched before the first result is read
  for q0 in range(0, nq, qb):
    rows = np.arange(q0, q0 + qb, dtype=np.int32)
    ex = np.full(qb, -1, np.int32)
    ex[:min(qb, nq - q0)] = exclude[q0:q0 + qb]
    pending.append((q0, rank(scorer.query_rows, scorer.corpus_rows, _replicated(rows, mesh),
                             _replicated(ex, mesh))))
  out_s = np.empty((nq, k), np.float32)
  out_i = np.empty((nq, k), np.int32)
  for q0, (s, i) in pending:
    q1 = min(q0 + qb, nq)
    out_s[q0:q1] = _to_host(s)[:q1 - q0]
    out_i[q0:q1] = _to_host(i)[:q1 - q0]
    if progress is not None:
      progress(q1, nq)
  return out_s, out_i


def _top_k_host_scores(scorer: Scorer, k, exclude, mesh, query_block, corpus_block, progress):
  """Host score blocks (baselines) merged into a running top-k on device, query rows split
  over the mesh."""
  ndev = mesh.devices.size
  nq, nc = scorer.num_queries, scorer.num_corpus
  qb = _round_up(min(query_block, _round_up(nq, ndev)), ndev)
  cb = min(corpus_block or default_corpus_block(scorer, qb), nc)
  qs = row_sharding(mesh, 2)
  qs1 = row_sharding(mesh, 1)
  out_s = np.empty((nq, k), np.float32)
  out_i = np.empty((nq, k), np.int32)
  for q0 in range(0, nq, qb):
    q1 = min(q0 + qb, nq)
    top_s = jax.device_put(np.full((qb, k), NEG, np.float32), qs)
    top_i = jax.device_put(np.full((qb, k), -1, np.int32), qs)
    ex = jax.device_put(_pad_rows(exclude[q0:q1], qb), qs1)
    for c0 in range(0, nc, cb):
      s = _pad_rows(scorer.block(q0, q1, c0, min(c0 + cb, nc)).astype(np.float32), qb)
      s = np.pad(s, ((0, 0), (0, cb - s.shape[1])))
      top_s, top_i = _step_scores(top_s, top_i, jax.device_put(s, qs), jnp.int32(c0),
                                  jnp.int32(nc), ex, k=k)
    out_s[q0:q1] = np.asarray(top_s)[:q1 - q0]
    out_i[q0:q1] = np.asarray(top_i)[:q1 - q0]
    if progress is not None:
      progress(q1, nq)
  return out_s, out_i
def rank_subsets(scorer: Scorer, query_idx: np.ndarray, members: np.ndarray) -> np.ndarray:
  """Orders each query's own candidate list (CIRR img_set, GeneCIS gallery) by score.

  members: [M, S] corpus indices. Returns [M, S] corpus indices, best first; ties by
  corpus index, as in `top_k`.
  """
  members = np.asarray(members)
  s = scorer.pairs(np.asarray(query_idx), members)
  if np.isnan(s).any():
    raise ValueError("NaN scores")
  order = np.lexsort((members, -s), axis=-1)
  return np.take_along_axis(members, order, axis=1)

"""Retrieval on device: a blocked top-k over a corpus that stays where it was encoded
(encoding is `cirjax.eval.encode`).

`FeatureScorer` holds query features `[Nq, D]` and corpus features `[N, Q, D]` (or `[N, D]`)
on a mesh, rows split over all of its axes, in the dtype they were given (the encoder's
output; scores are computed in fp32). Features that arrive as jax.Arrays on a mesh stay
there (`encode(..., sharded=True, pad_rows=True)` leaves them so); NumPy features are placed
the same way, so both run the one engine below.

Ranking (`top_k`) never moves the corpus: each device scores a query block (gathered from the
query rows' owners) against its own corpus rows, streamed through in blocks. On accelerators
it keeps a running `lax.top_k` of them; the devices' top-k lists are then all-gathered and
merged with one more `top_k`, so only `[query_block, k]` scores and indices leave a device
and reach the host, and the `Nq x N` score matrix never exists anywhere. Several processes
each hold their devices' rows; the merged lists are replicated, so every process reads the
same ranking. On this process's CPU devices (the "host" path) each query block's scores are
ranked where they were written, by `host_top_k` in NumPy: XLA's CPU `top_k` is a one-thread
custom call, about three times slower (docs/eval.md).

Score = max over the target's Q feature tokens of the dot product with the query feature
(QuRe/BLIP-2). Features of shape [N, D] are treated as Q = 1 (LLaVA/InstructCIR embeddings).
Ties are broken by corpus index, ascending: `lax.top_k` keeps the lower position first,
earlier blocks of a device hold its lower rows, and the devices' lists are concatenated in
device (= row) order.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from cirjax.data.records import DataError
from cirjax.eval import host_top_k, placement
from cirjax.eval.encode import row_sharding
from cirjax.eval.mesh import build_mesh
from cirjax.models.scoring import max_over_tokens

NEG = -np.inf  # masked entries; no gradients flow through retrieval


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
    query_feats = placement.feature_array(query_feats)
    # [N, D] stays 2-D on device (the kernels add the token axis for free): no copy.
    corpus_feats = placement.feature_array(corpus_feats)
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
    self.mesh = (placement.mesh_of(corpus_feats) or placement.mesh_of(query_feats) or mesh
                 or make_mesh())
    self._given = (query_feats, corpus_feats)
    self.query_rows = placement.checked_rows_on_mesh(query_feats, self.num_queries, self.mesh)
    self.corpus_rows = placement.checked_rows_on_mesh(corpus_feats, self.num_corpus, self.mesh)

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
      qi = placement.replicated(query_idx[i:i + chunk].astype(np.int32), self.mesh)
      ci = placement.replicated(corpus_idx[i:i + chunk].astype(np.int32), self.mesh)
      out.append(placement.to_host(fn(self.query_rows, self.corpus_rows, qi, ci)))
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

  Buffered (CPU meshes over several processes): every block's scores go into one
  `[B, local rows]` row (`_buffered_scores`, the host path's scores too), ranked by one
  `top_k` at the end (XLA's CPU `top_k` costs about 10 us per row and call whatever its
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
    s = _buffered_scores(qb, c, exclude, first, block=block, num_corpus=num_corpus, axes=axes)
    if n < k:  # fewer local rows than k: -inf fillers, as the streamed path's initial list
      s = jnp.concatenate([s, jnp.full((s.shape[0], k - n), NEG, s.dtype)], axis=1)
    top_s, pos = lax.top_k(s, k)
    top_i = jnp.where(pos < n, first + pos, -1)
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


def _scores_local(q, c, rows, exclude, *, block, num_corpus, axes):
  """shard_map body of the host path: this device's masked scores of the query block `rows`
  against its corpus rows, `[B, local rows]` (its columns side by side over the devices, in
  row order, are the global corpus indices)."""
  qb = _gather_rows(q, rows, axes).astype(jnp.float32)
  first = lax.axis_index(axes) * c.shape[0]
  return _buffered_scores(qb, as_tokens(c), exclude, first, block=block, num_corpus=num_corpus,
                          axes=axes)


def _buffered_scores(qb, c, exclude, first, *, block, num_corpus, axes):
  """Every `block`-row step's scores written into one `[B, local rows]` row, rows past
  `num_corpus` and each query's excluded item masked to -inf."""
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
  # In place, one scattered entry per query: a `where` over the whole row was one more pass
  # over it, about 15 % of a single-vector block on CPU (kept only for padding rows).
  own = exclude - first
  own = jnp.where((own >= 0) & (own < n), own, n)  # out of range: dropped
  s = s.at[jnp.arange(s.shape[0]), own].set(NEG, mode="drop")
  if num_corpus < n * lax.axis_size(axes):  # padding rows, on the last devices only
    valid = jnp.clip(num_corpus - first, 0, n)
    s = jnp.where(jnp.arange(n)[None, :] < valid, s, NEG)
  return s


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


def _mapped(body, mesh, n_row_args: int, n_rep_args: int, n_out: int, column_split=False):
  """`body` as one jitted shard_map over `mesh`: row-split features, replicated small
  arguments, replicated results (`column_split`: one result, its columns split over the
  devices)."""
  axes = tuple(mesh.axis_names)
  specs = (P(axes),) * n_row_args + (P(),) * n_rep_args
  out = (P(),) * n_out if n_out > 1 else (P(None, axes) if column_split else P())
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


@functools.lru_cache(maxsize=32)
def _block_scorer(mesh, block: int, num_corpus: int):
  body = functools.partial(_scores_local, block=block, num_corpus=num_corpus)
  return _mapped(body, mesh, 2, 2, 1, column_split=True)


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


_QUERY_BLOCK = 256
# The host path's single-vector query blocks: as many rows as fill this many bytes of scores,
# scored by one GEMM; a 256-row block paid about 0.5 ms of dispatch and NumPy calls, a fifth
# of a block's time at CIRR's sizes.
_HOST_SCORE_BYTES = 16 << 20

PATHS = ("host", "buffered", "streamed")


def default_path(scorer: FeatureScorer) -> str:
  """How a `FeatureScorer` ranks: "host" when all of its devices are this process's CPU
  devices (their scores are host memory, ranked by `host_top_k`), "buffered" on other CPU
  meshes (`_rank_local`), "streamed" elsewhere."""
  devices = list(scorer.mesh.devices.flat)
  if all(d.platform == "cpu" for d in devices):
    return "host" if all(d.process_index == jax.process_index() for d in devices) else "buffered"
  return "streamed"


def _host_single(scorer: Scorer, path: str | None) -> bool:
  return (isinstance(scorer, FeatureScorer) and scorer.tokens == 1
          and (path or default_path(scorer)) == "host")


def default_query_block(scorer: Scorer, path: str | None = None) -> int:
  """Queries per call: 256; single-vector features on the host path: up to as many as fill
  16 MiB of scores (at least 256), the queries split evenly over the fewest such blocks (a
  last block of a few rows costs a whole block's GEMM)."""
  if _host_single(scorer, path):
    most = max(_QUERY_BLOCK, _HOST_SCORE_BYTES // (4 * scorer.corpus_rows.shape[0]))
    return -(-scorer.num_queries // -(-scorer.num_queries // most))
  return _QUERY_BLOCK


def default_corpus_block(scorer: Scorer, query_block: int, path: str | None = None) -> int:
  """Corpus rows per step: a cache-sized score tile for single-vector features, and on CPU
  for multi-token features (at least 256 rows); 4,096 rows for multi-token features on other
  backends and for host scorers; all rows for single-vector features on the host path (its
  scores are all kept: one GEMM)."""
  if not isinstance(scorer, FeatureScorer):
    return _MULTI_TOKEN_BLOCK
  if _host_single(scorer, path):
    return scorer.corpus_rows.shape[0] // scorer.mesh.devices.size
  tile_rows = _TILE_BYTES // (4 * max(1, query_block) * scorer.tokens)
  if scorer.tokens == 1:
    return max(_SINGLE_MIN_BLOCK, tile_rows)
  if scorer.mesh.devices.flat[0].platform == "cpu":
    return max(_MULTI_TOKEN_MIN_BLOCK, tile_rows)
  return _MULTI_TOKEN_BLOCK


def top_k(scorer: Scorer, k: int, exclude: np.ndarray | None = None,
          mesh: jax.sharding.Mesh | None = None, query_block: int | None = None,
          corpus_block: int | None = None, progress: Callable[[int, int], None] | None = None,
          path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The k best corpus items per query: (scores [Nq, k], indices [Nq, k]), best first.

  Args:
    exclude: [Nq] corpus index to leave out per query (CIRR's reference image), -1 for none.
    mesh: the devices a host scorer (`block`) ranks on (default: all); a `FeatureScorer`
      ranks where its features are (`FeatureScorer.mesh`).
    query_block: queries ranked per call (default: `default_query_block`).
    corpus_block: corpus rows scored per step on each device (default:
      `default_corpus_block`).
    path: how a `FeatureScorer` ranks, "host", "buffered" or "streamed" (default:
      `default_path`); all three give the same rankings, bit for bit.
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
    out_s, out_i = _top_k_host_scores(scorer, k, exclude, mesh or make_mesh(),
                                      query_block or _QUERY_BLOCK, corpus_block, progress)
  if (out_i < 0).any():
    raise AssertionError("top_k returned a padded entry; corpus too small for k")
  return out_s, out_i


def ranking_program(scorer: FeatureScorer, k: int, path: str, query_block: int | None = None,
                    corpus_block: int | None = None):
  """(jitted program, query block) that `top_k` runs per query block on `path`: called with
  (query rows, corpus rows, [query block] row ids, [query block] excluded ids), it returns
  the block's (scores [qb, k], ids [qb, k]) on "buffered" and "streamed", its masked scores
  [qb, corpus rows] on "host"."""
  mesh = scorer.mesh
  n_local = scorer.corpus_rows.shape[0] // mesh.devices.size
  qb = max(1, min(query_block or default_query_block(scorer, path), scorer.num_queries))
  block = max(1, min(corpus_block or default_corpus_block(scorer, qb, path), n_local))
  if path == "host":
    return _block_scorer(mesh, block, scorer.num_corpus), qb
  return _ranker(mesh, k, block, scorer.num_corpus, path == "buffered"), qb


def _top_k_features(scorer: FeatureScorer, k, exclude, query_block, corpus_block, progress,
                    path):
  mesh = scorer.mesh
  nq = scorer.num_queries
  rank, qb = ranking_program(scorer, k, path, query_block, corpus_block)

  def dispatch(q0):
    ex = np.full(qb, -1, np.int32)
    ex[:min(qb, nq - q0)] = exclude[q0:q0 + qb]
    rows = placement.replicated(np.arange(q0, q0 + qb, dtype=np.int32), mesh)
    return q0, rank(scorer.query_rows, scorer.corpus_rows, rows, placement.replicated(ex, mesh))

  if path == "host":
    # One block at a time: scoring the next block while ranking this one made both slower
    # (each wants both cores), and one [query block, corpus rows] block is held at most.
    blocks = map(dispatch, range(0, nq, qb))
    read = lambda scores, nb: host_top_k.top_k(placement.to_host(scores)[:nb], k)
  else:  # every block dispatched before the first result is read: [qb, k] each
    blocks = [dispatch(q0) for q0 in range(0, nq, qb)]
    read = lambda out, nb: (placement.to_host(out[0])[:nb], placement.to_host(out[1])[:nb])
  out_s = np.empty((nq, k), np.float32)
  out_i = np.empty((nq, k), np.int32)
  for q0, out in blocks:
    q1 = min(q0 + qb, nq)
    out_s[q0:q1], out_i[q0:q1] = read(out, q1 - q0)
    if progress is not None:
      progress(q1, nq)
  return out_s, out_i


def _top_k_host_scores(scorer: Scorer, k, exclude, mesh, query_block, corpus_block, progress):
  """Host score blocks (baselines) merged into a running top-k on device, query rows split
  over the mesh."""
  ndev = mesh.devices.size
  nq, nc = scorer.num_queries, scorer.num_corpus
  qb = placement.round_up(min(query_block, placement.round_up(nq, ndev)), ndev)
  cb = min(corpus_block or default_corpus_block(scorer, qb), nc)
  qs = row_sharding(mesh, 2)
  qs1 = row_sharding(mesh, 1)
  out_s = np.empty((nq, k), np.float32)
  out_i = np.empty((nq, k), np.int32)
  for q0 in range(0, nq, qb):
    q1 = min(q0 + qb, nq)
    top_s = jax.device_put(np.full((qb, k), NEG, np.float32), qs)
    top_i = jax.device_put(np.full((qb, k), -1, np.int32), qs)
    ex = jax.device_put(placement.pad_rows(exclude[q0:q1], qb), qs1)
    for c0 in range(0, nc, cb):
      s = placement.pad_rows(scorer.block(q0, q1, c0, min(c0 + cb, nc)).astype(np.float32), qb)
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

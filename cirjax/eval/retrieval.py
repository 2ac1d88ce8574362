"""On-device retrieval: a blocked top-k over the corpus (encoding is `cirjax.eval.encode`).

The query x corpus score matrix is never built whole: queries are sharded over the mesh's
`data` axis, the corpus streams through in blocks (replicated), and each block's scores are
merged into a running top-k (`jax.lax.top_k` over [running top-k | block]). Only the final
[queries, k] scores and indices reach the host.

Score = max over the target's Q feature tokens of the dot product with the query feature
(QuRe/BLIP-2). Features of shape [N, D] are treated as Q = 1 (LLaVA/InstructCIR embeddings).
Ties are broken by corpus index, ascending (`lax.top_k` keeps the lower position first, and
earlier blocks hold lower indices).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

NEG = -np.inf  # masked entries; no gradients flow through retrieval


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over all (or the given) devices."""
  devices = list(devices) if devices is not None else jax.devices()
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


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


# ----------------------------------------------------------------------------- top-k

def _merge(top_s, top_i, s, offset, n_valid, exclude, k):
  bc = s.shape[1]
  idx = offset + jnp.arange(bc, dtype=jnp.int32)
  keep = (idx[None, :] < n_valid) & (idx[None, :] != exclude[:, None])
  s = jnp.where(keep, s, NEG)
  cat_s = jnp.concatenate([top_s, s], axis=1)
  cat_i = jnp.concatenate([top_i, jnp.broadcast_to(idx[None, :], s.shape)], axis=1)
  new_s, pos = jax.lax.top_k(cat_s, k)
  return new_s, jnp.take_along_axis(cat_i, pos, axis=1)


def max_token_scores(q: jax.Array, c: jax.Array) -> jax.Array:
  """[Bq, D] x [Bc, Q, D] -> [Bq, Bc]: max over the Q target tokens of the dot products."""
  # One plain [Bq, D] x [D, Bc*Q] matmul: XLA's CPU backend runs the 3-D einsum form about
  # half as fast (measured by benchmarks/bench_eval.py).
  bc, t, d = c.shape
  return (q @ c.reshape(bc * t, d).T).reshape(q.shape[0], bc, t).max(axis=-1)


@functools.partial(jax.jit, static_argnames=("k",))
def _step_features(top_s, top_i, q, c, offset, n_valid, exclude, *, k):
  return _merge(top_s, top_i, max_token_scores(q, c), offset, n_valid, exclude, k)


@functools.partial(jax.jit, static_argnames=("k",))
def _step_scores(top_s, top_i, s, offset, n_valid, exclude, *, k):
  return _merge(top_s, top_i, s, offset, n_valid, exclude, k)


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
  """Model features: queries [Nq, D], corpus [N, Q, D] (or [N, D])."""

  def __init__(self, query_feats: np.ndarray, corpus_feats: np.ndarray):
    self.query = np.asarray(query_feats, np.float32)
    self.corpus = as_tokens(np.asarray(corpus_feats, np.float32))
    if self.query.ndim != 2 or self.query.shape[1] != self.corpus.shape[-1]:
      raise ValueError(f"query features {self.query.shape} do not match corpus features "
                       f"{self.corpus.shape} (need [Nq, D] and [N, Q, D])")
    if not np.isfinite(self.query).all() or not np.isfinite(self.corpus).all():
      raise ValueError("non-finite (NaN/inf) features: refusing to rank")
    self.num_queries, self.num_corpus = self.query.shape[0], self.corpus.shape[0]

  def pairs(self, query_idx, corpus_idx, chunk: int = 512):
    query_idx, corpus_idx = np.asarray(query_idx), np.asarray(corpus_idx)
    out = []
    for i in range(0, len(query_idx), chunk):  # bounded memory: [chunk, S, Q, D] at a time
      q = jnp.asarray(self.query[query_idx[i:i + chunk]])
      c = jnp.asarray(self.corpus[corpus_idx[i:i + chunk]])
      out.append(np.asarray(jnp.einsum("md,mstd->mst", q, c).max(-1)))
    return np.concatenate(out) if out else np.zeros(corpus_idx.shape, np.float32)


# Bytes of one query block's score tile ([query_block, corpus_block] fp32) for one feature
# per image: one GEMM and one top_k per query block over a cache-sized slice of the corpus
# (a 4,096-row slice made single-vector retrieval pay two merges per query block).
_SINGLE_TILE_BYTES = 8 << 20
_MULTI_TOKEN_BLOCK = 4096


def default_corpus_block(scorer: Scorer, query_block: int) -> int:
  """Corpus rows per step: a cache-sized score tile for single-vector features, 4,096 rows
  for multi-token features (where the [Bq, Bc, Q] token scores dominate)."""
  if isinstance(scorer, FeatureScorer) and scorer.corpus.shape[1] == 1:
    return max(_MULTI_TOKEN_BLOCK, _SINGLE_TILE_BYTES // (4 * max(1, query_block)))
  return _MULTI_TOKEN_BLOCK


def top_k(scorer: Scorer, k: int, exclude: np.ndarray | None = None,
          mesh: jax.sharding.Mesh | None = None, query_block: int = 256,
          corpus_block: int | None = None, progress: Callable[[int, int], None] | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
  """The k best corpus items per query: (scores [Nq, k], indices [Nq, k]), best first.

  Args:
    exclude: [Nq] corpus index to leave out per query (CIRR's reference image), -1 for none.
    corpus_block: corpus rows per step (default: `default_corpus_block`).
  """
  mesh = mesh or make_mesh()
  ndev = mesh.devices.size
  nq, nc = scorer.num_queries, scorer.num_corpus
  exclude = np.full(nq, -1, np.int32) if exclude is None else np.asarray(exclude, np.int32)
  if exclude.shape != (nq,):
    raise ValueError(f"exclude must have shape ({nq},), got {exclude.shape}")
  n_cand = nc - (1 if (exclude >= 0).any() else 0)
  if k > n_cand:
    raise ValueError(f"asked for the top {k} of a corpus with only {n_cand} candidates per query")
  qb = _round_up(min(query_block, _round_up(nq, ndev)), ndev)
  cb = min(corpus_block or default_corpus_block(scorer, qb), nc)
  qs = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())
  out_s = np.empty((nq, k), np.float32)
  out_i = np.empty((nq, k), np.int32)
  features = isinstance(scorer, FeatureScorer)
  n_blocks = math.ceil(nc / cb)
  c_dev = []
  if features:  # corpus blocks go to the device once and are reused by every query block
    for b in range(n_blocks):
      c = _pad_rows(scorer.corpus[b * cb:(b + 1) * cb], cb)
      c_dev.append(jax.device_put(c, rep))
  for q0 in range(0, nq, qb):
    q1 = min(q0 + qb, nq)
    top_s = jax.device_put(np.full((qb, k), NEG, np.float32), qs)
    top_i = jax.device_put(np.full((qb, k), -1, np.int32), qs)
    ex = jax.device_put(_pad_rows(exclude[q0:q1], qb), qs)
    if features:
      q = jax.device_put(_pad_rows(scorer.query[q0:q1], qb), qs)
    for b in range(n_blocks):
      c0 = b * cb
      off, nv = jnp.int32(c0), jnp.int32(nc)
      if features:
        top_s, top_i = _step_features(top_s, top_i, q, c_dev[b], off, nv, ex, k=k)
      else:
        s = _pad_rows(scorer.block(q0, q1, c0, min(c0 + cb, nc)).astype(np.float32), qb)
        s = np.pad(s, ((0, 0), (0, cb - s.shape[1])))
        top_s, top_i = _step_scores(top_s, top_i, jax.device_put(s, qs), off, nv, ex, k=k)
    out_s[q0:q1] = np.asarray(top_s)[:q1 - q0]
    out_i[q0:q1] = np.asarray(top_i)[:q1 - q0]
    if progress is not None:
      progress(q1, nq)
  if (out_i < 0).any():
    raise AssertionError("top_k returned a padded entry; corpus too small for k")
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


# ----------------------------------------------------------------------------- baselines

def _hash_uniform(seed: int, q: np.ndarray, c: np.ndarray) -> np.ndarray:
  """Deterministic uniform [0, 1) per (seed, query, corpus item): splitmix64 of the triple."""
  with np.errstate(over="ignore"):
    x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
         + q.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
         + c.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
  return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class RandomScorer(Scorer):
  """A model that scores every (query, image) pair uniformly at random (chance level)."""

  def __init__(self, num_queries: int, num_corpus: int, seed: int = 0):
    self.num_queries, self.num_corpus, self.seed = num_queries, num_corpus, seed

  def block(self, q0, q1, c0, c1):
    q, c = np.meshgrid(np.arange(q0, q1), np.arange(c0, c1), indexing="ij")
    return _hash_uniform(self.seed, q, c)

  def pairs(self, query_idx, corpus_idx):
    q = np.broadcast_to(np.asarray(query_idx)[:, None], np.shape(corpus_idx))
    return _hash_uniform(self.seed, q, np.asarray(corpus_idx))


class OracleScorer(RandomScorer):
  """Knows the answers: target 3 + u, other relevant images 2 + u, the rest u (u in [0, 1))."""

  def __init__(self, targets: np.ndarray, relevant: list[np.ndarray], num_corpus: int,
               seed: int = 0):
    super().__init__(len(targets), num_corpus, seed)
    self.targets = np.asarray(targets)
    self.relevant = [np.asarray(r) for r in relevant]

  def _bonus(self, q: np.ndarray, c: np.ndarray) -> np.ndarray:
    out = np.zeros(q.shape)
    for i in np.unique(q):
      m = q == i
      out[m] = np.where(c[m] == self.targets[i], 3.0,
                        np.where(np.isin(c[m], self.relevant[i]), 2.0, 0.0))
    return out

  def block(self, q0, q1, c0, c1):
    q, c = np.meshgrid(np.arange(q0, q1), np.arange(c0, c1), indexing="ij")
    return _hash_uniform(self.seed, q, c) + self._bonus(q, c)

  def pairs(self, query_idx, corpus_idx):
    q = np.broadcast_to(np.asarray(query_idx)[:, None], np.shape(corpus_idx))
    c = np.asarray(corpus_idx)
    return _hash_uniform(self.seed, q, c) + self._bonus(q, c)

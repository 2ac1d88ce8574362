"""False negatives in mined negative pools, measured against full relevant sets.

QuRe argues that its hard-negative set (the images between the two steepest score drops
below the target) keeps out the false negatives that top-k mining lets in (paper §3.2). On a
dataset that knows every query's full relevant set (the synthetic benchmark, CIRCO) this is
measurable: a pool member is a *false negative* when it is relevant to the query (the
annotated target itself is never in a pool).

Per strategy (`STRATEGIES`: QuRe's set, top-k, after-target top-k, the whole corpus) the
numbers are:

* `fn_share` -- the chance that a negative drawn uniformly from the query's pool is relevant,
  averaged over queries with a non-empty pool (what the sampler feeds the loss);
* `fn_share_pooled` -- relevant pool entries / all pool entries, over all queries;
* `pool_size` -- mean pool size (empty pools count as 0);
* `fn_queries` -- the share of queries whose pool holds at least one relevant image;
* `empty` -- the share of queries with an empty pool (QuRe only; the sampler then falls back
  to the whole corpus).

Ids: pools and relevant sets must use the same ids (corpus positions, or the image ids
passed to mining as `image_ids`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from cirjax.errors import ConfigError
from cirjax import mining
from cirjax.eval import retrieval
from cirjax.models.scoring import max_over_tokens

STRATEGIES = ("qure", "topk", "after_target_topk", "corpus")
METRICS = ("fn_share", "fn_share_pooled", "pool_size", "fn_queries", "empty")
# Datasets whose queries carry every relevant image (CIRR's `relevant` is the target only,
# so an audit there would count zero false negatives whatever the pool).
FULL_RELEVANT_DATASETS = ("synthetic", "circo")
# The QuRe study's oracle: top-k with every true false negative removed (needs a dataset
# that knows every relevant image).
ORACLE_STRATEGY = "topk_oracle"

Pools = Union[mining.HardNegativeSets, mining.WholeCorpusSets]


@dataclasses.dataclass(frozen=True)
class PoolAudit:
  """Per-query counts of one strategy's pools: `false_negatives[i]` of `pool_size[i]`."""
  pool_size: np.ndarray        # int64 [Q]
  false_negatives: np.ndarray  # int64 [Q]

  def summary(self) -> dict[str, float]:
    """The aggregate numbers of the module docstring (shares in [0, 1])."""
    size, fn = self.pool_size, self.false_negatives
    q = len(size)
    if q == 0:
      return {m: float("nan") for m in METRICS}
    nonempty = size > 0
    share = fn[nonempty] / size[nonempty]
    total = int(size.sum())
    return {"fn_share": float(share.mean()) if share.size else float("nan"),
            "fn_share_pooled": float(fn.sum() / total) if total else float("nan"),
            "pool_size": float(size.mean()),
            "fn_queries": float((fn > 0).mean()),
            "empty": float((~nonempty).mean())}


def concat(audits: Sequence[PoolAudit]) -> PoolAudit:
  """One audit over the queries of several (e.g. one per mining corpus)."""
  return PoolAudit(np.concatenate([a.pool_size for a in audits]).astype(np.int64),
                   np.concatenate([a.false_negatives for a in audits]).astype(np.int64))


def merge(audits: Sequence[Mapping[str, PoolAudit]]) -> dict[str, PoolAudit]:
  """Per-strategy audits of several mining corpora as one audit per strategy."""
  return {s: concat([a[s] for a in audits]) for s in audits[0]} if audits else {}


def _ragged(relevant) -> tuple[np.ndarray, np.ndarray]:
  """(offsets, flat ids) of per-query relevant sets (a list of arrays or ragged sets)."""
  if isinstance(relevant, mining.HardNegativeSets):
    return relevant.offsets, relevant.indices.astype(np.int64)
  sets = [np.asarray(r, np.int64).reshape(-1) for r in relevant]
  sizes = np.array([len(r) for r in sets], np.int64)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  flat = np.concatenate(sets) if sets else np.zeros(0, np.int64)
  return offsets, flat


def _pair_keys(offsets: np.ndarray, flat: np.ndarray, width: int) -> np.ndarray:
  seg = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
  return seg * width + flat


def audit_pools(pools: Pools, relevant, target_ids: Optional[np.ndarray] = None) -> PoolAudit:
  """Counts, per query, the pool members that are in the query's relevant set.

  Args:
    pools: `HardNegativeSets` (explicit pools, each without repeats) or `WholeCorpusSets`.
    relevant: per query, the ids of every relevant image (the target may be among them).
    target_ids: `[Q]` each query's target id; members equal to it are not counted as false
      negatives (mining already removes it; default: taken from a `WholeCorpusSets`).
  """
  roff, rflat = _ragged(relevant)
  q = pools.num_queries
  if len(roff) - 1 != q:
    raise ValueError(f"relevant sets for {len(roff) - 1} queries, pools for {q}")
  if isinstance(pools, mining.WholeCorpusSets):
    return _audit_whole_corpus(pools, roff, rflat)
  flat = pools.indices.astype(np.int64)
  width = int(max(flat.max(initial=0), rflat.max(initial=0))) + 1
  pool_keys = _pair_keys(pools.offsets, flat, width)
  rel_keys = _pair_keys(roff, rflat, width)
  if target_ids is not None:
    tid = np.asarray(target_ids, np.int64)
    if tid.shape != (q,):
      raise ValueError(f"target_ids must have shape ({q},), got {tid.shape}")
    rel_keys = rel_keys[rflat != np.repeat(tid, np.diff(roff))]
  hit = np.isin(pool_keys, rel_keys)
  seg = np.repeat(np.arange(q, dtype=np.int64), pools.sizes)
  fn = np.bincount(seg[hit], minlength=q).astype(np.int64)
  return PoolAudit(pools.sizes.astype(np.int64), fn)


def _audit_whole_corpus(pools: mining.WholeCorpusSets, roff, rflat) -> PoolAudit:
  """The whole corpus minus the target: every relevant image in the corpus is in the pool."""
  uniq = np.unique(pools.pool_ids).astype(np.int64)
  q = pools.num_queries
  tid = pools.target_ids.astype(np.int64)
  seg = np.repeat(np.arange(q, dtype=np.int64), np.diff(roff))
  keep = np.isin(rflat, uniq) & (rflat != tid[seg])
  # A relevant set listing an id twice counts it once.
  width = int(max(uniq.max(initial=0), rflat.max(initial=0))) + 1
  keys = np.unique(seg[keep] * width + rflat[keep])
  fn = np.bincount(keys // width, minlength=q).astype(np.int64)
  size = np.full(q, len(uniq), np.int64) - np.isin(tid, uniq)
  return PoolAudit(size, fn)


def audit_strategies(scores: mining.ScoresOrBlockFn, target_index, relevant, *,
                     image_ids=None, strategies: Sequence[str] = STRATEGIES, k: int = 100,
                     consecutive_threshold: int = 1, strict_below: bool = False,
                     num_queries: Optional[int] = None, corpus_size: Optional[int] = None,
                     mined: Optional[Mapping[str, mining.HardNegativeSets]] = None,
                     ) -> dict[str, PoolAudit]:
  """Mines every strategy from the same scores and audits each pool against `relevant`.

  Args:
    scores, target_index, image_ids, num_queries, corpus_size: as `mining.hard_negative_sets`.
    relevant: per query, the relevant ids (image ids with `image_ids`, else corpus positions).
    strategies: which of `STRATEGIES` to audit.
    k: set size of the top-k strategies (clipped to the corpus size minus one).
    consecutive_threshold, strict_below: QuRe's options, as the mining that trains used.
    mined: pools already mined from these scores, by strategy (not mined again).
  """
  unknown = [s for s in strategies if s not in STRATEGIES]
  if unknown:
    raise ValueError(f"strategies {unknown}: expected some of {STRATEGIES}")
  mined = dict(mined or {})
  ids = None if image_ids is None else np.asarray(image_ids)
  tgt = np.asarray(target_index)
  n = len(ids) if ids is not None else (corpus_size if corpus_size is not None
                                        else np.shape(scores)[1])
  target_ids = tgt if ids is None else ids[tgt]
  out = {}
  for s in strategies:
    if s == "corpus":
      pools: Pools = mining.whole_corpus_sets(tgt, corpus_size=n, image_ids=ids)
    elif s in mined:
      pools = mined[s]
    else:
      kw = ({"consecutive_threshold": consecutive_threshold} if s == "qure"
            else {"k": max(1, min(int(k), int(n) - 1))})
      pools, _ = mining.hard_negative_sets(scores, tgt, strategy=s, image_ids=ids,
                                           strict_below=strict_below, num_queries=num_queries,
                                           corpus_size=corpus_size, **kw)
    out[s] = audit_pools(pools, relevant, target_ids=target_ids)
  return out


def audit_metrics(audits: Mapping[str, PoolAudit]) -> dict[str, float]:
  """Flat `{"fn_share/qure": ..., "pool_size/topk": ...}` for logs (TensorBoard groups by
  the metric name); `empty` only for QuRe, where it can be non-zero."""
  out = {}
  for s, a in audits.items():
    for m, v in a.summary().items():
      if m != "empty" or s == "qure":
        out[f"{m}/{s}"] = v
  return out


@dataclasses.dataclass(frozen=True)
class SplitAudit:
  """One mining of a split with a model's features: every strategy's audit, and QuRe's
  sets and statistics (for the figures)."""
  audits: dict[str, PoolAudit]
  sets: mining.HardNegativeSets
  stats: mining.MiningStats
  target_index: np.ndarray

  def summary(self) -> dict:
    return {"mining": self.stats.summary(),
            "false_negatives": {s: a.summary() for s, a in self.audits.items()}}


_scores = jax.jit(max_over_tokens)


def score_rows(scorer: retrieval.FeatureScorer, rows) -> np.ndarray:
  """Host scores `[len(rows), N]` of some queries against the whole corpus."""
  return np.asarray(_scores(jnp.asarray(scorer.query[np.asarray(rows)]),
                            jnp.asarray(scorer.corpus)))


def audit_split(scorer: retrieval.FeatureScorer, split, *, k: int = 100,
                consecutive_threshold: int = 1, strict_below: bool = False,
                strategies: Sequence[str] = STRATEGIES) -> SplitAudit:
  """Mines every query of `split` over its corpus with `scorer`'s features (the corpus is
  the split's images, the target its annotated one, as QuRe mines CIRR and the synthetic
  set) and audits every strategy against the queries' relevant sets."""
  if scorer.num_queries != len(split.queries) or scorer.num_corpus != len(split.corpus):
    raise ValueError(f"features cover {scorer.num_queries} queries x {scorer.num_corpus} "
                     f"images, {split.name} has {len(split.queries)} x {len(split.corpus)}")
  if not split.has_targets:
    raise ValueError(f"{split.name} has no targets: nothing to mine against")
  index = split.corpus_index()
  missing = [q.target for q in split.queries if q.target not in index]
  if missing:
    raise ValueError(f"{split.name}: target {missing[0]!r} is not in the corpus")
  target = np.array([index[q.target] for q in split.queries], np.int32)
  corpus = jnp.asarray(scorer.corpus)

  def block(a, b):
    return _scores(jnp.asarray(scorer.query[a:b]), corpus)

  opts = dict(consecutive_threshold=consecutive_threshold, strict_below=strict_below,
              num_queries=len(split.queries), corpus_size=len(split.corpus))
  sets, stats = mining.hard_negative_sets(block, target, **opts)
  rel = relevant_ids(split.queries, index.get)
  audits = audit_strategies(block, target, rel, k=k, strategies=strategies,
                            mined={"qure": sets}, **opts)
  return SplitAudit(audits, sets, stats, target)


def without_relevant(sets: mining.HardNegativeSets, relevant) -> mining.HardNegativeSets:
  """`sets` with every relevant member removed: the oracle top-k of the QuRe study, which
  knows each query's full relevant set (same ids as `sets`; order kept)."""
  roff, rflat = _ragged(relevant)
  if len(roff) - 1 != sets.num_queries:
    raise ValueError(f"relevant sets for {len(roff) - 1} queries, sets for {sets.num_queries}")
  flat = sets.indices.astype(np.int64)
  width = int(max(flat.max(initial=0), rflat.max(initial=0))) + 1
  keep = ~np.isin(_pair_keys(sets.offsets, flat, width), _pair_keys(roff, rflat, width))
  seg = np.repeat(np.arange(sets.num_queries, dtype=np.int64), sets.sizes)
  sizes = np.bincount(seg[keep], minlength=sets.num_queries)
  return mining.HardNegativeSets(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                                 sets.indices[keep])


def pair_stats(scores: mining.ScoresOrBlockFn, target_index, sets: mining.HardNegativeSets,
               positions: np.ndarray, temp: float, *, block_rows: int = 1024,
               ) -> dict[str, float]:
  """QuRe's pairwise loss and pair accuracy on the mined negatives, as the next epochs will
  draw them (uniformly from each non-empty set; an empty set falls back to the corpus and is
  left out here): per query the mean over its set of `-log sigma((s_t - s_n) / temp)` and
  of `s_t > s_n`, then the mean over queries.

  `scores`: `[Q, N]` or a block function `(a, b) -> [b - a, N]` (as mining takes);
  `positions[id]`: the corpus column of set member `id` (sets hold image ids).
  """
  tgt = np.asarray(target_index, np.int64)
  q = sets.num_queries
  losses_, accs = [], []
  for a in range(0, q, block_rows):
    b = min(q, a + block_rows)
    s = np.asarray(scores(a, b) if callable(scores) else np.asarray(scores)[a:b], np.float64)
    for i in range(a, b):
      members = sets[i]
      if members.size == 0:
        continue
      row = s[i - a]
      d = (row[tgt[i]] - row[positions[members]]) / float(temp)
      losses_.append(np.logaddexp(0.0, -d).mean())
      accs.append((d > 0).mean())
  if not losses_:
    return {"pair_loss": float("nan"), "pair_acc": float("nan")}
  return {"pair_loss": float(np.mean(losses_)), "pair_acc": float(np.mean(accs))}


def check_strategy(strategy: str, dataset: str) -> str:
  """`config.qure.strategy`, checked: the oracle needs every relevant image of `dataset`."""
  if strategy == ORACLE_STRATEGY and dataset not in FULL_RELEVANT_DATASETS:
    raise ConfigError(f"config.qure.strategy={ORACLE_STRATEGY!r} needs every relevant image: "
                      f"use one of {FULL_RELEVANT_DATASETS}, not {dataset!r}")
  return strategy


def relevant_ids(queries, index: Callable[[str], Optional[int]]) -> list[np.ndarray]:
  """Each query's relevant set as ids (`index(name)`), the target included; images
  `index` does not know (None: outside the corpus, so in no pool) are left out."""
  out = []
  for q in queries:
    ids = [index(n) for n in (q.relevant or (q.target,))]
    out.append(np.array([i for i in ids if i is not None], np.int64))
  return out


__all__ = ["without_relevant", "pair_stats", "PoolAudit", "SplitAudit", "audit_split",
           "score_rows", "audit_pools", "audit_strategies", "audit_metrics", "concat", "merge",
           "relevant_ids", "check_strategy", "STRATEGIES", "METRICS", "FULL_RELEVANT_DATASETS",
           "ORACLE_STRATEGY"]

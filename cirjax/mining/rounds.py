"""One mining round of a training run: every group's queries mined over its corpus with the
current model's features, and the round's diagnostics.

The features stay on this process's devices (rows split over them) and each block of
query x corpus scores is computed there; the accelerator path mines it there too, so only
the ragged sets and their statistics reach the host (the CPU path takes each block to the
host it runs on). Every process mines every query, so all hold the same sets.

Besides the set-size statistics a round reports where its seconds went, QuRe's loss and pair
accuracy on the negatives just mined (`mined_pair_loss`, `mined_pair_acc`) and, on a dataset
that knows every relevant image, every strategy's false negatives (docs/mining.md).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cirjax.errors import ConfigError
from cirjax.eval import encode as encode_lib
from cirjax.eval import retrieval
from cirjax.mining import audit
from cirjax.mining.blocks import DEFAULT_MEMORY_BUDGET, block_rows_for_budget
from cirjax.mining.driver import METHODS, hard_negative_sets
from cirjax.mining.groups import MiningGroup
from cirjax.mining.sets import HardNegativeSets
from cirjax.models.scoring import max_over_tokens


@dataclasses.dataclass(frozen=True)
class RoundOptions:
  """What a round mines and measures (`config.qure`'s mining keys)."""
  strategy: str = "qure"          # a mining strategy, or audit.ORACLE_STRATEGY
  k: int = 100                    # set size of the top-k strategies
  consecutive_threshold: int = 1
  strict_below: bool = False
  method: str = "auto"            # the mining path (`hard_negative_sets(method=)`)
  audit: bool = False             # audit every strategy: the dataset knows every relevant image

  @classmethod
  def from_config(cls, qc: ml_collections.ConfigDict, dataset: str) -> RoundOptions:
    """Checked at set-up, so a bad key fails now and not at the first mining epoch."""
    strategy = audit.check_strategy(qc.get("strategy", "qure"), dataset)
    if qc.get("mining_method", "auto") not in METHODS:
      raise ConfigError(f"config.qure.mining_method={qc.get('mining_method')!r}; expected "
                        f"one of {METHODS}")
    return cls(strategy=strategy, k=int(qc.get("k", 100)),
               consecutive_threshold=int(qc.get("consecutive_threshold", 1)),
               strict_below=bool(qc.get("strict_below", False)),
               method=str(qc.get("mining_method", "auto")),
               audit=dataset in audit.FULL_RELEVANT_DATASETS)


def mine_round(groups: list[MiningGroup], encode_targets: Callable[[np.ndarray], jax.Array],
               encode_queries: Callable[[np.ndarray], jax.Array],
               relevant: Callable[[MiningGroup], list[np.ndarray]], options: RoundOptions,
               temp: float) -> tuple[list[HardNegativeSets], dict]:
  """Every group's hard-negative sets and the round's numbers.

  `encode_targets(image_indices)` gives `[n, Q, D]` target features and
  `encode_queries(query_indices)` `[n, D]` composed queries (jax.Arrays on the mesh, or host
  arrays); `relevant(group)` each of the group's queries' relevant image ids (read only for
  the oracle strategy and the audit); `temp` the model's temperature (for the pair loss).
  """
  t0 = time.perf_counter()
  oracle = options.strategy == audit.ORACLE_STRATEGY
  strategy = "topk" if oracle else options.strategy
  kw = {} if strategy == "qure" else {"k": options.k}
  mesh = retrieval.make_mesh(jax.local_devices())
  times = {"encode_s": 0.0, "score_s": 0.0}
  sets, stats_all, pairs, audits = [], [], [], []
  for g in groups:
    block = _group_scores(g, encode_targets, encode_queries, mesh, times)
    hs, stats = hard_negative_sets(
        block, g.target_pos, strategy=strategy, image_ids=g.corpus,
        consecutive_threshold=options.consecutive_threshold,
        strict_below=options.strict_below, mesh=mesh, method=options.method,
        num_queries=len(g.queries), corpus_size=len(g.corpus), **kw)
    rel = relevant(g) if oracle or options.audit else None
    if oracle:
      hs = audit.without_relevant(hs, rel)
    pairs.append((_pair_stats(block, g, hs, temp), len(g.queries)))
    sets.append(hs)
    stats_all.append(stats)
    if options.audit:
      audits.append(_audit_group(block, g, hs, rel, options))
  out = _summary(stats_all, times, time.perf_counter() - t0)
  out.update(_merge_pair_stats(pairs))
  if audits:
    out.update(audit.audit_metrics(audit.merge(audits)))
  return sets, out


def _group_scores(g: MiningGroup, encode_targets, encode_queries, mesh, times: dict):
  """The block function `(a, b) -> [b - a, N]` of group `g`'s query x corpus scores, from
  features encoded now (corpus images once each) and kept on this process's devices."""
  t1 = time.perf_counter()
  uniq, inv = np.unique(g.corpus, return_inverse=True)
  tfeat = _on_local_mesh(encode_targets(uniq), mesh)
  qfeat = _on_local_mesh(encode_queries(g.queries), mesh)
  tdev = _expand_corpus(tfeat, _on_local_mesh(inv.astype(np.int32), mesh))
  times["encode_s"] += time.perf_counter() - t1

  def block(a, b):
    t2 = time.perf_counter()
    s = _block_scores(qfeat, tdev, a, size=b - a).block_until_ready()
    times["score_s"] += time.perf_counter() - t2
    return s

  return block


def _on_local_mesh(x: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
  """`x` on this process's devices, rows split over them when they divide evenly (else
  replicated). Several processes each need every row for their mining: they gather them
  once through the host."""
  spec = P("data") if x.shape[0] % mesh.devices.size == 0 else P()
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = encode_lib.host_tree(x)
  return jax.device_put(x, NamedSharding(mesh, spec))


@jax.jit
def _expand_corpus(t, inv):
  """The corpus in mining order ([N, Q, D]) from its unique images' features."""
  return jnp.take(t, inv, axis=0)


@functools.partial(jax.jit, static_argnames=("size",))
def _block_scores(q, t, start, *, size):
  """[size, N] max-over-tokens scores of queries start:start+size against the corpus."""
  qb = jax.lax.dynamic_slice_in_dim(q, start, size)
  return max_over_tokens(qb, t)


def _audit_group(block, g: MiningGroup, hs, rel, options: RoundOptions) -> dict:
  """Every strategy's pools from this mining's scores, audited against the full relevant
  sets (docs/mining.md#false-negatives); the trained strategy's sets are reused, and the
  oracle's own pools are audited too (`fn_share/topk_oracle`: 0 unless the filter failed)."""
  out = audit.audit_strategies(
      block, g.target_pos, rel, image_ids=g.corpus, k=options.k,
      consecutive_threshold=options.consecutive_threshold, strict_below=options.strict_below,
      num_queries=len(g.queries), corpus_size=len(g.corpus), mined={options.strategy: hs})
  if options.strategy == audit.ORACLE_STRATEGY:
    out[audit.ORACLE_STRATEGY] = audit.audit_pools(hs, rel, target_ids=g.corpus[g.target_pos])
  return out


def _pair_stats(block, g: MiningGroup, hs, temp: float) -> dict:
  """QuRe's loss and pair accuracy on one group's freshly mined negatives."""
  positions = np.zeros(int(g.corpus.max()) + 1, np.int64)
  positions[g.corpus] = np.arange(len(g.corpus))   # copies of an image score alike
  # The mining's own block rows: the block function is compiled per block shape.
  rows = min(block_rows_for_budget(len(g.corpus), DEFAULT_MEMORY_BUDGET),
             max(len(g.queries), 1))
  return audit.pair_stats(block, g.target_pos, hs, positions, temp, block_rows=rows)


def _merge_pair_stats(pairs) -> dict:
  """What the next epochs' pairs look like (`mined_pair_loss`, `mined_pair_acc`): the
  groups' numbers weighted by their query counts."""
  out = {}
  for key in ("pair_loss", "pair_acc"):
    w = np.array([n for p, n in pairs if np.isfinite(p[key])], np.float64)
    v = np.array([p[key] for p, _ in pairs if np.isfinite(p[key])], np.float64)
    out[f"mined_{key}"] = float((w * v).sum() / w.sum()) if w.size else float("nan")
  return out


def _summary(stats_all, times: dict, total: float) -> dict:
  """A mining round's set-size statistics and where its seconds went."""
  sizes = np.concatenate([s.set_size for s in stats_all])
  return {"set_size_mean": float(sizes.mean()), "set_size_median": float(np.median(sizes)),
          "set_size_max": int(sizes.max()), "empty_fraction": float((sizes == 0).mean()),
          "mining_s": total, "mining_encode_s": times["encode_s"],
          "mining_score_s": times["score_s"],
          "mining_sets_s": total - times["encode_s"] - times["score_s"]}


__all__ = ["RoundOptions", "mine_round"]

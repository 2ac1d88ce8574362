"""Mining groups: the mining corpora of a training run and the queries mined against each.

One corpus per training split (docs/reference_semantics.md#mining): CIRR and the synthetic
set mine over the split's images; FashionIQ (`per_triplet`), per category, over the targets
of that category's training triplets, one entry per triplet as the reference code builds it
(sets are then de-duplicated by image id).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cirjax.errors import ConfigError
from cirjax.data.records import CIRSplit, DataError
from cirjax.mining.sets import first_positions

TARGET_POSITIONS = ("first", "slot")


@dataclasses.dataclass(frozen=True, eq=False)
class MiningGroup:
  """One mining corpus and the training queries mined against it."""
  queries: np.ndarray     # global query indices
  corpus: np.ndarray      # [N] global image indices (may repeat)
  target_pos: np.ndarray  # [len(queries)] corpus position of each target


def mining_groups(train_splits: list[CIRSplit], names: dict[str, int], q_tgt: np.ndarray,
                  per_triplet: bool, target_position: str = "first") -> list[MiningGroup]:
  """One mining corpus per training split: its images, or (`per_triplet`, FashionIQ) the
  targets of its triplets, one entry per triplet as the reference code builds it.

  `names` maps an image name to its global index, `q_tgt` each global query to its target's.
  In a per-triplet corpus a target image repeats when several triplets share it. The
  reference takes as the query's target position the FIRST entry of its target image
  (`list.index`): `target_position="first"` (default). `"slot"` uses the query's own entry
  instead; copies score identically, so the two differ whenever the query is not the first
  copy of its target (docs/reference_semantics.md#mining).
  """
  if target_position not in TARGET_POSITIONS:
    raise ConfigError(f"config.qure.target_position={target_position!r}: use one of "
                      f"{TARGET_POSITIONS}")
  groups, start = [], 0
  for s in train_splits:
    nq = len(s.queries)
    qidx = np.arange(start, start + nq)
    if per_triplet:
      corpus = q_tgt[qidx].copy()
      tpos = (first_positions(corpus, corpus) if target_position == "first"
              else np.arange(nq, dtype=np.int32))
    else:
      corpus = np.array([names[n] for n in s.corpus], np.int32)
      pos = {int(g): i for i, g in enumerate(corpus)}
      missing = [s.queries[i - start].target for i in qidx if int(q_tgt[i]) not in pos]
      if missing:
        raise DataError(f"{s.name}: target {missing[0]!r} is not in the training corpus")
      tpos = np.array([pos[int(q_tgt[i])] for i in qidx], np.int32)
    groups.append(MiningGroup(qidx, corpus, tpos))
    start += nq
  return groups

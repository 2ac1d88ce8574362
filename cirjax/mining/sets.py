"""Hard-negative sets: the ragged per-query result of a mining, its statistics, the implicit
whole-corpus set, and the checks and de-duplication every mining path shares.

Sets are numpy arrays on the host, ragged: `indices[offsets[i]:offsets[i+1]]` is query `i`'s
set. With `image_ids` (corpus entries may repeat an image) a set holds unique image ids in
order of first occurrence, without the target's id (`dedup_minus_target`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

# `MiningStats.status` codes.
STATUS_OK = 0
STATUS_FEW_AFTER = 1      # fewer than 3 entries after the target
STATUS_NO_PAIR = 2        # every pair of steepest drops lies too close together
STATUS_EMPTY_AFTER_DEDUP = 3  # the set held only copies of the target's image id
STATUS_NAMES = {STATUS_OK: "ok", STATUS_FEW_AFTER: "fewer than 3 after target",
                STATUS_NO_PAIR: "no acceptable pair of drops",
                STATUS_EMPTY_AFTER_DEDUP: "only the target's image id"}


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


def check_targets(target_index, q: int, n: int) -> np.ndarray:
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


def check_image_ids(image_ids, n: int) -> Optional[np.ndarray]:
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


def dedup_minus_target(offsets, flat, target_ids, key_bits: int = 63):
  """Per segment: unique values in order of first occurrence, minus the target's id."""
  q = len(offsets) - 1
  seg = np.repeat(np.arange(q, dtype=np.int64), np.diff(offsets))
  keep = flat != target_ids[seg]
  keep &= _first_occurrences(seg, flat, key_bits)
  sizes = np.bincount(seg[keep], minlength=q) if q else np.zeros(0, np.int64)
  new_offsets = np.zeros(q + 1, np.int64)
  np.cumsum(sizes, out=new_offsets[1:])
  return new_offsets, flat[keep]


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
  targets = check_targets(t, t.shape[0] if t.ndim == 1 else -1, n)
  ids = check_image_ids(ids, n) if ids is not None else np.arange(n, dtype=np.int32)
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

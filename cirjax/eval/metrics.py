"""CIR metrics, computed exactly as the benchmarks' reference code computes them.

Every function takes rankings (corpus indices, best first) or scores as NumPy arrays and
returns percentages (0-100), as the papers and the reference scripts report them.

Conventions (docs/reference_semantics.md#metrics):
* Recall@K: the annotated target is among the first K entries of the ranking.
* CIRR: the ranking has the reference image removed *before* ranks are counted (the
  retrieval excludes it); Recall_subset@K ranks only the query's `img_set` members minus the
  reference. Headline = (R@5 + R_subset@1) / 2.
* CIRCO mAP@K (official `evaluation.py`): precision at the rank of every ground-truth hit in
  the first K, summed, divided by min(K, #ground truths); the mean over queries.
* GeneCIS: each query ranks its own gallery plus the target; R@{1,2,3}. A gallery image that
  ties the target's score counts as ranked before it (a constant scorer cannot score 1.0).
* HP-FashionIQ (QuRe Eqs. 8-9): a set's score is the mean of the model's scores of its five
  images; the preference rate is P(Set 1 preferred | Set 1 scored higher): among the queries
  whose set 1 the model scores strictly higher, the share where people preferred set 1 (the
  reference's `evaluate_preference_ratio`). `preference_agreement` is the symmetric variant
  (both directions, ties excluded and counted).

Nothing here drops a query silently: a ranking too short for the K asked for, a target id
that is not a valid index, or an empty ground-truth set is an error.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)
FASHIONIQ_KS = (10, 50)
GENECIS_KS = (1, 2, 3)


def _check_ranking(ranking: np.ndarray, ks: Iterable[int], what: str) -> np.ndarray:
  ranking = np.asarray(ranking)
  if ranking.ndim != 2:
    raise ValueError(f"{what}: ranking must be [queries, K], got shape {ranking.shape}")
  if ranking.shape[0] == 0:
    raise ValueError(f"{what}: no queries to evaluate (empty ranking)")
  kmax = max(ks)
  if ranking.shape[1] < kmax:
    raise ValueError(f"{what}: ranking has {ranking.shape[1]} entries per query, "
                     f"fewer than K={kmax}; retrieve at least {kmax}")
  return ranking


def target_hits(ranking: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """[Q, K] booleans: ranking[q, j] == targets[q]."""
  targets = np.asarray(targets)
  if targets.shape != (ranking.shape[0],):
    raise ValueError(f"targets must have shape ({ranking.shape[0]},), got {targets.shape}")
  if np.any(targets < 0):
    bad = int(np.flatnonzero(targets < 0)[0])
    raise ValueError(f"query {bad} has no target (index {int(targets[bad])}); targetless "
                     "splits (test) can only be written as submissions")
  return ranking == targets[:, None]


def recall_at_k(ranking: np.ndarray, targets: np.ndarray,
                ks: Sequence[int] = CIRR_KS) -> dict[str, float]:
  """Recall@K in percent: share of queries whose target is in the first K of `ranking`."""
  ranking = _check_ranking(ranking, ks, "recall_at_k")
  hits = target_hits(ranking, targets)
  return {f"R@{k}": float(hits[:, :k].any(axis=1).mean() * 100.0) for k in ks}


def recall_at_k_of_scores(scores: np.ndarray, targets: np.ndarray,
                          ks: Sequence[int] = CIRR_KS) -> dict[str, float]:
  """Recall@K in percent from a full `[Q, N]` score matrix (higher is better, ties by column
  index); a K above the N columns is left out."""
  scores = np.asarray(scores)
  k = min(max(ks), scores.shape[1])
  ranking = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return recall_at_k(ranking, targets, [x for x in ks if x <= k])


def cirr_metrics(ranking_without_reference: np.ndarray, targets: np.ndarray,
                 subset_ranking: np.ndarray | None) -> dict[str, float]:
  """CIRR R@{1,5,10,50} (reference already removed) and Recall_subset@{1,2,3}.

  Args:
    ranking_without_reference: [Q, >=50] corpus indices, best first, the reference excluded.
    targets: [Q] corpus index of `target_hard`.
    subset_ranking: [Q, S] corpus indices of the query's `img_set` members minus the
      reference, best first (S is 5 in CIRR). None skips the subset metrics.
  """
  out = recall_at_k(ranking_without_reference, targets, CIRR_KS)
  if subset_ranking is not None:
    subset_ranking = np.asarray(subset_ranking)
    hits = target_hits(subset_ranking, targets)
    missing = np.flatnonzero(~hits.any(axis=1))
    if missing.size:
      raise ValueError(f"{missing.size} queries have a target that is not among their img_set "
                       f"members (first: query {int(missing[0])}); the subset metric "
                       "would be computed on a shrunken set")
    for k in CIRR_SUBSET_KS:
      out[f"Rsubset@{k}"] = float(hits[:, :k].any(axis=1).mean() * 100.0)
    out["avg"] = (out["R@5"] + out["Rsubset@1"]) / 2.0
  return out


def average_precision_at_k(ranking: np.ndarray, relevant: Sequence[Iterable[int]],
                           ks: Sequence[int] = CIRCO_KS) -> dict[str, np.ndarray]:
  """Per-query AP@K with the official CIRCO formula. Returns {f"AP@{k}": [Q] fractions}."""
  ranking = _check_ranking(ranking, ks, "average_precision_at_k")
  if len(relevant) != ranking.shape[0]:
    raise ValueError(f"{len(relevant)} relevant sets for {ranking.shape[0]} queries")
  kmax = max(ks)
  top = ranking[:, :kmax]
  aps = {k: np.zeros(ranking.shape[0]) for k in ks}
  for q, rel in enumerate(relevant):
    rel = np.unique(np.asarray(list(rel), dtype=np.int64))
    if rel.size == 0:
      raise ValueError(f"query {q} has an empty ground-truth set")
    labels = np.isin(top[q], rel)
    precisions = np.cumsum(labels) * labels / np.arange(1, kmax + 1)
    for k in ks:
      aps[k][q] = precisions[:k].sum() / min(rel.size, k)
  return {f"AP@{k}": v for k, v in aps.items()}


def map_at_k(ranking: np.ndarray, relevant: Sequence[Iterable[int]],
             ks: Sequence[int] = CIRCO_KS, prefix: str = "mAP") -> dict[str, float]:
  """mAP@K in percent over all queries (CIRCO's metric)."""
  aps = average_precision_at_k(ranking, relevant, ks)
  return {f"{prefix}@{k}": float(aps[f"AP@{k}"].mean() * 100.0) for k in ks}


def relevant_share_at_k(ranking: np.ndarray, relevant: Sequence[Iterable[int]],
                        k: int = 5) -> float:
  """Mean share (percent) of the first k results that are relevant (precision@k)."""
  ranking = _check_ranking(ranking, [k], "relevant_share_at_k")
  if len(relevant) != ranking.shape[0]:
    raise ValueError(f"{len(relevant)} relevant sets for {ranking.shape[0]} queries")
  shares = [np.isin(ranking[q, :k], np.asarray(list(r), dtype=np.int64)).sum() / k
            for q, r in enumerate(relevant)]
  return float(np.mean(shares) * 100.0)


def fashioniq_metrics(per_category: Mapping[str, tuple[np.ndarray, np.ndarray]]
                      ) -> dict[str, float]:
  """R@10/R@50 per category plus the averages of QuRe Table 2.

  Args:
    per_category: category -> (ranking [Q, >=50], targets [Q]) over that category's corpus.
  Returns: "{cat}/R@10", "{cat}/R@50", "avg/R@10", "avg/R@50" (means over categories) and
    "avg" (mean of the two averages, the "Avg." column).
  """
  if not per_category:
    raise ValueError("fashioniq_metrics: no categories given")
  per = {cat: recall_at_k(ranking, targets, FASHIONIQ_KS)
         for cat, (ranking, targets) in per_category.items()}
  out = {f"{cat}/{name}": v for cat, m in per.items() for name, v in m.items()}
  return {**out, **fashioniq_average(per)}


def fashioniq_average(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """The averages of QuRe Table 2 from each category's `R@10` and `R@50`: "avg/R@10",
  "avg/R@50" (means over the categories) and "avg" (their mean, the "Avg." column)."""
  out = {f"avg/R@{k}": float(np.mean([m[f"R@{k}"] for m in per_category.values()]))
         for k in FASHIONIQ_KS}
  out["avg"] = (out["avg/R@10"] + out["avg/R@50"]) / 2.0
  return out


def genecis_recall(target_scores: np.ndarray, gallery_scores: Sequence[np.ndarray],
                   ks: Sequence[int] = GENECIS_KS) -> dict[str, float]:
  """GeneCIS R@K: the target's rank among itself and its query's gallery.

  Args:
    target_scores: [Q] the model's score of each query's target.
    gallery_scores: per query, the scores of its gallery (distractor) images.
  """
  target_scores = np.asarray(target_scores, dtype=np.float64)
  if target_scores.ndim != 1 or target_scores.size == 0:
    raise ValueError(f"genecis_recall: need [Q>0] target scores, got {target_scores.shape}")
  if len(gallery_scores) != target_scores.size:
    raise ValueError(f"{len(gallery_scores)} galleries for {target_scores.size} queries")
  # Rank 0 = best. Ties count against the target (see module docstring).
  ranks = np.array([int(np.sum(np.asarray(g) >= t))
                    for t, g in zip(target_scores, gallery_scores)])
  if np.isnan(target_scores).any() or any(np.isnan(np.asarray(g)).any() for g in gallery_scores):
    raise ValueError("genecis_recall: NaN scores")
  return {f"R@{k}": float((ranks < k).mean() * 100.0) for k in ks}


def _set_scores(set1_scores, set2_scores, preferred, fn: str):
  """Eq. 8 (a set's score = the mean of its images' scores), with the inputs checked."""
  s1 = np.asarray(set1_scores, dtype=np.float64)
  s2 = np.asarray(set2_scores, dtype=np.float64)
  preferred = np.asarray(preferred)
  if s1.shape != s2.shape or s1.ndim != 2 or s1.shape[0] != preferred.shape[0]:
    raise ValueError(f"{fn}: shapes {s1.shape}, {s2.shape}, {preferred.shape} "
                     "do not line up as [Q, n], [Q, n], [Q]")
  if s1.shape[0] == 0:
    raise ValueError(f"{fn}: no queries")
  if not np.isin(preferred, (1, 2)).all():
    raise ValueError(f"{fn}: `preferred` must be 1 or 2 for every query")
  m1, m2 = s1.mean(axis=1), s2.mean(axis=1)
  if np.isnan(m1).any() or np.isnan(m2).any():
    raise ValueError(f"{fn}: NaN scores")
  return m1, m2, preferred


def preference_rate(set1_scores: np.ndarray, set2_scores: np.ndarray,
                    preferred: np.ndarray) -> dict[str, float]:
  """HP-FashionIQ preference rate, QuRe Eq. 9: P(Set 1 preferred | s_rel(Set 1) > s_rel(Set 2)).

  Exactly the reference's `evaluate_preference_ratio`: only the queries whose set 1 the model
  scores strictly higher count (set scores by Eq. 8, the mean over the set's images), and the
  rate is the share of them where people preferred set 1. Queries the model scores the other
  way, or tied, are not in the rate (`n_set1_higher` is how many are). With no such query the
  rate is undefined: NaN (the reference returns 0.0 there).

  Args:
    set1_scores, set2_scores: [Q, 5] the model's scores of each set's five images.
    preferred: [Q] 1 or 2, the set people preferred.
  Returns: {"preference_rate": percent, "n_set1_higher": queries with set 1 scored higher,
    "n_total": Q}.
  """
  m1, m2, preferred = _set_scores(set1_scores, set2_scores, preferred, "preference_rate")
  cond = m1 > m2
  rate = float((preferred[cond] == 1).mean() * 100.0) if cond.any() else float("nan")
  return {"preference_rate": rate, "n_set1_higher": int(cond.sum()), "n_total": int(len(m1))}


def preference_agreement(set1_scores: np.ndarray, set2_scores: np.ndarray,
                         preferred: np.ndarray) -> dict[str, float]:
  """The symmetric variant of the preference rate (not the paper's Eq. 9): the share of all
  queries where the set the model scores higher is the one people preferred, in both
  directions; queries whose two set scores tie are excluded and counted (NaN when all tie).

  Returns: {"preference_agreement": percent, "n_decided": Q not tied, "n_ties": Q tied}.
  """
  m1, m2, preferred = _set_scores(set1_scores, set2_scores, preferred, "preference_agreement")
  decided = m1 != m2
  agree = (np.where(m1 > m2, 1, 2) == preferred)[decided]
  # Every pair tied (a model that cannot tell the sets apart): undefined, as Eq. 9's rate.
  return {"preference_agreement": float(agree.mean() * 100.0) if decided.any() else float("nan"),
          "n_decided": int(decided.sum()), "n_ties": int((~decided).sum())}


def chance_recall(num_candidates: int, ks: Sequence[int]) -> dict[str, float]:
  """Expected Recall@K (percent) of a uniformly random ranking of `num_candidates`."""
  return {f"R@{k}": 100.0 * min(k, num_candidates) / num_candidates for k in ks}


def chance_map(num_candidates: int, relevant_sizes: Sequence[int],
               ks: Sequence[int] = CIRCO_KS) -> dict[str, float]:
  """Expected mAP@K (percent) of a uniformly random ranking, exactly.

  By linearity: the item at rank i is relevant with probability r/n, and given that, the
  expected precision at i is (1 + (i-1)(r-1)/(n-1)) / i. AP@K sums these over i <= K and
  divides by min(r, K), as `average_precision_at_k` does.
  """
  n = int(num_candidates)
  r = np.asarray(relevant_sizes, dtype=np.float64)
  if n < 1 or r.size == 0 or (r < 1).any() or (r > n).any():
    raise ValueError(f"chance_map: need 1 <= relevant sizes <= {n} candidates")
  out = {}
  for k in ks:
    i = np.arange(1, min(k, n) + 1, dtype=np.float64)[None, :]
    rr = r[:, None]
    prec = (1.0 + (i - 1.0) * (rr - 1.0) / max(n - 1, 1)) / i
    ap = (rr / n * prec).sum(axis=1) / np.minimum(r, k)
    out[f"mAP@{k}"] = float(ap.mean() * 100.0)
  return out

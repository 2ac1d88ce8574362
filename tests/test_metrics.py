"""Metrics against hand-worked examples and against direct re-implementations of the
reference formulas (CLIP4Cir/SPRC CIRR code, CIRCO's official evaluation.py) on random
rankings."""

import numpy as np
import pytest

from cirjax.eval import metrics


def test_recall_hand_worked():
  ranking = np.array([[3, 1, 2, 0], [0, 1, 2, 3], [2, 3, 0, 1]])
  targets = np.array([1, 0, 1])
  r = metrics.recall_at_k(ranking, targets, ks=(1, 2, 4))
  assert r == {"R@1": pytest.approx(100 / 3), "R@2": pytest.approx(200 / 3), "R@4": 100.0}


def test_recall_of_scores_ranks_ties_by_column_and_drops_large_k():
  scores = np.array([[0.1, 0.9, 0.5], [0.7, 0.7, 0.2], [0.3, 0.2, 0.1]])
  targets = np.array([2, 1, 2])
  r = metrics.recall_at_k_of_scores(scores, targets, ks=(1, 2, 5))
  assert r == {"R@1": 0.0, "R@2": pytest.approx(200 / 3)}


def test_recall_refuses_short_ranking_and_targetless_queries():
  with pytest.raises(ValueError, match="fewer than K=50"):
    metrics.recall_at_k(np.zeros((2, 10), int), np.zeros(2, int), ks=(1, 50))
  with pytest.raises(ValueError, match="no target"):
    metrics.recall_at_k(np.zeros((2, 5), int), np.array([0, -1]), ks=(1,))


def test_circo_map_hand_worked():
  # GT {7, 9, 4}; ranking 7, 1, 9, 2, 3 -> hits at ranks 1 and 3.
  ranking = np.array([[7, 1, 9, 2, 3, 4]])
  m = metrics.map_at_k(ranking, [[7, 9, 4]], ks=(1, 5, 6))
  assert m["mAP@1"] == pytest.approx(100.0)  # 1/1 / min(3, 1)
  assert m["mAP@5"] == pytest.approx(100 * (1 + 2 / 3) / 3)
  assert m["mAP@6"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 6) / 3)


def test_cirr_subset_and_headline_hand_worked():
  ranking = np.tile(np.arange(50), (2, 1))
  targets = np.array([0, 7])
  subset = np.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
  m = metrics.cirr_metrics(ranking, targets, subset)
  assert m["R@1"] == 50.0 and m["R@5"] == 50.0 and m["R@10"] == 100.0
  assert m["Rsubset@1"] == 50.0 and m["Rsubset@2"] == 50.0 and m["Rsubset@3"] == 100.0
  assert m["avg"] == 50.0
  with pytest.raises(ValueError, match="not among their img_set"):
    metrics.cirr_metrics(ranking, targets, np.array([[1, 2], [5, 7]]))


def test_genecis_ties_count_against_target():
  r = metrics.genecis_recall(np.array([1.0, 0.5, 0.2]),
                             [np.array([0.0, 0.1]), np.array([0.9, 0.5, 0.1]),
                              np.array([0.3, 0.4, 0.5])])
  # ranks: 0, 2 (0.9 and the tie 0.5 before it), 3
  assert r == {"R@1": pytest.approx(100 / 3), "R@2": pytest.approx(100 / 3),
               "R@3": pytest.approx(200 / 3)}
  const = metrics.genecis_recall(np.zeros(4), [np.zeros(9)] * 4)
  assert const["R@3"] == 0.0


def test_preference_rate_hand_worked():
  s1 = np.array([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [2, 2, 2, 2, 2.]])
  s2 = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [2, 2, 2, 2, 2.]])
  pref = np.array([1, 1, 2])
  # Eq. 9 conditions on set 1 scoring higher: only query 0 counts, and its set 1 was preferred.
  assert metrics.preference_rate(s1, s2, pref) == {"preference_rate": 100.0, "n_set1_higher": 1,
                                                   "n_total": 3}
  # The symmetric variant counts query 1 too (set 2 scored higher, set 1 preferred: disagree).
  assert metrics.preference_agreement(s1, s2, pref) == {"preference_agreement": 50.0,
                                                        "n_decided": 2, "n_ties": 1}
  # Every pair tied: both are undefined, and evaluation goes on.
  tied = metrics.preference_agreement(s1, s1, pref)
  assert np.isnan(tied["preference_agreement"]) and tied["n_ties"] == 3
  # No query with set 1 scored higher (one lower, one tied): Eq. 9 is undefined.
  assert np.isnan(metrics.preference_rate(s2[[0, 2]], s1[[0, 2]], pref[[0, 2]])["preference_rate"])


def _reference_preference_ratio(model_list_1, model_list_2, preferred_set):
  """QuRe's `evaluate_preference_ratio` (HP_FashionIQ/evaluate.py), verbatim in logic."""
  conditioned_total = 0
  preferred_count = 0
  for m1, m2, p in zip(model_list_1, model_list_2, preferred_set):
    if m1 > m2:
      conditioned_total += 1
      if p == "1":
        preferred_count += 1
  return preferred_count / conditioned_total


def test_preference_rate_is_eq9_on_random_cases():
  rng = np.random.default_rng(11)
  for trial in range(20):
    n_q = int(rng.integers(5, 60))
    # Coarse scores so that ties between the two set means occur too.
    s1, s2 = rng.integers(0, 4, (n_q, 5)) / 4, rng.integers(0, 4, (n_q, 5)) / 4
    pref = rng.integers(1, 3, n_q)
    m1, m2 = s1.mean(1), s2.mean(1)
    if not (m1 > m2).any():
      continue
    # Eq. 9 by its definition: P(A preferred | s(A) > s(B)) with A = set 1.
    want = np.sum((m1 > m2) & (pref == 1)) / np.sum(m1 > m2) * 100
    got = metrics.preference_rate(s1, s2, pref)
    assert got["preference_rate"] == pytest.approx(want)
    assert got["preference_rate"] == pytest.approx(
        100 * _reference_preference_ratio(m1, m2, [str(p) for p in pref]))
    assert got["n_set1_higher"] == np.sum(m1 > m2) and got["n_total"] == n_q


def test_fashioniq_averages():
  rk = np.tile(np.arange(60), (2, 1))
  per = {"dress": (rk, np.array([0, 55])), "shirt": (rk, np.array([20, 30])),
         "toptee": (rk, np.array([0, 1]))}
  m = metrics.fashioniq_metrics(per)
  assert m["dress/R@10"] == 50 and m["dress/R@50"] == 50
  assert m["shirt/R@10"] == 0 and m["shirt/R@50"] == 100 and m["toptee/R@10"] == 100
  assert m["avg/R@10"] == pytest.approx(50.0) and m["avg/R@50"] == pytest.approx(250 / 3)
  assert m["avg"] == pytest.approx((50 + 250 / 3) / 2)


# ---------------------------------------------------------------- reference re-implementations

def _reference_cirr(full_sorted_names, reference_names, target_names, group_members):
  """CLIP4Cir/SPRC `compute_cirr_val_metrics`, names-based, on a full sorted corpus."""
  n_q, n = full_sorted_names.shape
  ref_mask = full_sorted_names != np.repeat(np.array(reference_names), n).reshape(n_q, -1)
  sorted_names = full_sorted_names[ref_mask].reshape(n_q, n - 1)
  labels = sorted_names == np.repeat(np.array(target_names), n - 1).reshape(n_q, -1)
  group_members = np.array(group_members)
  group_mask = (sorted_names[..., None] == group_members[:, None, :]).sum(-1).astype(bool)
  group_labels = labels[group_mask].reshape(labels.shape[0], -1)
  out = {f"R@{k}": labels[:, :k].sum() / n_q * 100 for k in (1, 5, 10, 50)}
  out.update({f"Rsubset@{k}": group_labels[:, :k].sum() / n_q * 100 for k in (1, 2, 3)})
  return out


def test_cirr_matches_reference_code_on_random_rankings():
  rng = np.random.default_rng(0)
  n, n_q = 120, 40
  names = np.array([f"img{i}" for i in range(n)])
  scores = rng.normal(size=(n_q, n))
  full = np.argsort(-scores, axis=1, kind="stable")
  refs = rng.integers(0, n, n_q)
  members, targets = [], []
  for q in range(n_q):
    others = rng.choice(np.setdiff1d(np.arange(n), [refs[q]]), 5, replace=False)
    members.append(np.concatenate([[refs[q]], others]))
    targets.append(others[rng.integers(0, 5)])
  targets = np.array(targets)
  ref = _reference_cirr(names[full], names[refs], names[targets],
                        [names[m] for m in members])
  without_ref = np.array([[i for i in row if i != r] for row, r in zip(full, refs)])
  subset = np.array([[i for i in row if i in set(m[1:])] for row, m in zip(without_ref, members)])
  ours = metrics.cirr_metrics(without_ref[:, :50], targets, subset)
  for k, v in ref.items():
    assert ours[k] == pytest.approx(v), k


def _reference_circo_ap(predictions, gt_img_ids, rank):
  """CIRCO `evaluation.py` compute_metrics, one query."""
  ap_labels = np.isin(predictions, gt_img_ids)
  precisions = np.cumsum(ap_labels, axis=0) * ap_labels
  precisions = precisions / np.arange(1, ap_labels.shape[0] + 1)
  return float(np.sum(precisions[:rank]) / min(len(gt_img_ids), rank))


def test_circo_map_matches_official_code_on_random_rankings():
  rng = np.random.default_rng(1)
  n, n_q = 300, 50
  ranking = np.stack([rng.permutation(n)[:50] for _ in range(n_q)])
  gts = [rng.choice(n, rng.integers(1, 23), replace=False) for _ in range(n_q)]
  # Plant some hits so the numbers are not all zero.
  for q in range(0, n_q, 3):
    ranking[q, rng.integers(0, 50, 3)] = gts[q][0]
  ranking = np.stack([np.array(list(dict.fromkeys(r)) + [x for x in range(n) if x not in r])[:50]
                      for r in ranking])
  ours = metrics.map_at_k(ranking, gts)
  for k in (5, 10, 25, 50):
    ref = np.mean([_reference_circo_ap(ranking[q], gts[q], k) for q in range(n_q)]) * 100
    assert ours[f"mAP@{k}"] == pytest.approx(ref)


def test_relevant_share():
  r = metrics.relevant_share_at_k(np.array([[1, 2, 3, 4, 5, 6]]), [[2, 5, 6]], k=5)
  assert r == pytest.approx(40.0)


def test_fashioniq_matches_reference_code_on_random_rankings():
  """CLIP4Cir/SPRC `compute_fiq_val_metrics`: labels = sorted names == target; R@K = mean."""
  rng = np.random.default_rng(2)
  n, n_q = 200, 60
  names = np.array([f"B{i:04d}" for i in range(n)])
  full = np.stack([rng.permutation(n) for _ in range(n_q)])
  targets = np.where(rng.random(n_q) < 0.5, full[np.arange(n_q), rng.integers(0, 60, n_q)],
                     rng.integers(0, n, n_q))
  labels = names[full] == np.repeat(names[targets], n).reshape(n_q, n)
  ours = metrics.recall_at_k(full[:, :50], targets, metrics.FASHIONIQ_KS)
  for k in (10, 50):
    assert ours[f"R@{k}"] == pytest.approx(np.sum(labels[:, :k]) / n_q * 100)


def test_genecis_and_preference_rate_match_direct_formulas_on_random_scores():
  rng = np.random.default_rng(3)
  n_q = 80
  ts = rng.random(n_q)
  gal = [rng.random(rng.integers(5, 15)) for _ in range(n_q)]
  # GeneCIS eval: sort [target] + gallery by descending score, the target's position is its rank.
  ranks = [int(np.flatnonzero(np.argsort(-np.concatenate([[t], g]), kind="stable") == 0)[0])
           for t, g in zip(ts, gal)]
  r = metrics.genecis_recall(ts, gal)
  for k in (1, 2, 3):
    assert r[f"R@{k}"] == pytest.approx(np.mean(np.array(ranks) < k) * 100)
  s1, s2 = rng.random((n_q, 5)), rng.random((n_q, 5))
  pref = rng.integers(1, 3, n_q)
  want = np.mean([(1 if a.mean() > b.mean() else 2) == p for a, b, p in zip(s1, s2, pref)]) * 100
  assert metrics.preference_agreement(s1, s2, pref)["preference_agreement"] == pytest.approx(want)
  want = np.mean([p == 1 for a, b, p in zip(s1, s2, pref) if a.mean() > b.mean()]) * 100
  assert metrics.preference_rate(s1, s2, pref)["preference_rate"] == pytest.approx(want)


def test_chance_map_is_exact_by_enumeration():
  import itertools
  n = 6
  for r in (1, 2, 4):
    rel = list(range(r))
    perms = np.array(list(itertools.permutations(range(n))))
    aps = metrics.average_precision_at_k(perms, [rel] * len(perms), ks=(1, 3, 6))
    want = {f"mAP@{k}": aps[f"AP@{k}"].mean() * 100 for k in (1, 3, 6)}
    got = metrics.chance_map(n, [r], ks=(1, 3, 6))
    for k in want:
      assert got[k] == pytest.approx(want[k]), (r, k)

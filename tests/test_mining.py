"""cirjax.mining against a plain NumPy/Python reference written from docs/mining.md."""

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cirjax import mining
from cirjax.mining import sets as mining_sets


@pytest.fixture(params=["numpy", "xla"])
def method(request):
  """Every test runs both paths: NumPy (the CPU default) and the jitted XLA kernels."""
  return request.param


@pytest.fixture(params=["numpy", pytest.param("xla", marks=pytest.mark.slow)])
def property_method(request):
  """The generated-problem tests: the XLA path's run is slow (a compile per problem shape).
  By default it is held to the reference through the NumPy path, which
  tests/test_mining_paths.py checks bit for bit against it on adversarial problems."""
  return request.param


# ---------------------------------------------------------------------------------------
# The reference: the algorithm of docs/mining.md, step by step, one query at a time.


def ref_qure(row, t, threshold=1, strict_below=False):
  """Corpus positions of the hard-negative set, descending score order."""
  s = np.asarray(row, np.float32)
  n = len(s)
  order = sorted(range(n), key=lambda j: (-float(s[j]), j))      # 1. stable, ties by position
  a = s[order]
  p = order.index(t)                                               # 2. target's position
  if strict_below:
    start = next((i for i in range(n) if a[i] < s[t]), n)
  else:
    start = p + 1
  after = a[start:]
  if len(after) < 3:                                               # 7. too short
    return []
  d = [np.float32(after[j + 1] - after[j]) for j in range(len(after) - 1)]  # 3. drops
  ranking = sorted(range(len(d)), key=lambda j: (float(d[j]), j))
  for r in range(len(ranking) - 1):                                # 4. adjacent pairs
    i1, i2 = sorted((ranking[r], ranking[r + 1]))
    if i2 - i1 > threshold:
      return order[start + i1 + 1:start + i2 + 1]                  # 5. inclusive ends
  return []


def ref_topk(row, t, k):
  s = np.asarray(row, np.float32)
  order = sorted(range(len(s)), key=lambda j: (-float(s[j]), j))
  return [j for j in order if j != t][:k]


def ref_after_topk(row, t, k, strict_below=False):
  s = np.asarray(row, np.float32)
  order = sorted(range(len(s)), key=lambda j: (-float(s[j]), j))
  if strict_below:
    return [j for j in order if s[j] < s[t]][:k]
  return order[order.index(t) + 1:][:k]


def ref_ids(positions, ids, target_id):
  """6. unique image ids, first occurrence kept, target's id removed."""
  out = []
  for p in positions:
    i = int(ids[p])
    if i != target_id and i not in out:
      out.append(i)
  return out


def assert_sets_equal(sets, expected):
  assert sets.num_queries == len(expected)
  for i, e in enumerate(expected):
    np.testing.assert_array_equal(sets[i], np.asarray(e, np.int64), err_msg=f"query {i}")
  assert sets.offsets[0] == 0 and sets.offsets[-1] == len(sets.indices)


# ---------------------------------------------------------------------------------------
# Worked example and named edge cases.


def test_worked_example(method):
  s = np.array([[5, 4.9, 4.8, 3, 2.9, 2.8, 2.7, 1, 0.9]], np.float32)
  sets, stats = mining.hard_negative_sets(s, [1], method=method)
  np.testing.assert_array_equal(sets[0], [3, 4, 5, 6])
  assert stats.target_rank[0] == 1 and stats.num_after[0] == 7
  assert stats.gap1[0] == 2 and stats.gap2[0] == 6   # drops between positions 2|3 and 6|7
  np.testing.assert_allclose(stats.gap1_size[0], 1.8, rtol=1e-6)
  np.testing.assert_allclose(stats.gap2_size[0], 1.7, rtol=1e-6)
  assert stats.status[0] == mining.STATUS_OK
  assert ref_qure(s[0], 1) == [3, 4, 5, 6]


def test_target_last_and_short_lists_are_empty_and_counted(method):
  s = np.array([[4, 3, 2, 1, 0], [4, 3, 2, 1, 0], [4, 3, 2, 1, 0]], np.float32)
  # 0, 2 and 3 entries after the target.
  sets, stats = mining.hard_negative_sets(s, [4, 2, 1], method=method)
  assert list(sets.sizes) == [0, 0, 0]   # 3 equal drops: pair (1, 2) is adjacent -> none
  assert list(stats.status) == [mining.STATUS_FEW_AFTER, mining.STATUS_FEW_AFTER,
                                mining.STATUS_NO_PAIR]
  assert stats.summary()["empty"] == 3


def test_positional_ties_vs_strict_below(method):
  # Entries tied with the target and sorted after it count as "after" unless strict_below.
  row = np.array([9, 5, 5, 5, 1, 0.75, 0.5, 0.25], np.float32)
  for strict in (False, True):
    sets, _ = mining.hard_negative_sets(row[None], [1], strict_below=strict, method=method)
    assert list(sets[0]) == ref_qure(row, 1, strict_below=strict)
  a, _ = mining.hard_negative_sets(row[None], [1], method=method)
  b, _ = mining.hard_negative_sets(row[None], [1], strict_below=True, method=method)
  assert list(a[0]) == [3, 4, 5, 6] and list(b[0]) == []  # strict: all drops equal


def test_image_ids_dedup_and_target_removed(method):
  # Corpus entries 0..7 with repeating image ids; the target's image appears twice.
  s = np.array([[9, 8, 8, 7.9, 7.8, 7.8, 3, 2.9, 0]], np.float32)
  ids = np.array([10, 11, 11, 12, 10, 13, 14, 15, 16])
  sets, stats = mining.hard_negative_sets(s, [0], image_ids=ids, method=method)
  pos = ref_qure(s[0], 0)
  assert list(sets[0]) == ref_ids(pos, ids, 10)
  assert 10 not in sets[0] and len(set(sets[0])) == len(sets[0])
  assert stats.span[0] == len(pos)


def test_set_of_only_target_copies_is_empty_after_dedup(method):
  s = np.array([[9, 8, 3, 3, 0]], np.float32)   # set = entries 2, 3: copies of the target
  ids = np.array([0, 1, 0, 0, 2])
  sets, stats = mining.hard_negative_sets(s, [0], image_ids=ids, method=method)
  assert stats.span[0] > 0 and sets.sizes[0] == 0
  assert stats.status[0] == mining.STATUS_EMPTY_AFTER_DEDUP


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_corpora_give_empty_sets(n, method):
  s = np.arange(n, dtype=np.float32)[None].repeat(n, 0)
  sets, stats = mining.hard_negative_sets(s, np.arange(n), method=method)
  assert sets.offsets[-1] == 0 and (stats.status == mining.STATUS_FEW_AFTER).all()


def test_bad_input_errors_name_the_argument(method):
  s = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
  bad = s.copy()
  bad[2, 7] = np.nan
  with pytest.raises(ValueError, match=r"row 2 .* column 7"):
    mining.hard_negative_sets(bad, [0, 0, 0, 0], method=method)
  bad[2, 7] = np.inf
  with pytest.raises(ValueError, match=r"row 2 .*inf at column 7"):
    mining.hard_negative_sets(bad, [0, 0, 0, 0], block_size=1, method=method)
  with pytest.raises(ValueError, match=r"target_index\[1\] = 10"):
    mining.hard_negative_sets(s, [0, 10, 0, 0], method=method)
  with pytest.raises(ValueError, match="target_index must have shape"):
    mining.hard_negative_sets(s, [0, 0, 0], method=method)
  with pytest.raises(ValueError, match="corpus is empty"):
    mining.hard_negative_sets(np.zeros((2, 0), np.float32), [0, 0], method=method)
  with pytest.raises(ValueError, match="k=11"):
    mining.hard_negative_sets(s, [0] * 4, strategy="topk", k=11, method=method)
  with pytest.raises(ValueError, match="image_ids must have shape"):
    mining.hard_negative_sets(s, [0] * 4, image_ids=np.arange(9), method=method)
  with pytest.raises(ValueError, match="scores must be a"):
    mining.hard_negative_sets(s[0], [0], method=method)
  with pytest.raises(ValueError, match="num_queries"):
    mining.hard_negative_sets(lambda a, b: s[a:b], [0] * 4, method=method)
  with pytest.raises(ValueError, match=r"block \[0:4\] has shape"):
    mining.hard_negative_sets(lambda a, b: s[a:b, :5], [0] * 4, num_queries=4,
                              corpus_size=10, method=method)
  with pytest.raises(ValueError, match="strategy"):
    mining.hard_negative_sets(s, [0] * 4, strategy="all", method=method)


# ---------------------------------------------------------------------------------------
# Property tests. Shapes come from a few fixed buckets so the kernels compile once each.

ROWS = 8
SIZES = [1, 2, 3, 4, 5, 8, 16, 40]
# Subnormal and smallest-normal float32 values: XLA flushes these to zero, NumPy does not.
TINY = [0.0, -0.0, 1e-45, 3e-45, -1e-45, 1e-40, -1e-40, 2.0 ** -126, 1.5 * 2.0 ** -126,
        -(2.0 ** -126), 2.0 ** -125, 1.0]


@st.composite
def problems(draw):
  n = draw(st.sampled_from(SIZES))
  kind = draw(st.sampled_from(["float", "ties", "dupes", "bigsmall", "tiny"]))
  if kind == "float":
    elem = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False)
  elif kind == "ties":   # few distinct values: ties among scores and among drops
    elem = st.sampled_from([0.0, -0.0, 1.0, 2.0, 3.0, 3.5, 7.0])
  elif kind == "dupes":  # evenly spaced: every drop equal
    elem = st.integers(0, 3).map(float)
  elif kind == "tiny":   # subnormal scores and drops
    elem = st.sampled_from(TINY)
  else:                  # very different magnitudes (drops overflow to -inf)
    elem = st.sampled_from([1e-30, -1e-30, 1e30, -1e30, 3e38, -3e38, 0.5, 1e-3])
  scores = draw(st.lists(st.lists(elem, min_size=n, max_size=n), min_size=ROWS,
                         max_size=ROWS))
  where = draw(st.sampled_from(["any", "first", "last"]))
  if where == "any":
    targets = draw(st.lists(st.integers(0, n - 1), min_size=ROWS, max_size=ROWS))
  else:
    s = np.asarray(scores, np.float32)
    order = np.argsort(-s, axis=1, kind="stable")
    targets = list(order[:, 0 if where == "first" else -1])
  return np.asarray(scores, np.float32), np.asarray(targets)


def check_qure(problem, threshold, strict, top_drops, method):
  scores, targets = problem
  sets, stats = mining.hard_negative_sets(scores, targets, consecutive_threshold=threshold,
                                          strict_below=strict, top_drops=top_drops,
                                          method=method)
  with np.errstate(over="ignore"):  # drops of +-3e38 overflow to -inf, as in the reference
    expected = [ref_qure(scores[i], targets[i], threshold, strict) for i in range(ROWS)]
  assert_sets_equal(sets, expected)
  # Statistics are consistent with the set.
  ok = stats.status == mining.STATUS_OK
  np.testing.assert_array_equal(ok, sets.sizes > 0)
  np.testing.assert_array_equal(np.where(ok, stats.gap2 - stats.gap1, 0), sets.sizes)
  assert (stats.gap1_size[ok] >= 0).all() and (stats.gap2_size[ok] >= 0).all()


# Fast default: ~1,200 generated queries (the slow variant below runs ~24,000).
# top_drops=2 forces the full-ranking fallback.
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems(), st.sampled_from([0, 1, 3]), st.booleans(), st.sampled_from([2, 32]))
def test_qure_matches_reference(property_method, problem, threshold, strict, top_drops):
  check_qure(problem, threshold, strict, top_drops, property_method)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems(), st.integers(0, 6), st.booleans(), st.sampled_from([2, 3, 8, 32]))
def test_qure_matches_reference_exhaustive(method, problem, threshold, strict, top_drops):
  check_qure(problem, threshold, strict, top_drops, method)


def test_subnormal_scores_are_ordered_as_the_reference(method):
  # Hypothesis' counterexample: XLA's flush-to-zero made 1e-45 tie with 0 in comparisons
  # while the sort kept it first, so the after-target list started one entry too early.
  s = np.array([[0, 0, 0, 1e-45], [0, 0, 0, 0], [1e-45, 0, -1e-45, -3e-45]], np.float32)
  t = [0, 0, 1]
  sets, stats = mining.hard_negative_sets(s, t, consecutive_threshold=0, method=method)
  assert_sets_equal(sets, [ref_qure(s[i], t[i], 0) for i in range(3)])
  assert stats.target_rank[0] == 1
  # Subnormal drops are ranked exactly: 2.0**-126 -> 1e-45 is a steeper drop than 1e-45 -> 0.
  row = np.array([[1, 2.0 ** -126, 1.5e-45, 1e-45, 0, -1]], np.float32)
  sets, _ = mining.hard_negative_sets(row, [0], consecutive_threshold=0, method=method)
  assert list(sets[0]) == ref_qure(row[0], 0, 0)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems(), st.integers(0, 5), st.sampled_from(["qure", "topk", "after_target_topk"]),
       st.sampled_from([2, 5]))
def test_image_ids_match_reference(property_method, problem, id_count, strategy, k):
  scores, targets = problem
  n = scores.shape[1]
  ids = (np.arange(n) * 7 + id_count) % (id_count + 1) if id_count else np.arange(n)
  k = min(k, n)
  sets, _ = mining.hard_negative_sets(scores, targets, image_ids=ids, strategy=strategy, k=k,
                                      method=property_method)
  if strategy == "qure":
    pos = [ref_qure(scores[i], targets[i]) for i in range(ROWS)]
  elif strategy == "topk":
    pos = [ref_topk(scores[i], targets[i], k) for i in range(ROWS)]
  else:
    pos = [ref_after_topk(scores[i], targets[i], k) for i in range(ROWS)]
  assert_sets_equal(sets, [ref_ids(p, ids, int(ids[targets[i]])) for i, p in enumerate(pos)])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(problems(), st.sampled_from([1, 3, 8]), st.booleans())
def test_topk_strategies_match_reference(property_method, problem, k, strict):
  scores, targets = problem
  n = scores.shape[1]
  k = min(k, n)
  a, _ = mining.hard_negative_sets(scores, targets, strategy="topk", k=k, method=property_method)
  assert_sets_equal(a, [ref_topk(scores[i], targets[i], k) for i in range(ROWS)])
  b, _ = mining.hard_negative_sets(scores, targets, strategy="after_target_topk", k=k,
                                   strict_below=strict, method=property_method)
  assert_sets_equal(b, [ref_after_topk(scores[i], targets[i], k, strict) for i in range(ROWS)])


# ---------------------------------------------------------------------------------------
# Block size and device count never change the result.


def _random_problem(q=37, n=61, seed=0):
  rng = np.random.default_rng(seed)
  s = rng.standard_normal((q, n)).astype(np.float32)
  s[::5] = np.round(s[::5] * 2) / 2          # ties in some rows
  return s, rng.integers(0, n, q)


def test_block_sizes_and_block_fn_identical(method):
  s, t = _random_problem()
  ref, ref_stats = mining.hard_negative_sets(s, t, method=method)
  assert_sets_equal(ref, [ref_qure(s[i], t[i]) for i in range(len(t))])
  for bs in (1, 16):
    got, stats = mining.hard_negative_sets(s, t, block_size=bs, method=method)
    assert_sets_equal(got, ref.to_list())
    np.testing.assert_array_equal(stats.gap1, ref_stats.gap1)
  sj = jax.numpy.asarray(s)
  got, _ = mining.hard_negative_sets(lambda a, b: sj[a:b], t, num_queries=len(t),
                                     corpus_size=s.shape[1], memory_budget_bytes=48 * 61 * 5,
                                     method=method)
  assert_sets_equal(got, ref.to_list())


@pytest.mark.parametrize("strategy", ["qure", "topk", "after_target_topk"])
def test_four_devices_identical_to_one(strategy, method):
  assert len(jax.devices()) >= 4
  s, t = _random_problem(q=29, n=50, seed=1)
  ref, _ = mining.hard_negative_sets(s, t, strategy=strategy, k=7, block_size=29,
                                     method=method)
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  for bs in ((8, None) if strategy == "qure" else (None,)):
    got, _ = mining.hard_negative_sets(s, t, strategy=strategy, k=7, mesh=mesh, block_size=bs,
                                       method=method)
    assert_sets_equal(got, ref.to_list())


def test_whole_corpus_sets():
  ids = np.array([3, 1, 3, 2, 5])
  w = mining.whole_corpus_sets([0, 1, 4], image_ids=ids)
  m = w.materialize()
  assert [list(x) for x in m.to_list()] == [[1, 2, 5], [2, 3, 5], [1, 2, 3]]
  w2 = mining.whole_corpus_sets([0, 2], corpus_size=3)
  assert [list(x) for x in w2.materialize().to_list()] == [[1, 2], [0, 1]]
  with pytest.raises(ValueError, match="single image id"):
    mining.whole_corpus_sets([0], image_ids=[4, 4])
  np.testing.assert_array_equal(mining.first_positions(ids, [3, 2, 5]), [0, 3, 4])


@pytest.mark.parametrize("key_bits", [63, 8])
def test_dedup_keeps_first_occurrences_in_order(key_bits):
  # key_bits=8 cannot hold (segment, id, index): the stable-argsort branch must agree.
  rng = np.random.default_rng(3)
  sizes = rng.integers(0, 40, 30)
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  flat = rng.integers(0, 12, int(offsets[-1])).astype(np.int32)
  target_ids = rng.integers(0, 12, 30).astype(np.int32)
  got_off, got = mining_sets.dedup_minus_target(offsets, flat, target_ids, key_bits=key_bits)
  want = []
  for r in range(30):
    seen = []
    for v in flat[offsets[r]:offsets[r + 1]]:
      if v != target_ids[r] and v not in seen:
        seen.append(v)
    want.append(seen)
  assert list(np.diff(got_off)) == [len(w) for w in want]
  assert list(got) == [v for w in want for v in w]

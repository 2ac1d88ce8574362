"""The NumPy (CPU) and XLA (accelerator) mining paths agree bit for bit: sets, every
statistic and its dtype, on random problems with ties, duplicates, subnormals and the
non-finite-score error, for every block size, thread count and device count."""

import jax
import numpy as np
import pytest

from cirjax import mining

STAT_FIELDS = ("set_size", "span", "target_rank", "num_after", "gap1", "gap2", "gap1_size",
               "gap2_size", "status")


def assert_same(a, b):
  (sa, ta), (sb, tb) = a, b
  np.testing.assert_array_equal(sa.offsets, sb.offsets)
  np.testing.assert_array_equal(sa.indices, sb.indices)
  assert sa.offsets.dtype == sb.offsets.dtype and sa.indices.dtype == sb.indices.dtype
  for f in STAT_FIELDS:
    x, y = getattr(ta, f), getattr(tb, f)
    assert x.dtype == y.dtype, f
    np.testing.assert_array_equal(x, y, err_msg=f)   # NaN == NaN here


def _scores(rng, kind: str, q: int, n: int) -> np.ndarray:
  if kind == "normal":
    return rng.standard_normal((q, n)).astype(np.float32)
  if kind == "ties":        # few distinct values: ties among scores and among drops
    return rng.choice(np.float32([0, -0.0, 1, 2, 3, 3.5, 7]), (q, n))
  if kind == "duplicates":  # evenly spaced integers: every drop equal
    return rng.integers(0, 4, (q, n)).astype(np.float32)
  if kind == "subnormal":   # subnormal scores and drops (XLA flushes them, NumPy does not)
    vals = np.float32([0, -0.0, 1e-45, 3e-45, -1e-45, 1e-40, -1e-40, 2.0 ** -126,
                       1.5 * 2.0 ** -126, -(2.0 ** -126), 2.0 ** -125, 1])
    return rng.choice(vals, (q, n))
  if kind == "huge":        # drops overflow to -inf
    return rng.choice(np.float32([1e-30, -1e-30, 1e30, -1e30, 3e38, -3e38, 0.5]), (q, n))
  raise AssertionError(kind)


KINDS = ("normal", "ties", "duplicates", "subnormal", "huge")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("strategy", mining.STRATEGIES)
def test_numpy_path_equals_xla_path(strategy, seed):
  rng = np.random.default_rng(seed)
  n = (40, 5)[seed % 2]   # two shapes: the XLA kernels compile once per shape
  parts = [_scores(rng, kind, 6, n) for kind in KINDS]
  s = np.concatenate(parts)
  # Targets anywhere, and at the top and the bottom of their rows.
  t = rng.integers(0, n, len(s))
  order = np.argsort(-s, axis=1, kind="stable")
  t[::3], t[1::3] = order[::3, 0], order[1::3, -1]
  ids = rng.integers(0, max(2, n // 3), n)     # repeating image ids
  # top_drops=2 forces the full ranking of the drops.
  for threshold, strict, top_drops in ((1, False, 32), (0, True, 2), (3, False, 32)):
    kw = dict(strategy=strategy, consecutive_threshold=threshold, strict_below=strict,
              top_drops=top_drops, k=min(5, n))
    for image_ids in (None, ids):
      want = mining.hard_negative_sets(s, t, image_ids=image_ids, method="xla", **kw)
      got = mining.hard_negative_sets(s, t, image_ids=image_ids, method="numpy",
                                       block_size=int(rng.integers(1, 12)),
                                       threads=int(rng.integers(1, 4)), **kw)
      assert_same(got, want)


def test_numpy_path_with_a_block_function_and_a_mesh():
  rng = np.random.default_rng(7)
  s = rng.standard_normal((33, 50)).astype(np.float32)
  s[::4] = np.round(s[::4])
  t = rng.integers(0, 50, 33)
  want = mining.hard_negative_sets(s, t, method="xla")
  sj = jax.numpy.asarray(s)
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  for kw in (dict(block_size=5), dict(memory_budget_bytes=48 * 50 * 3), dict(mesh=mesh)):
    got = mining.hard_negative_sets(lambda a, b: sj[a:b], t, num_queries=33, corpus_size=50,
                                    method="numpy", **kw)
    assert_same(got, want)
  # bfloat16 / float64 scores are cast to float32, as the XLA kernels do.
  for dt in (jax.numpy.bfloat16, np.float64):
    b = np.asarray(s.astype(dt))
    assert_same(mining.hard_negative_sets(b, t, method="numpy"),
                mining.hard_negative_sets(b.astype(np.float32), t, method="xla"))


def test_empty_query_set_and_method_choice():
  s = np.zeros((0, 5), np.float32)
  for m in ("numpy", "xla"):
    sets, stats = mining.hard_negative_sets(s, np.zeros(0, int), method=m)
    assert sets.num_queries == 0 and stats.set_size.shape == (0,)
  assert mining.resolve_method("auto") == ("numpy" if jax.default_backend() == "cpu" else "xla")
  assert mining.resolve_method("xla") == "xla"
  with pytest.raises(ValueError, match="method='torch'"):
    mining.hard_negative_sets(np.ones((2, 5), np.float32), [0, 1], method="torch")


def test_non_finite_scores_raise_the_same_error_on_both_paths():
  rng = np.random.default_rng(0)
  s = np.concatenate([_scores(rng, kind, 6, 40) for kind in KINDS])  # the shape above
  for bad in (np.nan, np.inf, -np.inf):
    s2 = s.copy()
    s2[17, 23] = bad
    messages = []
    for method in ("numpy", "xla"):
      with pytest.raises(ValueError, match=r"scores row 17 \(query 17\) .* at column 23") as e:
        mining.hard_negative_sets(s2, np.zeros(30, int), method=method)
      messages.append(str(e.value))
    assert messages[0] == messages[1]

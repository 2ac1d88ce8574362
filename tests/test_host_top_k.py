"""`host_top_k.top_k` ranks rows exactly as XLA's `lax.top_k` does on CPU: same scores, same
columns, bit for bit, over random rows and rows built to hit every tie rule (equal scores,
-0.0 against 0.0, +-inf, NaN, a k-th group maximum or k-th candidate tied with a column
left out), at row lengths that use groups (with leftover columns) and that rank whole rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cirjax.eval import host_top_k


def _xla(scores, k):
  s, i = jax.jit(lambda s: jax.lax.top_k(s, k))(jnp.asarray(scores))
  return np.asarray(s), np.asarray(i)


def _host(scores, k, threads=None):
  return host_top_k.top_k(scores, k, threads)


def _same(scores, k, threads=None):
  (xs, xi), (hs, hi) = _xla(scores, k), _host(scores, k, threads)
  np.testing.assert_array_equal(hi, xi)
  np.testing.assert_array_equal(hs.view(np.int32), xs.view(np.int32))  # -0.0 and NaN bits too


@pytest.mark.parametrize("n,k", [(8192, 50), (2297, 50), (6346, 10), (803, 50), (60, 50),
                                 (50, 50), (1000, 1)])
def test_random_rows_rank_as_xla(n, k):
  rng = np.random.default_rng(n + k)
  _same(rng.standard_normal((37, n)).astype(np.float32), k)


def test_ties_and_special_values_rank_as_xla():
  rng = np.random.default_rng(0)
  n, k = 4100, 20  # 16 groups of 256 columns, 4 columns left over
  s = rng.standard_normal((12, n)).astype(np.float32)
  s[0, ::7] = 3.0                       # many equal best scores: the group stage is tied
  s[1, 100:140] = s[1].max()            # 40 copies of the max, more than k
  s[2, :] = 0.0
  s[2, ::3] = -0.0                      # -0.0 ranks below 0.0
  s[3, 5] = np.inf; s[3, 9] = -np.inf; s[3, 4099] = np.inf
  s[4, 17] = np.nan; s[4, 4098] = -np.nan
  s[5, :] = -np.inf                     # everything masked: lower columns first
  s[5, 300] = 1.0
  srt = np.sort(s[6])[::-1]
  s[6, s[6] == srt[k]] = srt[k - 1]     # the k-th and (k+1)-th best equal
  s[7, [256, 512, 768]] = 9.0           # same column in three groups' strides
  s[8, 4096:] = 50.0                    # the leftover columns hold the best
  s[9] = np.repeat(rng.standard_normal(n // 100 + 1).astype(np.float32), 100)[:n]
  s[10, 1:] = s[10, 0]                  # one value everywhere
  _same(s, k)
  _same(s, k, threads=3)


def test_keys_round_trip_and_order():
  vals = np.array([-np.inf, -3.5, -0.0, 0.0, 1e-45, 2.0, np.inf, np.nan], np.float32)
  keys = host_top_k.order_keys(vals)
  assert (np.diff(keys.astype(np.int64)) > 0).all()
  np.testing.assert_array_equal(host_top_k.key_scores(keys).view(np.int32), vals.view(np.int32))


def test_bad_arguments():
  with pytest.raises(ValueError, match="float32"):
    host_top_k.top_k(np.zeros((2, 5), np.float64), 2)
  with pytest.raises(ValueError, match="top 6 of 5"):
    host_top_k.top_k(np.zeros((2, 5), np.float32), 6)


def test_rows_split_over_threads_rank_as_one():
  """Any split of the rows gives the same result, in row order (`host_threads.run` keeps
  the order of its items)."""
  from cirjax.eval import host_threads
  s = np.random.default_rng(4).standard_normal((23, 900)).astype(np.float32)
  one = host_top_k.top_k(s, 7, threads=1)
  for threads in (2, 5, 23, 40):
    got = host_top_k.top_k(s, 7, threads=threads)
    np.testing.assert_array_equal(got[1], one[1])
    np.testing.assert_array_equal(got[0], one[0])
  assert host_threads.run(lambda x: x * x, range(9)) == [x * x for x in range(9)]

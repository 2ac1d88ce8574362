"""Exact top-k of fp32 score rows with NumPy on the host, in the order XLA's `lax.top_k`
gives.

Retrieval on this process's CPU devices ranks here (`retrieval.top_k`'s "host" path): XLA's
CPU `top_k` is a one-thread custom call at about 10-70 us per row (docs/eval.md), slower
than PyTorch's `topk`; this one takes about a third of XLA's time on two threads.

Order. XLA's CPU TopK compares floats as integers (`order_keys`): a total order with -0.0
below 0.0 and NaNs beyond +-inf by their bits; equal scores keep the lower column first.
The k best of a row are sorted by that order; a row whose selection is not decided by plain
float comparison (a tie with a score left out, which covers -0.0 against 0.0, or a NaN) is
ranked whole by it instead. So every row is `lax.top_k`'s, bit for bit
(tests/test_host_top_k.py).

Method, per row: the N columns are dealt into M strided groups (column j in group j mod M,
about 8k groups); the k groups with the largest maxima hold the row's k best scores (a score
outside them is below k group maxima), so only their columns are ranked.
"""

from __future__ import annotations

import numpy as np

from cirjax.eval import host_threads

_MAGNITUDE = 0x7FFFFFFF
_GROUPS_PER_K = 8  # fewer groups leave more columns to rank; more cost more group maxima
_MAX_GROUP = 16


def order_keys(scores: np.ndarray) -> np.ndarray:
  """fp32 scores -> int32 keys whose signed order is XLA's CPU TopK order of the floats."""
  bits = np.ascontiguousarray(scores, np.float32).view(np.int32)
  return bits ^ ((bits >> 31) & _MAGNITUDE)


def key_scores(keys: np.ndarray) -> np.ndarray:
  """The fp32 scores of `order_keys` keys (the map is its own inverse)."""
  keys = np.ascontiguousarray(keys, np.int32)
  return (keys ^ ((keys >> 31) & _MAGNITUDE)).view(np.float32)


def top_k(scores: np.ndarray, k: int, threads: int | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
  """The k best of each row of `scores` [B, N] (fp32) as (scores [B, k], int32 columns
  [B, k]), best first, in `lax.top_k`'s order. Rows are split into `threads` parts (default:
  `host_threads.count()`), run on `host_threads`."""
  scores = np.asarray(scores)
  if scores.ndim != 2 or scores.dtype != np.float32:
    raise ValueError(f"scores must be float32 [B, N], got {scores.dtype} {scores.shape}")
  b, n = scores.shape
  if not 0 < k <= n:
    raise ValueError(f"cannot take the top {k} of {n} columns")
  parts = max(1, min(threads or host_threads.count(), b))
  out_k = np.empty((b, k), np.int32)
  out_i = np.empty((b, k), np.int32)
  bounds = np.linspace(0, b, parts + 1).astype(int)

  def part(t):
    r0, r1 = bounds[t], bounds[t + 1]
    if r1 > r0:
      out_k[r0:r1], out_i[r0:r1] = _rows_top_k(scores[r0:r1], k)

  host_threads.run(part, range(parts))
  return key_scores(out_k), out_i


def _rows_top_k(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(keys, columns) [B, k] of the rows of `s`, sorted."""
  b, n = s.shape
  g = max(1, min(_MAX_GROUP, n // (_GROUPS_PER_K * k)))
  m = n // g  # groups; columns past g * m are always candidates
  flat = s.ravel()  # a view of C-contiguous rows, else one copy
  row0 = (np.arange(b, dtype=np.intp) * n)[:, None]
  if g > 1:
    gmax = s[:, :g * m].reshape(b, g, m).max(1)
    order = np.argpartition(gmax, m - k, axis=1)[:, m - k:]
    kth = np.take(gmax.reshape(-1), order[:, :1] + (np.arange(b) * m)[:, None])
    # a NaN group maximum, or a k-th maximum tied with a group left out
    undecided = ((gmax >= kth).sum(1) != k) | np.isnan(kth[:, 0])
    cols = (order[:, :, None] + m * np.arange(g, dtype=order.dtype)).reshape(b, k * g)
    if g * m < n:
      cols = np.concatenate([cols, np.broadcast_to(np.arange(g * m, n), (b, n - g * m))], 1)
    cand = np.take(flat, cols + row0)
  else:
    undecided = np.zeros(b, bool)
    cols = None
    cand = s
  c = cand.shape[1]
  order = np.argpartition(cand, c - k, axis=1)[:, c - k:]
  pos = order + (np.arange(b) * c)[:, None]
  best = np.take(cand.ravel(), pos)
  low = best.min(1, keepdims=True)
  undecided |= ((cand >= low).sum(1) != k) | np.isnan(low[:, 0])
  best_cols = order if cols is None else np.take(cols.ravel(), pos)
  out_k, out_i = _sorted(order_keys(best), best_cols)
  for r in np.flatnonzero(undecided):
    out_k[r], out_i[r] = _sorted(*_whole_row(s[r], k))
  return out_k, out_i


def _whole_row(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The row's k best (key, column) pairs by XLA's order (every composite key is distinct)."""
  best = np.partition(_composite(order_keys(row), np.arange(row.shape[0])), k - 1)[:k]
  return _decompose(best)


def _composite(keys, cols):
  """uint64 sorting ascending as (key descending, column ascending)."""
  rank = (np.int64(_MAGNITUDE) - keys.astype(np.int64)).astype(np.uint64)
  return (rank << np.uint64(32)) | cols.astype(np.uint64)


def _decompose(comp):
  cols = (comp & np.uint64(0xFFFFFFFF)).astype(np.int32)
  keys = (np.int64(_MAGNITUDE) - (comp >> np.uint64(32)).astype(np.int64)).astype(np.int32)
  return keys, cols


def _sorted(keys, cols):
  return _decompose(np.sort(_composite(keys, cols), axis=-1))

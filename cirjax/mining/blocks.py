"""The blocked loop's shared host pieces: a score matrix as a block function, block rows for
a memory budget, the checks of each block, the assembly of per-block results, progress.

Both mining paths (`cirjax.mining.cpu`, `cirjax.mining.accelerator`) cut the query axis
into blocks of rows and call `block_fn(start, stop)` for each, so the full `[Q, N]` score
matrix never has to exist.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Union

import jax
import numpy as np

# Bytes of device memory one score entry costs inside a block (the scores, two 64-bit sort
# keys, order, sorted values, drops and the fallback's keys) -- a deliberate over-estimate.
_BYTES_PER_ENTRY = 48
DEFAULT_MEMORY_BUDGET = 1 << 30

ScoresOrBlockFn = Union[np.ndarray, jax.Array, Callable[[int, int], Any]]


def block_rows_for_budget(corpus_size: int, memory_budget_bytes: int, multiple: int = 1) -> int:
  """Query rows per block so one block's working set stays within the budget."""
  rows = max(1, int(memory_budget_bytes) // (_BYTES_PER_ENTRY * max(1, corpus_size)))
  rows = max(multiple, rows // multiple * multiple)
  return rows


def as_block_fn(scores, num_queries, corpus_size):
  """(block_fn, Q, N) from a score matrix or a block function."""
  if callable(scores):
    if num_queries is None or corpus_size is None:
      raise ValueError("scores is a block function: pass num_queries= and corpus_size= too")
    return scores, int(num_queries), int(corpus_size)
  shape = getattr(scores, "shape", None)
  if shape is None:
    scores = np.asarray(scores)
    shape = scores.shape
  if len(shape) != 2:
    raise ValueError(f"scores must be a [num_queries, corpus_size] matrix, got shape {shape}")
  q, n = int(shape[0]), int(shape[1])
  if num_queries is not None and int(num_queries) != q:
    raise ValueError(f"num_queries={num_queries} disagrees with scores.shape[0]={q}")
  if corpus_size is not None and int(corpus_size) != n:
    raise ValueError(f"corpus_size={corpus_size} disagrees with scores.shape[1]={n}")
  return (lambda a, b: scores[a:b]), q, n


def raise_non_finite(start: int, finite: np.ndarray, blk) -> None:
  if finite.all():
    return
  r = int(np.argmin(finite))
  row = np.asarray(blk[r])
  c = int(np.nonzero(~np.isfinite(row))[0][0])
  raise ValueError(f"scores row {start + r} (query {start + r}) has a non-finite value "
                   f"{row[c]} at column {c}: NaN/inf scores cannot be mined (check the "
                   "model's outputs; an infinite score makes the drops undefined)")


def checked_block(block_fn, start: int, stop: int, n: int):
  blk = block_fn(start, stop)
  if tuple(blk.shape) != (stop - start, n):
    raise ValueError(f"scores block [{start}:{stop}] has shape {tuple(blk.shape)}, "
                     f"expected {(stop - start, n)}")
  return blk


_STAT_DTYPES = dict(rank=np.int32, num_after=np.int32, gap1=np.int32, gap2=np.int32,
                    gap1_size=np.float32, gap2_size=np.float32, status=np.int32)


def assemble(sizes: list, pieces: list, stat_pieces: list):
  """(offsets, flat, stats) from per-block pieces, with the XLA kernels' dtypes."""
  offsets = np.zeros(sum(len(s) for s in sizes) + 1, np.int64)
  if sizes:
    np.cumsum(np.concatenate(sizes), out=offsets[1:])
  flat = (np.concatenate(pieces).astype(np.int32, copy=False) if pieces
          else np.zeros(0, np.int32))
  st = {key: (np.concatenate([p[key] for p in stat_pieces]).astype(dt) if stat_pieces
              else np.zeros(0, dt)) for key, dt in _STAT_DTYPES.items()}
  if stat_pieces and "span" in stat_pieces[0]:  # sets were de-duplicated chunk by chunk
    st["span"] = np.concatenate([p["span"] for p in stat_pieces])
  return offsets, flat, st


def progress_line(enabled, done, total, t0):
  if enabled:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(f"\rmining: {done}/{total} queries ({rate:,.0f} queries/s)", end="",
          file=sys.stderr, flush=True)
    if done >= total:
      print(file=sys.stderr)

"""The host driver: `hard_negative_sets` checks its arguments, picks a path and assembles
the sets and statistics (the algorithm is the package docstring's, `cirjax.mining`)."""

from __future__ import annotations

from typing import Optional, Union

import jax
import numpy as np

from cirjax.mining import accelerator, cpu
from cirjax.mining.blocks import (DEFAULT_MEMORY_BUDGET, ScoresOrBlockFn, as_block_fn,
                                  block_rows_for_budget)
from cirjax.mining.sets import (STATUS_EMPTY_AFTER_DEDUP, HardNegativeSets, MiningStats,
                                check_image_ids, check_targets, dedup_minus_target)

STRATEGIES = ("qure", "topk", "after_target_topk")
METHODS = ("auto", "numpy", "xla")


def hard_negative_sets(
    scores: ScoresOrBlockFn,
    target_index,
    *,
    strategy: str = "qure",
    image_ids=None,
    consecutive_threshold: int = 1,
    strict_below: bool = False,
    k: int = 100,
    block_size: Optional[int] = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    mesh: Optional[jax.sharding.Mesh] = None,
    mesh_axes: Optional[Union[str, tuple]] = None,
    num_queries: Optional[int] = None,
    corpus_size: Optional[int] = None,
    top_drops: int = 32,
    progress: bool = False,
    method: str = "auto",
    threads: Optional[int] = None,
) -> tuple[HardNegativeSets, MiningStats]:
  """Mines each query's negative set over its corpus (QuRe by default).

  Long because: a 19-line signature and the checks that name each bad argument; the two
  blocked loops are `cpu.mine` and `accelerator.mine`.

  Args:
    scores: a `[Q, N]` score matrix (numpy or jax), or a block function
      `(start, stop) -> scores[start:stop]` of shape `[stop-start, N]` (numpy or jax; e.g.
      query-block x corpus on device) so the full matrix never has to exist. A block
      function needs `num_queries` and `corpus_size`.
    target_index: `[Q]` ints, the corpus position of each query's target (as given; with a
      repeating corpus, the position you pass decides which copy is "the target").
    strategy: `"qure"` (default), `"topk"` (k best other than the target) or
      `"after_target_topk"` (the k entries right after the target). The whole-corpus
      strategy is `whole_corpus_sets`.
    image_ids: optional `[N]` ints, the image id of each corpus entry (entries may repeat).
      Sets are then unique image ids, first occurrence kept, the target's id removed.
    consecutive_threshold: minimum distance between the two drops is this + 1 (reference: 1;
      0 gives the paper's plain top-2).
    strict_below: the after-target list is the entries scoring strictly below the target
      (paper Eq. 5) instead of the positions after it (reference code).
    k: set size for the top-k strategies.
    block_size: query rows per device call; default from `memory_budget_bytes`.
    memory_budget_bytes: device memory one block may use (default 1 GiB).
    mesh: shard each block's query axis over this mesh (block rows rounded to its size).
    mesh_axes: mesh axes for the query axis (default: all of them).
    top_drops: steepest drops ranked with `top_k` before falling back to a full ranking of
      the drops; a speed knob only, results never depend on it.
    progress: print queries/s to stderr.
    method: `"numpy"` (the CPU path: NumPy sorts in threads), `"xla"` (the jitted kernels:
      the accelerator path) or `"auto"` (NumPy when the mesh's or the default backend is a
      CPU, else XLA). Results are identical bit for bit; a speed knob only.
    threads: worker threads of the NumPy path (default: the CPUs this process may use).

  Returns:
    `(HardNegativeSets, MiningStats)`, numpy on the host.

  Raises:
    ValueError: on NaN/inf scores (naming the query row and column), out-of-range or
      mis-shaped targets, an empty corpus, `k` larger than the corpus, bad options.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r}; expected one of {STRATEGIES} "
                     "(the whole-corpus strategy is whole_corpus_sets)")
  block_fn, q, n = as_block_fn(scores, num_queries, corpus_size)
  if n == 0:
    raise ValueError("scores: the corpus is empty (corpus_size 0); nothing to mine")
  if n >= 2 ** 31 - 1:
    raise ValueError(f"corpus_size={n} does not fit 32-bit positions")
  targets = check_targets(target_index, q, n)
  ids = check_image_ids(image_ids, n)
  if int(consecutive_threshold) != consecutive_threshold or consecutive_threshold < 0:
    raise ValueError(f"consecutive_threshold must be an integer >= 0, got {consecutive_threshold}")
  if strategy != "qure" and not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, corpus_size={n}]")
  if top_drops < 2:
    raise ValueError(f"top_drops must be >= 2, got {top_drops}")

  method = resolve_method(method, mesh)
  if block_size and int(block_size) < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  if method == "numpy":
    chunk = cpu.chunk_miner(strategy, ids, consecutive_threshold, strict_below, k, top_drops)
    rows = int(block_size) if block_size else block_rows_for_budget(n, memory_budget_bytes)
    offsets, flat, st = cpu.mine(block_fn, targets, q, n, min(rows, max(q, 1)), chunk,
                                 threads, progress)
  else:
    offsets, flat, st = accelerator.mine(block_fn, targets, q, n, strategy, block_size,
                                         memory_budget_bytes, mesh, mesh_axes, top_drops, k,
                                         consecutive_threshold, strict_below, progress)
  span = st.pop("span", None)
  if span is None:
    span = np.diff(offsets)
    if ids is not None:
      offsets, flat = dedup_minus_target(offsets, ids[flat], ids[targets])
  if ids is not None:
    emptied = (np.diff(offsets) == 0) & (span > 0)
    st["status"] = np.where(emptied, STATUS_EMPTY_AFTER_DEDUP, st["status"]).astype(np.int32)
  sets = HardNegativeSets(offsets=offsets, indices=flat)
  stats = MiningStats(set_size=np.diff(offsets), span=span, target_rank=st["rank"],
                      num_after=st["num_after"], gap1=st["gap1"], gap2=st["gap2"],
                      gap1_size=st["gap1_size"], gap2_size=st["gap2_size"],
                      status=st["status"])
  return sets, stats


def resolve_method(method: str, mesh=None) -> str:
  """`"numpy"` or `"xla"`: `"auto"` takes NumPy on a CPU backend (its sort is ~3x faster
  than XLA's there) and the jitted XLA kernels on an accelerator."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}; expected one of {METHODS}")
  if method != "auto":
    return method
  platform = (mesh.devices.flat[0].platform if mesh is not None
              else jax.default_backend())
  return "numpy" if platform == "cpu" else "xla"

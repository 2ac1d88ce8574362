"""Figures of a mining: sorted score curves with the gaps (QuRe Figs. 7-8), set sizes (Fig. 5),
and, where the full relevant sets are known, each strategy's false negatives.

Both functions write a PNG (matplotlib, Agg backend: no display needed) and return what they
drew, so callers and tests can check the marks without reading pixels.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from cirjax.mining import MiningStats


def _pyplot():
  # matplotlib is optional and slow to import: only the plotting functions need it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_score_curves(scores: np.ndarray, target_index, stats: MiningStats,
                      queries: Sequence[int], path: str | os.PathLike, *,
                      max_points: Optional[int] = None, titles: Optional[Sequence[str]] = None
                      ) -> list[dict]:
  """One panel per query: its scores sorted descending, the target and the two gaps marked.

  Args:
    scores: `[Q, N]` the scores the mining used (numpy; only the chosen rows are read).
    target_index: `[Q]` each query's target corpus position.
    stats: the `MiningStats` of that mining (gap positions are ranks in the sorted row).
    queries: the query rows to draw (a few).
    path: the PNG to write.
    max_points: draw only the first `max_points` ranks (the gaps are usually near the top).
    titles: optional panel titles (e.g. the query's caption).

  Returns:
    Per panel: `{"query", "target_rank", "gap1", "gap2", "set_size"}` as drawn.
  """
  queries = [int(q) for q in queries]
  if not queries:
    raise ValueError("queries: choose at least one query row to plot")
  scores = np.asarray(scores)
  targets = np.asarray(target_index)
  for q in queries:
    if not 0 <= q < scores.shape[0]:
      raise ValueError(f"queries: row {q} is out of range for {scores.shape[0]} queries")
  plt = _pyplot()
  cols = min(3, len(queries))
  rows = -(-len(queries) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  drawn = []
  for ax, (i, q) in zip(axes.flat, enumerate(queries)):
    row = scores[q].astype(np.float32)
    order = np.argsort(-row, kind="stable")
    curve = row[order]
    rank = int(stats.target_rank[q])
    g1, g2 = int(stats.gap1[q]), int(stats.gap2[q])
    end = len(curve) if max_points is None else min(len(curve), int(max_points))
    if g2 >= 0:
      end = max(end, min(len(curve), g2 + 2))
    x = np.arange(end)
    ax.plot(x, curve[:end], lw=1.2, color="0.25", label="sorted scores")
    if g1 >= 0:
      ax.axvspan(g1 + 0.5, g2 + 0.5, color="tab:orange", alpha=0.25,
                 label=f"hard negatives ({int(stats.span[q])})")
      for g, name in ((g1, "gap 1"), (g2, "gap 2")):
        ax.plot([g, g + 1], curve[[g, g + 1]], color="tab:red", lw=2.5)
        ax.annotate(name, (g + 0.5, curve[g]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8, color="tab:red")
    if rank < end:
      ax.scatter([rank], [curve[rank]], color="tab:blue", zorder=3, s=25, label="target")
    ax.set_xlabel("rank")
    ax.set_ylabel("score")
    title = titles[i] if titles is not None else f"query {q} (target {int(targets[q])})"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    drawn.append({"query": q, "target_rank": rank, "gap1": g1, "gap2": g2,
                  "set_size": int(stats.set_size[q])})
  for ax in list(axes.flat)[len(queries):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawn


def plot_set_size_histogram(stats_or_sizes, path: str | os.PathLike, *, bins: int = 50,
                            title: str = "hard-negative set sizes") -> dict:
  """Histogram of the per-query set sizes (QuRe Fig. 5); empty sets counted in the title.

  Args:
    stats_or_sizes: a `MiningStats` or an array of set sizes.
    path: the PNG to write.
    bins: histogram bins over the non-empty sizes.

  Returns:
    `{"counts", "edges", "empty", "mean", "median"}` of what was drawn.
  """
  sizes = np.asarray(stats_or_sizes.set_size if isinstance(stats_or_sizes, MiningStats)
                     else stats_or_sizes)
  if sizes.ndim != 1 or sizes.size == 0:
    raise ValueError(f"set sizes must be a non-empty 1-D array, got shape {sizes.shape}")
  nonempty = sizes[sizes > 0]
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.2))
  counts, edges = np.histogram(nonempty, bins=bins) if nonempty.size else (np.zeros(0), np.zeros(1))
  if nonempty.size:
    ax.hist(nonempty, bins=edges, color="tab:orange", edgecolor="0.3")
  empty = int((sizes == 0).sum())
  mean, median = float(sizes.mean()), float(np.median(sizes))
  ax.set_xlabel("set size")
  ax.set_ylabel("queries")
  ax.set_title(f"{title}\nmean {mean:.1f}, median {median:.0f}, empty {empty}/{sizes.size}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return {"counts": counts, "edges": edges, "empty": empty, "mean": mean, "median": median}


def plot_false_negatives(summaries: dict[str, dict], path: str | os.PathLike, *,
                         title: str = "false negatives per mining strategy") -> dict:
  """Bars per strategy: the share of a drawn negative that is relevant (`fn_share`) and the
  share of queries whose pool holds a relevant image (`fn_queries`), with the mean pool size
  under each bar group.

  Args:
    summaries: `{strategy: PoolAudit.summary()}` (`cirjax.mining_audit`).
    path: the PNG to write.

  Returns:
    `{strategy: (fn_share, fn_queries)}` as drawn, in percent.
  """
  if not summaries:
    raise ValueError("summaries: no strategy to plot")
  names = list(summaries)
  fn = [100.0 * float(summaries[n]["fn_share"]) for n in names]
  fq = [100.0 * float(summaries[n]["fn_queries"]) for n in names]
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2.5, 3.4))
  x = np.arange(len(names))
  ax.bar(x - 0.2, fn, 0.4, color="tab:red", label="relevant share of drawn negatives")
  ax.bar(x + 0.2, fq, 0.4, color="tab:orange", label="queries with >= 1 in the pool")
  ax.set_xticks(x, [f"{n}\n(pool {summaries[n]['pool_size']:.0f})" for n in names], fontsize=8)
  ax.set_ylabel("%")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return {n: (a, b) for n, a, b in zip(names, fn, fq)}


__all__ = ["plot_score_curves", "plot_set_size_histogram", "plot_false_negatives"]

"""The QuRe study's statistics: paired t intervals, Holm's correction and a bootstrap over
warm-ups and seeds (docs/study.md, "Statistics").

Every arm of the study runs once per (warm-up, seed) pair with the same batches, so a
comparison of two arms is a set of paired differences `d[w][s] = a[w][s] - b[w][s]`:

* `paired_t` -- the mean difference, its 95 % t interval over all pairs (n - 1 degrees of
  freedom) and the two-sided p-value of "mean difference = 0";
* `hierarchical_bootstrap` -- a percentile interval that also carries the spread between
  warm-ups: each replicate draws warm-ups with replacement, then seeds within each drawn
  warm-up, and takes the mean of the drawn differences;
* `holm` -- Holm's step-down adjustment of the secondary comparisons' p-values (the family
  error rate stays at the level; the primary comparison is declared up front and not
  adjusted).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as sps

LEVEL = 0.95


def paired_t(diffs: Sequence[float], level: float = LEVEL) -> dict:
  """Mean of the paired differences, its t interval and the two-sided p-value.

  With one pair there is no spread: the interval and p-value are NaN."""
  d = np.asarray(diffs, np.float64).reshape(-1)
  d = d[np.isfinite(d)]
  n = int(d.size)
  mean = float(d.mean()) if n else float("nan")
  if n < 2:
    return {"n": n, "mean": mean, "se": float("nan"), "lo": float("nan"),
            "hi": float("nan"), "t": float("nan"), "p": float("nan")}
  se = float(d.std(ddof=1) / math.sqrt(n))
  crit = float(sps.t.ppf(0.5 + level / 2, n - 1))
  if se == 0.0:
    t, p = (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
  else:
    t = mean / se
    p = float(2 * sps.t.sf(abs(t), n - 1))
  return {"n": n, "mean": mean, "se": se, "lo": mean - crit * se, "hi": mean + crit * se,
          "t": t, "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm-adjusted p-values, in the input order (NaN stays NaN and is not counted)."""
  p = np.asarray(pvalues, np.float64)
  out = np.full(p.shape, np.nan)
  idx = np.flatnonzero(np.isfinite(p))
  m = idx.size
  running = 0.0
  for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
    running = max(running, min(1.0, (m - rank) * p[i]))
    out[i] = running
  return out.tolist()


def hierarchical_bootstrap(diffs: Sequence[Sequence[float]], *, n_boot: int = 10000,
                           seed: int = 0, level: float = LEVEL) -> dict:
  """Percentile interval of the mean paired difference, resampling warm-ups, then seeds.

  `diffs[w]` holds the differences of warm-up `w`'s seeds (every warm-up the same number)."""
  d = np.asarray(diffs, np.float64)
  if d.ndim != 2 or d.size == 0:
    raise ValueError(f"diffs must be [warm-ups, seeds], got shape {d.shape}")
  w, s = d.shape
  rng = np.random.default_rng(seed)
  pick_w = rng.integers(w, size=(n_boot, w))
  pick_s = rng.integers(s, size=(n_boot, w, s))
  means = d[pick_w[:, :, None], pick_s].mean(axis=(1, 2))
  lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
  return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n_boot": n_boot,
          "seed": seed}


def direction(lo: float, hi: float) -> str:
  """`higher` / `lower` when the interval excludes 0, else `no difference shown`."""
  if not (math.isfinite(lo) and math.isfinite(hi)):
    return "no interval (one pair)"
  return "higher" if lo > 0 else "lower" if hi < 0 else "no difference shown"


__all__ = ["paired_t", "holm", "hierarchical_bootstrap", "direction", "LEVEL"]

"""The QuRe study's report: Markdown tables (mean +- spread over seeds), the claim checks,
and two plots, from the dictionary `cirjax.study.run_study` builds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cirjax import mining_audit

HEADLINE = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "mAP@5", "mAP@10", "mAP@25", "rel@5",
            "preference_rate")
# The negative pool each arm trains with (None: in-batch negatives, no pool).
OWN_POOL = {"infonce_inbatch": None, "pairwise_topk": "topk", "pairwise_corpus": "corpus",
            "pairwise_qure": "qure", "infonce_qure": "qure"}


def _cell(s: dict | None, key: str, scale: float = 1.0) -> str:
  v = (s or {}).get(key)
  if not v or not v["n"] or not math.isfinite(v["mean"]):
    return "–"
  return f"{scale * v['mean']:.2f} ± {scale * v['std']:.2f}"


def _own(arm: str, summary: dict, metric: str) -> str:
  """The arm's own pool in training: its last mining round, or (never mined) the pool it
  draws from as the final model's mining sees it."""
  pool = OWN_POOL.get(arm)
  if pool is None:
    return "–"
  key = f"mined/{metric}/{pool}"
  return _cell(summary, key if key in summary else f"final/{metric}/{pool}", 100.0)


def tables(report: dict) -> str:
  arms, summ = report["arms"], report["summary"]
  head = ["arm"] + [k if k != "preference_rate" else "pref. (Eq. 9)" for k in HEADLINE]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  warm = report.get("warmup", {})
  lines.append("| warm-up (shared start) | " + " | ".join(
      f"{warm[k]:.2f}" if k in warm else "–" for k in HEADLINE) + " |")
  for a in arms:
    lines.append(f"| {a} | " + " | ".join(_cell(summ[a], k) for k in HEADLINE) + " |")
  fn = ["| arm | own pool: relevant share of drawn negatives % | own pool: queries with a "
        "false negative % | " + " | ".join(f"final model, {s} % " for s in
                                            mining_audit.STRATEGIES) + "|",
        "|" + "---|" * (3 + len(mining_audit.STRATEGIES))]
  for a in arms:
    fn.append(f"| {a} | {_own(a, summ[a], 'fn_share')} | {_own(a, summ[a], 'fn_queries')} | "
              + " | ".join(_cell(summ[a], f"final/fn_share/{s}", 100.0)
                           for s in mining_audit.STRATEGIES) + " |")
  sizes = ["| arm | " + " | ".join(f"pool size, {s}" for s in mining_audit.STRATEGIES) + " |",
           "|" + "---|" * (1 + len(mining_audit.STRATEGIES))]
  for a in arms:
    sizes.append(f"| {a} | " + " | ".join(_cell(summ[a], f"final/pool_size/{s}")
                                          for s in mining_audit.STRATEGIES) + " |")
  return "\n".join(lines) + "\n\n" + "\n".join(fn) + "\n\n" + "\n".join(sizes) + "\n"


def _compare(summ: dict, a: str, b: str, key: str, scale: float = 1.0) -> str | None:
  """`a` vs `b` on `key`: the difference of means and whether it exceeds twice its
  standard error over seeds (else: within the seed spread)."""
  if a not in summ or b not in summ or key not in summ[a] or key not in summ[b]:
    return None
  x, y = summ[a][key], summ[b][key]
  if not (x["n"] and y["n"]):
    return None
  d = scale * (x["mean"] - y["mean"])
  se = scale * math.sqrt(x["std"] ** 2 / x["n"] + y["std"] ** 2 / y["n"])
  if min(x["n"], y["n"]) < 2:
    verdict = "one seed: no spread, no verdict"
  else:
    verdict = ("within the seed spread" if abs(d) <= 2 * se else
               "higher" if d > 0 else "lower")
  return (f"{a} − {b} on {key}: {d:+.2f} (± {se:.2f} standard error over seeds): "
          f"{verdict}")


def claims(report: dict) -> str:
  """The two halves of QuRe's claim, each stated as measured."""
  summ = report["summary"]
  out = ["**Claim 1: QuRe's set keeps false negatives out.** The share of negatives drawn "
         "from each pool that are in fact relevant, when the final pairwise_qure model mines "
         "the training split (percent):", ""]
  ref = summ.get("pairwise_qure") or next(iter(summ.values()), {})
  for s in mining_audit.STRATEGIES:
    out.append(f"* {s}: {_cell(ref, f'final/fn_share/{s}', 100.0)} "
               f"(pool {_cell(ref, f'final/pool_size/{s}')}, queries with one "
               f"{_cell(ref, f'final/fn_queries/{s}', 100.0)})")
  out += ["", "**Claim 2: training on QuRe's set retrieves more relevant images.** "
          "Differences of means (a verdict only where they exceed twice the standard error):",
          ""]
  for other in ("pairwise_topk", "pairwise_corpus", "infonce_inbatch"):
    for key in ("mAP@10", "rel@5", "preference_rate", "R@1"):
      c = _compare(summ, "pairwise_qure", other, key)
      if c:
        out.append(f"* {c}")
  return "\n".join(out) + "\n"


def write(report: dict, out: Path) -> None:
  """`study.md` and the plots under `out`."""
  figs = plots(report, out)
  minutes = report["elapsed_s"] / 60
  md = [f"# QuRe on the synthetic set: {len(report['arms'])} arms x {len(report['seeds'])} "
        "seeds", "",
        f"Config `{report['config']}`; seeds {report['seeds']}; mean ± sample standard "
        "deviation over seeds. Retrieval on the validation split (the reference excluded); "
        "mAP and rel@5 over every relevant image; the preference rate is QuRe Eq. 9 on two "
        "fixed sets of five per query, the one with more relevant images preferred. "
        f"Wall time {minutes:.1f} min (training: "
        f"{sum(report['train_s'].values()) / 60:.1f} min).", "", tables(report), claims(report),
        ""] + [f"![{f}]({f})" for f in figs]
  (out / "study.md").write_text("\n".join(md) + "\n")


def plots(report: dict, out: Path) -> list[str]:
  # matplotlib is heavy and only the report draws.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  arms, summ = report["arms"], report["summary"]
  files = []
  for name, keys, scale, title in (
      ("study_metrics.png", ("R@10", "mAP@10", "rel@5", "preference_rate"), 1.0,
       "retrieval (mean ± std over seeds)"),
      ("study_false_negatives.png", tuple(f"final/fn_share/{s}" for s in
                                          mining_audit.STRATEGIES), 100.0,
       "relevant share of drawn negatives per pool, final models (%)")):
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(arms), 3.6))
    width = 0.8 / len(keys)
    x = np.arange(len(arms))
    for i, k in enumerate(keys):
      m = [scale * summ[a].get(k, {}).get("mean", float("nan")) for a in arms]
      e = [scale * summ[a].get(k, {}).get("std", 0.0) for a in arms]
      ax.bar(x + (i - (len(keys) - 1) / 2) * width, m, width, yerr=e, capsize=2,
             label=k.split("/")[-1] if "/" in k else k)
    ax.set_xticks(x, arms, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    files.append(name)
  return files


__all__ = ["write", "tables", "claims", "plots"]

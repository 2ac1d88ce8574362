"""The QuRe study's report: from the per-run results `cirjax.study` collects, the summaries,
paired comparisons (`cirjax.study_stats`), a verdict per false-negative density computed from
the numbers, `study.json`, `study.md` and the curves plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cirjax import study_stats
from cirjax.mining import audit as mining_audit

HEADLINE = ("mAP@10", "R@10", "Rsubset@1", "rel@5", "preference_rate", "R@1", "R@50")
# The pool each arm draws its negatives from in training (None: in-batch only).
OWN_POOL = {"infonce_inbatch": None, "pairwise_topk": "topk",
            "pairwise_topk_oracle": "topk_oracle",
            "pairwise_corpus": "corpus", "pairwise_qure": "qure", "infonce_qure": "qure"}
# Secondary comparisons, (a, b, metric), b = "start" for the arm's own warm-up; Holm-adjusted
# together over every density.
SECONDARY = (
    ("pairwise_qure", "pairwise_corpus", None), ("pairwise_qure", "pairwise_topk_oracle", None),
    ("pairwise_topk_oracle", "pairwise_topk", None), ("pairwise_qure", "infonce_inbatch", None),
    ("infonce_qure", "infonce_inbatch", None),
    ("pairwise_qure", "pairwise_topk", "rel@5"), ("pairwise_qure", "pairwise_topk", "R@10"),
    ("pairwise_qure", "pairwise_topk", "preference_rate"),
) + tuple((a, "start", None) for a in ("infonce_inbatch", "pairwise_topk",
                                        "pairwise_topk_oracle", "pairwise_corpus",
                                        "pairwise_qure", "infonce_qure"))


def _mean_sd(values) -> dict:
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  return {"mean": float(v.mean()) if v.size else float("nan"),
          "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def _replicates(dens: dict, arm: str, metric: str) -> dict[str, float]:
  """`{"w/s": value}` of `arm`'s final runs; `start`: each replicate's warm-up."""
  if arm == "start":
    keys = next(iter(dens["final"].values()), {})
    return {k: dens["warmups"][k.split("/")[0]]["test"].get(metric) for k in keys}
  return {k: r["test"].get(metric) for k, r in dens["final"].get(arm, {}).items()}


def compare(dens: dict, a: str, b: str, metric: str, n_boot: int) -> dict | None:
  """Paired differences `a - b` over the replicates both have: t interval and bootstrap."""
  if (a != "start" and a not in dens["final"]) or (b != "start" and b not in dens["final"]):
    return None
  ra, rb = _replicates(dens, a, metric), _replicates(dens, b, metric)
  keys = sorted(k for k in ra if k in rb and ra[k] is not None and rb[k] is not None)
  if not keys:
    return None
  diffs = {k: ra[k] - rb[k] for k in keys}
  out = {"a": a, "b": b, "metric": metric, **study_stats.paired_t(list(diffs.values()))}
  ws = sorted({k.split("/")[0] for k in keys})
  ss = sorted({k.split("/")[1] for k in keys})
  if all(f"{w}/{s}" in diffs for w in ws for s in ss):
    boot = study_stats.hierarchical_bootstrap(
        [[diffs[f"{w}/{s}"] for s in ss] for w in ws], n_boot=n_boot)
    out["boot_lo"], out["boot_hi"] = boot["lo"], boot["hi"]
  return out


def _fn_measured(dens: dict) -> dict:
  """Top-k's false-negative share per drawn negative at this density: the warm-up models
  mining the training split, and pairwise_topk's own mining rounds in training."""
  out = {"warmup_topk": _mean_sd(r["test"].get("final/fn_share/topk")
                                 for r in dens["warmups"].values())}
  rounds = [m.get("fn_share/topk") for r in dens["final"].get("pairwise_topk", {}).values()
            for m in r["mined"]]
  out["training_topk"] = _mean_sd(rounds)
  return out


def _claim1(dens: dict) -> dict:
  """Every strategy's relevant share, per drawn negative and pooled, as the final
  pairwise_qure models (else the warm-ups) mine the training split."""
  runs = list(dens["final"].get("pairwise_qure", {}).values()) or list(dens["warmups"].values())
  return {s: {m: _mean_sd(r["test"].get(f"final/{m}/{s}") for r in runs)
              for m in ("fn_share", "fn_share_pooled", "fn_queries", "pool_size")}
          for s in mining_audit.STRATEGIES}


def _mining_rounds(dens: dict) -> dict:
  """Per arm and mining round: the mined negatives' pair loss / accuracy and the relevant
  share of its own pool, mean over replicates."""
  out = {}
  for arm, runs in dens["final"].items():
    pool = OWN_POOL.get(arm)
    n = max((len(r["mined"]) for r in runs.values()), default=0)
    rows = []
    for i in range(n):
      recs = [r["mined"][i] for r in runs.values() if len(r["mined"]) > i]
      rows.append({"epoch": recs[0].get("epoch"),
                   "pair_loss": _mean_sd(x.get("mined_pair_loss") for x in recs)["mean"],
                   "pair_acc": _mean_sd(x.get("mined_pair_acc") for x in recs)["mean"],
                   "fn_share": (_mean_sd(x.get(f"fn_share/{pool}") for x in recs)["mean"]
                                if pool else float("nan"))})
    if rows:
      out[arm] = rows
  return out


def _curves(dens: dict, metric: str) -> dict:
  """Per arm: the validation `metric` after each epoch, mean over replicates."""
  out = {}
  for arm, runs in dens["final"].items():
    by_epoch: dict[int, list] = {}
    for r in runs.values():
      for rec in r["curve"]:
        if metric in rec:
          by_epoch.setdefault(int(rec["epoch"]), []).append(rec[metric])
    out[arm] = [[e, float(np.mean(v))] for e, v in sorted(by_epoch.items())]
  return out


def verdict(primary: dict | None, pair: tuple[str, str], metric: str) -> str:
  """One plain sentence from the primary comparison's interval."""
  if not primary:
    return "not measured (an arm of the primary comparison was not run)"
  a, b = pair
  if primary["n"] < 2:
    return (f"No verdict: one replicate ({a} − {b} on {metric} {primary['mean']:+.2f}), no "
            "interval.")
  d = study_stats.direction(primary["lo"], primary["hi"])
  ci = (f"{metric} {primary['mean']:+.2f}, 95 % CI [{primary['lo']:+.2f}, "
        f"{primary['hi']:+.2f}], n = {primary['n']}")
  if d == "higher":
    return f"QuRe's claim holds here: {a} trains better than {b} ({ci})."
  if d == "lower":
    return f"QuRe's claim fails here: {a} trains worse than {b} ({ci})."
  return f"No difference shown between {a} and {b} ({ci})."


def build(spec: str, st: dict, arms, results: dict, *, elapsed_s: float) -> dict:
  """The report's dictionary (also `study.json`)."""
  primary, pair, n_boot = st["primary"], tuple(st["primary_pair"]), int(st["bootstrap"])
  out = {"config": spec, "arms": list(arms), "primary": f"{primary} on {st['report_split']}",
         "primary_pair": list(pair), "warmups": st["warmups"], "seeds": st["seeds"],
         "densities": {}, "elapsed_s": elapsed_s}
  secondary = []
  n_runs, compute_s, cpu_s = 0, 0.0, 0.0
  for name, dens in results.items():
    all_runs = list(dens["warmups"].values()) + list({
        id(r): r for runs in dens["final"].values() for r in runs.values()}.values())
    n_runs += len(all_runs)
    compute_s += sum(r["train_s"] + r["score_s"] for r in all_runs)
    cpu_s += sum(r.get("cpu_s", 0.0) for r in all_runs)
    prim = compare(dens, pair[0], pair[1], primary, n_boot)
    d = {"synth": dens["synth"], "k": dens["k"], "lr": dens["lr"], "tuning": dens["tuning"],
         "fn_measured": _fn_measured(dens),
         "start": {m: _mean_sd(r["test"].get(m) for r in dens["warmups"].values())
                   for m in HEADLINE},
         "warmup_epochs": [len(r["curve"]) for r in dens["warmups"].values()],
         "summary": {a: {m: _mean_sd(r["test"].get(m) for r in dens["final"][a].values())
                         for m in HEADLINE} for a in dens["final"]},
         "claim1": _claim1(dens), "mining_rounds": _mining_rounds(dens),
         "curves": _curves(dens, primary), "primary": prim,
         "verdict": verdict(prim, pair, primary), "secondary": []}
    for a, b, m in SECONDARY:
      c = compare(dens, a, b, m or primary, n_boot)
      if c:
        c["density"] = name
        d["secondary"].append(c)
        secondary.append(c)
    out["densities"][name] = d
  for c, p in zip(secondary, study_stats.holm([c["p"] for c in secondary])):
    c["p_holm"] = p
    c["holds"] = bool(math.isfinite(p) and p < 1 - study_stats.LEVEL)
  out["runs"] = n_runs
  out["compute_s"] = compute_s
  out["cpu_s"] = cpu_s
  out["results"] = results
  return out


def _ms(s: dict, scale: float = 1.0) -> str:
  if not s or not s["n"] or not math.isfinite(s["mean"]):
    return "–"
  return f"{scale * s['mean']:.2f} ± {scale * s['sd']:.2f}"


def _ci(c: dict) -> str:
  if not math.isfinite(c.get("lo", math.nan)):
    return f"{c['mean']:+.2f} (n = {c['n']}: no interval)"
  boot = (f"; bootstrap [{c['boot_lo']:+.2f}, {c['boot_hi']:+.2f}]" if "boot_lo" in c else "")
  return f"{c['mean']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]{boot}"


def markdown(report: dict, figures: list[str]) -> str:
  r = report
  md = [f"# QuRe on the synthetic set: {len(r['arms'])} arms, "
        f"{len(r['densities'])} false-negative densities", "",
        f"Config `{r['config']}`. Primary metric, declared before the runs: **{r['primary']}**, "
        f"{r['primary_pair'][0]} − {r['primary_pair'][1]}, paired over {r['warmups']} "
        f"warm-ups x {r['seeds']} seeds (95 % t interval; bootstrap over warm-ups, then seeds). "
        "Secondary comparisons: Holm-adjusted p over all densities. Every arm: the same step "
        "budget, its lr tuned on validation, mean ± sd over replicates on the report split. "
        f"{r['runs']} runs, {r['compute_s'] / 60:.1f} min of training and scoring, "
        f"{r.get('cpu_s', 0.0) / 60:.1f} CPU-min ({r['elapsed_s'] / 60:.1f} min wall time in "
        "this invocation).", ""]
  for name, d in r["densities"].items():
    fn = d["fn_measured"]
    md += [f"## Density `{name}`: {d['synth'].get('min_duplicates', 1)}–"
           f"{d['synth'].get('max_duplicates', 6)} images per attribute combination, "
           f"k = {d['k']}", "",
           f"**Verdict:** {d['verdict']}", "",
           f"Top-k's measured false-negative share (per drawn negative): "
           f"{_ms(fn['warmup_topk'], 100)} % with the warm-ups, "
           f"{_ms(fn['training_topk'], 100)} % over pairwise_topk's mining rounds. "
           f"Warm-ups stopped after {d['warmup_epochs']} epochs.", "",
           "| arm | lr (tuned) | " + " | ".join(HEADLINE) + " |",
           "|" + "---|" * (2 + len(HEADLINE)),
           "| warm-up (start) | – | " + " | ".join(_ms(d["start"][m]) for m in HEADLINE)
           + " |"]
    for a, s in d["summary"].items():
      md.append(f"| {a} | {d['lr'][a]:g} | " + " | ".join(_ms(s[m]) for m in HEADLINE) + " |")
    md += ["", "Validation " + r["primary"].split(" ")[0] + " of each tuning run (warm-up 0, "
           "seed 0): " + "; ".join(f"{a}: " + ", ".join(f"{lr} → {v:.2f}" for lr, v in t.items())
                                   for a, t in d["tuning"].items()), "",
           "Paired differences (95 % CI):", ""]
    if d["primary"]:
      md.append(f"* **primary** {d['primary']['a']} − {d['primary']['b']} on "
                f"{d['primary']['metric']}: {_ci(d['primary'])}")
    for c in d["secondary"]:
      md.append(f"* {c['a']} − {c['b']} on {c['metric']}: {_ci(c)}, Holm p = "
                f"{c['p_holm']:.3g}" + (" (holds)" if c["holds"] else ""))
    md += ["", "Claim 1, each pool's relevant share when the final pairwise_qure models mine "
           "the training split (%, per drawn negative / pooled over all pool entries; the "
           "whole corpus is the random baseline):", "",
           "| pool | per drawn negative | pooled | queries with one | pool size |",
           "|---|---|---|---|---|"]
    for s, v in d["claim1"].items():
      md.append(f"| {s} | {_ms(v['fn_share'], 100)} | {_ms(v['fn_share_pooled'], 100)} | "
                f"{_ms(v['fn_queries'], 100)} | {_ms(v['pool_size'])} |")
    md += ["", "Mining rounds in training (mean over replicates): epoch, QuRe's pairwise "
           "loss / pair accuracy on the mined negatives, relevant share of the pool:", ""]
    for a, rows in d["mining_rounds"].items():
      md.append(f"* {a}: " + "; ".join(
          f"e{x['epoch']:.0f} {x['pair_loss']:.3f} / {x['pair_acc']:.3f} / "
          f"{100 * x['fn_share']:.1f} %" for x in rows))
    md.append("")
  md += [f"![{f}]({f})" for f in figures]
  return "\n".join(md) + "\n"


def plot_curves(report: dict, out: Path) -> str:
  # matplotlib is heavy and only the report draws.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  dens = report["densities"]
  fig, axes = plt.subplots(1, len(dens), figsize=(4.2 * len(dens), 3.4), squeeze=False)
  metric = report["primary"].split(" ")[0]
  for ax, (name, d) in zip(axes[0], dens.items()):
    for arm, pts in d["curves"].items():
      if pts:
        e, v = zip(*pts)
        ax.plot(e, v, marker=".", label=arm)
    ax.axhline(d["start"][metric]["mean"], color="gray", ls="--", lw=0.8, label="warm-up")
    ax.set_title(f"density {name}: validation {metric}", fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(out / "study_curves.png", dpi=110)
  plt.close(fig)
  return "study_curves.png"


def write(report: dict, out: Path) -> None:
  """`study.json`, `study.md` and `study_curves.png` under `out`."""
  out.mkdir(parents=True, exist_ok=True)
  fig = plot_curves(report, out)
  (out / "study.json").write_text(json.dumps(report, indent=1))
  (out / "study.md").write_text(markdown(report, [fig]))


__all__ = ["build", "write", "compare", "verdict", "markdown", "plot_curves", "SECONDARY"]

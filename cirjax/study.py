"""The QuRe study on the synthetic set: one warm-up, five arms, several seeds, scored against
every query's full relevant set (docs/study.md).

`run_study(spec, workdir, out)` trains the config's warm-up (`arm=warmup`) once, then every
arm from its exported model with each seed (a finished run is reused: the study resumes),
and scores each final model:

* retrieval on the validation split (`evaluate_split`: R@{1,5,10,50}, Recall_subset@1,
  mAP@{5,10,25} over the full relevant sets, `rel@5` the share of relevant images in the top 5);
* a synthetic preference rate, QuRe Eq. 9 exactly (`metrics.preference_rate`): per validation
  query two fixed sets of five images (`preference_pairs`), the one with more truly relevant
  images is the preferred one; the rate is P(preferred | the model's mean score of set 1 is
  higher);
* the false negatives of each mining strategy (`mining_audit.audit_split`) when the final
  model mines the training split, and those of the arm's own last mining round in training.

Mean and spread over seeds go to `OUT/study.json`, a Markdown report `OUT/study.md` and plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from cirjax import mining_audit
from cirjax.commands.mine import encode_with_checkpoint
from cirjax.data import synth
from cirjax.eval import evaluate, metrics
from cirjax.train import config_utils

RETRIEVAL = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "mAP@5", "mAP@10", "mAP@25", "rel@5")
SET_SIZE = 5


def arm_spec(spec: str, arm: str) -> str:
  """`configs/x.py[:args]` with `arm` added to its arguments."""
  path, _, arg = spec.partition(".py:")
  path = path if path.endswith(".py") else path + ".py"
  return f"{path}:{','.join(x for x in (arg, f'arm={arm}') if x)}"


def preference_pairs(split, root: str | Path, seed: int = 0):
  """Two sets of five corpus images per query, fixed for every model (HP-FashionIQ's shape).

  A set holds `r` of the query's relevant images and `5 - r` near misses (images one
  attribute away from the target's combination, the reference excluded; then two away, then
  any other); the two sets differ in `r` (drawn uniformly among 0..min(5, |relevant|)), so
  one is truly better. Which one is set 1 is random.

  Returns `(query_rows [M], set1 [M, 5], set2 [M, 5], preferred [M])`, corpus indices.
  """
  attrs = json.loads((Path(root) / "attributes" / f"{split.split}.json").read_text())
  attrs = attrs["attributes"]
  names = list(split.corpus)
  index = split.corpus_index()
  keys = tuple(synth.ATTR_NAMES)
  combo = np.array([[attrs[n][k] for k in keys] for n in names])
  rows, s1, s2, pref = [], [], [], []
  for qi, q in enumerate(split.queries):
    rng = np.random.default_rng([seed, qi])
    rel = np.array([index[n] for n in q.relevant if n in index])
    if rel.size == 0:
      continue
    want = np.array([attrs[q.target][k] for k in keys])
    dist = (combo != want).sum(axis=1)
    dist[index[q.reference]] = 99
    dist[rel] = 99
    order = np.lexsort((rng.random(len(names)), dist))   # nearest first, ties at random
    near = order[dist[order] < 99]
    r1, r2 = rng.choice(min(SET_SIZE, rel.size) + 1, 2, replace=False)
    sets = [np.concatenate([rng.choice(rel, r, replace=False), near[:SET_SIZE - r]])
            for r in (r1, r2)]
    if any(len(s) < SET_SIZE for s in sets):
      continue
    rows.append(qi)
    s1.append(sets[0])
    s2.append(sets[1])
    pref.append(1 if r1 > r2 else 2)
  return (np.array(rows, np.int64), np.array(s1, np.int64), np.array(s2, np.int64),
          np.array(pref, np.int64))


def score_model(model_dir: str | Path, config, log: Callable[[str], None] = print) -> dict:
  """Retrieval, preference rate and the final model's false negatives (see module doc)."""
  root = str(Path(config.data.root).expanduser())
  val = synth.read_synthetic(root, config.data.eval_split)
  kw = dict(max_length=int(config.data.max_text_length), log=None)
  scorer = encode_with_checkpoint(str(model_dir), val, root, **kw)
  res = evaluate.evaluate_split(val, scorer)
  out = {k: float(res.metrics[k]) for k in RETRIEVAL if k in res.metrics}
  rows, s1, s2, pref = preference_pairs(val, root, int(config.study.preference_seed))
  p = metrics.preference_rate(scorer.pairs(rows, s1), scorer.pairs(rows, s2), pref)
  out["preference_rate"] = p["preference_rate"]
  out["preference_n"] = p["n_set1_higher"]
  train = synth.read_synthetic(root, config.data.train_split)
  audit = mining_audit.audit_split(
      encode_with_checkpoint(str(model_dir), train, root, **kw), train,
      k=min(int(config.qure.k), len(train.corpus) - 1),
      consecutive_threshold=int(config.qure.consecutive_threshold))
  out.update({f"final/{k}": v for k, v in mining_audit.audit_metrics(audit.audits).items()})
  log(f"[study] {model_dir}: " + ", ".join(f"{k} {out[k]:.2f}" for k in RETRIEVAL if k in out)
      + f", preference {out['preference_rate']:.1f}")
  return out


def mined_in_training(workdir: str | Path) -> dict:
  """The false-negative numbers of a run's last mining round (`metrics.jsonl`), if any."""
  path = Path(workdir) / "metrics.jsonl"
  last = {}
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    if rec.get("kind") == "mining":
      last = rec
  return {f"mined/{k}": float(v) for k, v in last.items()
          if k.split("/")[0] in mining_audit.METRICS and "/" in k}


def train_once(config, workdir: Path, log: Callable[[str], None]) -> float:
  """Trains unless `workdir` already holds the finished run; returns the seconds spent."""
  if (workdir / "final_metrics.json").is_file() and (workdir / "model").is_dir():
    log(f"[study] {workdir}: finished before, reused")
    return 0.0
  # The trainer pulls in the whole training stack: only a study that trains needs it.
  from cirjax.train.trainer import train  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  result = train(config, str(workdir))
  if result["status"] != "done":
    log(f"[study] {workdir}: training ended with status {result['status']} "
        f"({result.get('error', '')}); its last exported state is scored as measured")
  return time.perf_counter() - t0


def summarize(runs: Sequence[dict]) -> dict:
  """Per metric over seeds: mean, sample standard deviation (0 for one seed), values."""
  keys = sorted({k for r in runs for k, v in r.items() if isinstance(v, (int, float))})
  out = {}
  for k in keys:
    v = np.array([r[k] for r in runs if k in r], np.float64)
    v = v[np.isfinite(v)]
    out[k] = {"mean": float(v.mean()) if v.size else float("nan"),
              "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
              "n": int(v.size), "values": v.tolist()}
  return out


def run_study(spec: str, workdir: str | Path, out: str | Path, *,
              arms: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None,
              log: Callable[[str], None] = print) -> dict:
  """Warm-up, then every arm x seed from it; scores, aggregates and writes the report."""
  # The report module draws with matplotlib: loaded with the study only.
  from cirjax import study_report  # pylint: disable=g-import-not-at-top
  t_start = time.perf_counter()
  workdir, out = Path(workdir), Path(out)
  base = config_utils.load_config(arm_spec(spec, "warmup"))
  arms = list(arms or base.study.arms)
  seeds = [int(s) for s in (seeds if seeds is not None else base.study.seeds)]
  unknown = [a for a in arms if a not in base.study.arms]
  if unknown:
    raise ValueError(f"arms {unknown}: {spec} has {', '.join(base.study.arms)}")
  if not seeds:
    raise ValueError("no seeds: give at least one")
  warm = workdir / "warmup"
  times = {"warmup": train_once(base, warm, log)}
  report = {"config": spec, "arms": arms, "seeds": seeds, "warmup": score_model(warm / "model",
                                                                                  base, log),
            "runs": {}, "summary": {}}
  for arm in arms:
    runs = []
    for seed in seeds:
      cfg = config_utils.load_config(arm_spec(spec, arm),
                                     [f"seed={seed}", f"model.init={warm / 'model'}"])
      wd = workdir / f"{arm}_seed{seed}"
      secs = train_once(cfg, wd, log)
      times[wd.name] = secs
      run = {"seed": seed, "train_s": secs, **mined_in_training(wd),
             **score_model(wd / "model", cfg, log)}
      runs.append(run)
    report["runs"][arm] = runs
    report["summary"][arm] = summarize(runs)
  report["train_s"] = times
  report["elapsed_s"] = time.perf_counter() - t_start
  out.mkdir(parents=True, exist_ok=True)
  (out / "study.json").write_text(json.dumps(report, indent=2))
  study_report.write(report, out)
  log(f"[study] wrote {out / 'study.json'}, {out / 'study.md'} "
      f"({report['elapsed_s'] / 60:.1f} min)")
  return report


__all__ = ["run_study", "score_model", "preference_pairs", "summarize", "arm_spec",
           "mined_in_training", "RETRIEVAL"]

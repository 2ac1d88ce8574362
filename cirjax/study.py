"""The QuRe study on the synthetic set: warm-ups to a plateau, every arm tuned the same way,
paired replicates over warm-ups and seeds, three false-negative densities (docs/study.md).

`run_study(spec, workdir)` runs, per density of the config's `study.densities`:

1. `study.warmups` warm-ups (`arm=warmup`, seed w), each stopped when the validation
   `study.plateau.metric` has not improved by `min_delta` for `patience` epochs;
2. tuning: every arm at every lr of `study.lrs` from warm-up 0 with seed 0, the grid widened
   by one half-decade while the best lr is at an edge (at most `widen_max` times); the lr
   with the best validation `study.primary` at the end of the run is the arm's;
3. final: every arm at its lr from every warm-up w with seeds 100 w + s, s < `study.seeds`
   (the tuning run is the replicate (0, 0)), scored on `study.report_split`.

Every run lives in its own trainer workdir and is finished when its `result.json` exists
(written atomically after training and scoring), so a rerun skips finished runs, resumes a
half-trained one from its checkpoint and trains the rest. `cirjax.study_report` turns the
results into the report.

Each finished model is scored (`score_model`) on the report split: retrieval (R@K,
Recall_subset@1, mAP@K over the full relevant sets, `rel@5`), QuRe Eq. 9's preference rate
on two fixed sets of five per query (`preference_pairs`), and the false negatives of every
mining strategy when the final model mines the training split.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from cirjax.data import synth
from cirjax.errors import CirjaxError, UsageError
from cirjax.eval import encoders, evaluate, metrics
from cirjax.mining import audit as mining_audit
from cirjax.train import config_utils
from cirjax.train.preemption import PREEMPTED_EXIT
from cirjax.train.workdir import load_model


class StudyPreempted(CirjaxError):
  """A run was preempted (its checkpoint saved): `cirjax study` exits with `cirjax train`'s
  status for it (75), so a scheduler requeues the same command, which resumes."""
  exit_code = PREEMPTED_EXIT


RETRIEVAL = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "mAP@5", "mAP@10", "mAP@25", "rel@5")
SET_SIZE = 5
RESULT = "result.json"


def arm_spec(spec: str, arm: str, **args) -> str:
  """`configs/x.py[:args]` with `arm` (and `name=value` for each of `args`) added."""
  path, _, arg = spec.partition(".py:")
  path = path if path.endswith(".py") else path + ".py"
  extra = [f"arm={arm}"] + [f"{k}={v}" for k, v in args.items()]
  return f"{path}:{','.join(x for x in [arg] + extra if x)}"


def lr_neighbour(lr: float, up: bool) -> float:
  """The next rung of the 1-3-10 ladder above (or below) `lr`: 3e-4 -> 1e-3, 1e-5 -> 3e-6."""
  k = round(2 * math.log10(lr)) + (1 if up else -1)
  return float(f"{1 if k % 2 == 0 else 3}e{k // 2}")


def lr_tag(lr: float) -> str:
  return f"{lr:g}"


def write_json_atomic(path: Path, obj) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


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


def score_model(model_dir: str | Path, config, split_name: str,
                log: Callable[[str], None] = print) -> dict:
  """Retrieval and preference rate on `split_name`, and the false negatives of every
  strategy when the model mines the training split (`final/...`). `model_dir`: any
  `--checkpoint` (`cirjax.load`), loaded once and encoded as `cirjax eval` encodes."""
  root = str(Path(config.data.root).expanduser())
  model = load_model(model_dir)
  options = encoders.EncodeOptions(max_length=int(config.data.max_text_length))
  split = synth.read_synthetic(root, split_name)
  scorer, _ = encoders.encode(model, split, options, root=root, log=None)
  res = evaluate.evaluate_split(split, scorer)
  out = {k: float(res.metrics[k]) for k in RETRIEVAL if k in res.metrics}
  rows, s1, s2, pref = preference_pairs(split, root, int(config.study.preference_seed))
  p = metrics.preference_rate(scorer.pairs(rows, s1), scorer.pairs(rows, s2), pref)
  out["preference_rate"] = p["preference_rate"]
  out["preference_n"] = p["n_set1_higher"]
  train = synth.read_synthetic(root, config.data.train_split)
  audit = mining_audit.audit_split(
      encoders.encode(model, train, options, root=root, log=None)[0], train,
      k=min(int(config.qure.k), len(train.corpus) - 1),
      consecutive_threshold=int(config.qure.consecutive_threshold))
  out.update({f"final/{k}": v for k, v in mining_audit.audit_metrics(audit.audits).items()})
  log(f"[study] {model_dir} on {split_name}: "
      + ", ".join(f"{k} {out[k]:.2f}" for k in ("R@10", "mAP@10", "rel@5") if k in out))
  return out


def read_log(workdir: str | Path) -> dict:
  """A run's `metrics.jsonl`: its evaluation after each epoch (`curve`) and its mining
  rounds (false negatives, pair loss and accuracy on the mined negatives)."""
  path = Path(workdir) / "metrics.jsonl"
  curve, mined = [], []
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue
    keep = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "time"}
    if rec.get("kind") == "eval":
      curve.append(keep)
    elif rec.get("kind") == "mining":
      mined.append(keep)
  return {"curve": curve, "mined": mined}


class PlateauStop:
  """Trainer hook: ends the run (normally: finalised and exported) at the end of the epoch
  where the validation `metric` has not beaten its best by `min_delta` for `patience`
  epochs, never before `min_epochs` (an early best epoch of a noisy curve is no plateau).
  The history is read back from the workdir, so a resumed warm-up keeps it."""

  def __init__(self, trainer, metric: str, patience: int, min_delta: float,
               min_epochs: int = 0):
    self.trainer, self.metric = trainer, metric
    self.patience, self.min_delta = int(patience), float(min_delta)
    self.min_epochs = int(min_epochs)
    self.values = [r[metric] for r in read_log(trainer.workdir)["curve"] if metric in r]

  def plateaued(self) -> bool:
    v = self.values
    if len(v) <= self.patience or len(v) < self.min_epochs:
      return False
    best_before = max(v[:-self.patience])
    return max(v[-self.patience:]) < best_before + self.min_delta

  def __call__(self, info) -> None:
    if not (info.end_of_epoch and info.eval_metrics and self.metric in info.eval_metrics):
      return
    self.values.append(float(info.eval_metrics[self.metric]))
    if self.plateaued():
      self.trainer.total_steps = info.step


def run_cell(config, workdir: Path, what: str, log: Callable[[str], None],
             plateau: Optional[dict] = None) -> dict:
  """Trains `config` in `workdir` (resuming), scores it and writes `result.json`; a run
  whose `result.json` exists is not touched."""
  result = workdir / RESULT
  if result.is_file():
    return json.loads(result.read_text())
  # The trainer pulls in the whole training stack: only a study that trains needs it.
  from cirjax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
  t0, cpu0 = time.perf_counter(), time.process_time()
  status = "done"
  if not ((workdir / "final_metrics.json").is_file() and (workdir / "model").is_dir()):
    log(f"[study] training {what} in {workdir}")
    trainer = Trainer(config, str(workdir))
    if plateau:
      trainer.add_hook(PlateauStop(trainer, **plateau))
    status = trainer.run()["status"]
    if status == "nonfinite":   # an lr too high for the arm: a tuning outcome, recorded
      out = {"what": what, "lr": float(config.train.lr), "seed": int(config.seed),
             "status": status, "train_s": time.perf_counter() - t0, "score_s": 0.0,
             "val": {}, "test": {}, **read_log(workdir)}
      write_json_atomic(result, out)
      return out
    if status == "preempted":   # SIGTERM / SIGUSR1: saved; the same command resumes it
      raise StudyPreempted(f"{workdir}: preempted, its checkpoint saved; rerun the same "
                           "command to resume")
    if status != "done":
      raise CirjaxError(f"{workdir}: training ended with status {status}; rerun the same "
                        "command to resume")
  train_s = time.perf_counter() - t0
  final = json.loads((workdir / "final_metrics.json").read_text())
  t1 = time.perf_counter()
  scores = score_model(workdir / "model", config, config.study.report_split, log)
  out = {"what": what, "lr": float(config.train.lr), "seed": int(config.seed),
         "status": "done", "steps": int(final.get("steps", 0)), "train_s": train_s,
         "score_s": time.perf_counter() - t1,
         "cpu_s": time.process_time() - cpu0,   # all threads: the cost on an idle machine
         "val": final["final_metrics"],
         "test": scores, **read_log(workdir)}
  write_json_atomic(result, out)
  return out


def check_out(out: Path, overwrite: bool) -> None:
  """A report directory that already holds files is only written with `overwrite`."""
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out {out}: exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise UsageError(f"--out {out} is not empty (a committed report?): pass --overwrite to "
                     "replace its files, or choose another directory")


def _use_compilation_cache(workdir: Path) -> None:
  """Hundreds of runs compile the same few programs: a persistent XLA cache in the workdir
  (unless the process already has one) compiles each once."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(workdir / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def check_data(config) -> None:
  """A data directory made earlier with other generator settings (another density) would be
  read as it is: refuse it, naming the setting."""
  meta = Path(config.data.root).expanduser() / "meta.json"
  if not meta.is_file():
    return
  have = json.loads(meta.read_text())
  for k, v in dict(config.data.synth).items():
    want = list(v) if isinstance(v, (list, tuple)) else v
    got = have.get(k, 1 if k == "min_duplicates" else None)   # before the knob existed: 1
    if got != want:
      raise UsageError(f"{meta}: {k} = {got!r}, but the study config wants {want!r}; "
                       "point $CIRJAX_DATA elsewhere or remove that directory")


def run_density(spec: str, workdir: Path, density: str, arms: Sequence[str],
                log: Callable[[str], None]) -> dict:
  """Warm-ups, tuning and final replicates of one density (see the module docstring)."""
  base = config_utils.load_config(arm_spec(spec, "warmup", density=density))
  st = base.study
  check_data(base)
  wd = workdir / density
  warmups = {}
  for w in range(int(st.warmups)):
    cfg = config_utils.load_config(arm_spec(spec, "warmup", density=density), [f"seed={w}"])
    warmups[w] = run_cell(cfg, wd / f"warmup{w}", f"{density} warm-up {w}", log,
                          plateau=dict(st.plateau))

  def cell(arm, lr, w, s):
    cfg = config_utils.load_config(
        arm_spec(spec, arm, density=density),
        [f"seed={100 * w + s}", f"model.init={wd / f'warmup{w}' / 'model'}", f"train.lr={lr}"])
    return run_cell(cfg, wd / arm / f"lr{lr_tag(lr)}_w{w}_s{s}",
                    f"{density} {arm} lr {lr_tag(lr)} warm-up {w} seed {s}", log)

  tuning, chosen = {}, {}
  for arm in arms:
    grid = sorted(float(x) for x in st.lrs)
    runs = {lr: cell(arm, lr, 0, 0) for lr in grid}
    for _ in range(int(st.widen_max) if len(grid) > 1 else 0):
      best = max(runs, key=lambda lr: runs[lr]["val"].get(st.primary, -math.inf))
      if best not in (min(runs), max(runs)):
        break
      lr = lr_neighbour(best, up=best == max(runs))
      log(f"[study] {density} {arm}: best lr {lr_tag(best)} at the grid's edge, adding "
          f"{lr_tag(lr)}")
      runs[lr] = cell(arm, lr, 0, 0)
    chosen[arm] = max(sorted(runs), key=lambda lr: runs[lr]["val"].get(st.primary, -math.inf))
    tuning[arm] = {lr_tag(lr): runs[lr]["val"].get(st.primary) for lr in sorted(runs)}
  final = {arm: {f"{w}/{s}": cell(arm, chosen[arm], w, s) for w in range(int(st.warmups))
                 for s in range(int(st.seeds))} for arm in arms}
  return {"warmups": {str(w): r for w, r in warmups.items()}, "tuning": tuning,
          "lr": {a: chosen[a] for a in arms}, "final": final,
          "synth": dict(base.data.synth), "k": int(base.qure.k)}


def run_study(spec: str, workdir: str | Path, out: str | Path | None = None, *,
              overwrite: bool = False, arms: Optional[Sequence[str]] = None,
              densities: Optional[Sequence[str]] = None,
              log: Callable[[str], None] = print) -> dict:
  """Every density's warm-ups, tuning and replicates, then the report in `out` (default
  `workdir/report`)."""
  # The report module draws with matplotlib: loaded with the study only.
  from cirjax import study_report  # pylint: disable=g-import-not-at-top
  t_start = time.perf_counter()
  workdir = Path(workdir)
  # The workdir's own report is rewritten by every rerun; any other directory that holds
  # files (the committed report) only with `overwrite`.
  if out:
    check_out(Path(out), overwrite)
  out = Path(out) if out else workdir / "report"
  base = config_utils.load_config(arm_spec(spec, "warmup"))
  arms = list(arms or base.study.arms)
  densities = list(densities or base.study.densities)
  unknown = [a for a in arms if a not in base.study.arms]
  if unknown:
    raise UsageError(f"--arms {','.join(unknown)}: {spec} has {', '.join(base.study.arms)}")
  bad = [d for d in densities if d not in base.study.densities]
  if bad:
    raise UsageError(f"--densities {','.join(bad)}: {spec} has "
                     f"{', '.join(base.study.densities)}")
  workdir.mkdir(parents=True, exist_ok=True)
  _use_compilation_cache(workdir)
  results = {d: run_density(spec, workdir, d, arms, log) for d in densities}
  report = study_report.build(spec, dict(base.study), arms, results,
                              elapsed_s=time.perf_counter() - t_start)
  study_report.write(report, out)
  log(f"[study] wrote {out / 'study.json'}, {out / 'study.md'} "
      f"({report['elapsed_s'] / 60:.1f} min)")
  return report


__all__ = ["run_study", "run_density", "run_cell", "score_model", "preference_pairs",
           "arm_spec", "lr_neighbour", "read_log", "PlateauStop", "check_out", "RETRIEVAL"]

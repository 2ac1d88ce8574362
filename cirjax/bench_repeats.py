"""Repeated runs of a benchmark suite, and the speed goals judged over them.

`cirjax bench --repeats N` runs a suite N times (each run: warm-up, then the suite's own
medians, jax and torch timed as the suite times them). `combine_runs` keeps every run's
figures in each row's `runs` and reports the row of the median run (by step time), with each
ratio column (`speedup_vs_torch`, `vs_*`) the median of the runs' ratios: a run's ratio
pairs two sides timed under the same conditions, two runs' medians do not.

A speed goal (`SPEED_GOALS`) is met when it held in every run of at least `RUNS_TO_COUNT`
runs and none of them was loaded (`cirjax.bench_load`): "3 of 3 idle runs".
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Sequence

RUNS_TO_COUNT = 3


@dataclasses.dataclass(frozen=True)
class Goal:
  """`column` of the cirjax (impl 'jax') rows named `name` in `suite` is at least `minimum`."""
  suite: str
  name: str
  column: str
  minimum: float
  source: str


_ISSUE28 = "issue 28: ahead of PyTorch on an idle 2-core CPU"
_ISSUE18 = "issue 18: GPU goals (docs/benchmarks.md)"
SPEED_GOALS = {
    "cpu": (
        Goal("train", "qure_step_cached", "speedup_vs_torch", 1.5, _ISSUE28),
        Goal("train", "qure_step_pixels", "speedup_vs_torch", 1.3, _ISSUE28),
        Goal("blip2", "encode_image", "speedup_vs_torch", 1.3, _ISSUE28),
        Goal("blip2", "compose", "speedup_vs_torch", 1.3, _ISSUE28),
        *(Goal("eval", f"retrieve_{kind}{at}", "speedup_vs_torch", 1.2, _ISSUE28)
          for at in ("", "_cirr", "_fiq_shirt") for kind in ("single", "qure")),
    ),
    "gpu": (
        Goal("train", "qure_step_cached", "vs_torch_eager", 1.5, _ISSUE18),
        Goal("train", "qure_step_pixels", "vs_torch_eager", 1.5, _ISSUE18),
        Goal("train", "qure_step_pixels", "mfu", 0.40, _ISSUE18),
        Goal("llava", "llava_lora_step", "speedup_vs_torch", 1.3, _ISSUE18),
    ),
}

# What each run keeps of a row: its timing and every ratio a goal may read.
_RUN_KEYS = ("step_time_s", "step_time_ms", "samples_per_s", "tflops_per_s", "mfu")


def goals_for(device: str, suite: str) -> list[Goal]:
  return [g for g in SPEED_GOALS.get(device, ()) if g.suite == suite]


def default_repeats(device: str, suite: str, quick: bool) -> int:
  """Runs of a suite without `--repeats`: enough to judge its speed goals, else one."""
  if quick:
    return 1
  return RUNS_TO_COUNT if goals_for(device, suite) else 1


def _key(row: dict) -> tuple:
  return row.get("name"), row.get("impl"), row.get("variant")


def _ratio_keys(row: dict) -> list[str]:
  return [k for k in row if k == "speedup_vs_torch" or k.startswith("vs_")]


def _run_summary(row: dict) -> dict:
  keep = {k: row[k] for k in (*_RUN_KEYS, *_ratio_keys(row)) if row.get(k) is not None}
  cond = row.get("conditions") or {}
  keep["load_1m_start"] = (cond.get("start") or {}).get("load_1m")
  keep["load_1m_end"] = (cond.get("end") or {}).get("load_1m")
  keep["loaded"] = bool(row.get("loaded"))
  return keep


def combine_runs(runs: Sequence[Sequence[dict]]) -> list[dict]:
  """One row per (name, impl, variant), in the first run's order: the median run's row (by
  step time; the lower median for an even count) with `runs` (every run's figures, in run
  order), `median_run` (its 1-based number) and each ratio column the median over the runs."""
  order, by_key = [], {}
  for run in runs:
    for row in run:
      k = _key(row)
      if k not in by_key:
        order.append(k)
        by_key[k] = []
      by_key[k].append(row)
  out = []
  for k in order:
    rows = by_key[k]
    timed = [i for i, r in enumerate(rows) if r.get("step_time_s") is not None]
    pick = sorted(timed, key=lambda i: rows[i]["step_time_s"])[(len(timed) - 1) // 2] \
        if timed else 0
    row = dict(rows[pick])
    for col in _ratio_keys(row):
      values = [r[col] for r in rows if r.get(col) is not None]
      row[col] = statistics.median(values)
    row["runs"] = [_run_summary(r) for r in rows]
    row["median_run"] = pick + 1
    row["loaded"] = any(r.get("loaded") for r in rows)
    out.append(row)
  return out


def judge_goals(device: str, suite: str, rows: Sequence[dict]) -> list[dict]:
  """Each goal of `suite` on its rows: the value in every run, in how many it held, and
  whether it is met (held in all of at least RUNS_TO_COUNT idle runs)."""
  verdicts = []
  for goal in goals_for(device, suite):
    for row in rows:
      if row.get("name") != goal.name or row.get("impl") != "jax":
        continue
      runs = row.get("runs") or [_run_summary(row)]
      values = [r.get(goal.column) for r in runs]
      held = sum(v is not None and v >= goal.minimum for v in values)
      idle = sum(not r.get("loaded") for r in runs)
      verdicts.append({
          "suite": suite, "name": goal.name, "variant": row.get("variant"),
          "column": goal.column, "minimum": goal.minimum, "source": goal.source,
          "values": values, "held_runs": held, "runs": len(runs), "idle_runs": idle,
          "met": held == len(runs) == idle and len(runs) >= RUNS_TO_COUNT})
  return verdicts


def _why(v: dict) -> str:
  if v["met"]:
    return "met"
  if v["held_runs"] < v["runs"]:
    return "not met"
  if v["idle_runs"] < v["runs"]:
    return f"held, but {v['runs'] - v['idle_runs']} run(s) loaded: does not count"
  return f"held, but {RUNS_TO_COUNT} of {RUNS_TO_COUNT} idle runs are needed to count"


def _values(v: dict) -> str:
  return ", ".join("-" if x is None else f"{x:.3g}" for x in v["values"])


def verdict_line(v: dict) -> str:
  """One line saying whether a goal held, in how many runs, and whether that counts."""
  variant = f" [{v['variant']}]" if v.get("variant") else ""
  return (f"goal {v['suite']}/{v['name']}{variant} {v['column']} >= {v['minimum']:g}: held in "
          f"{v['held_runs']} of {v['runs']} run(s) ({_values(v)}): {_why(v)}")


def goals_table(verdicts: Sequence[dict]) -> str:
  """Markdown: one line per judged goal."""
  lines = ["| suite | row | goal | value per run | held in | verdict |",
           "|---|---|---|---|---|---|"]
  for v in verdicts:
    variant = f" [{v['variant']}]" if v.get("variant") else ""
    lines.append(f"| {v['suite']} | {v['name']}{variant} | {v['column']} >= {v['minimum']:g} "
                 f"| {_values(v)} | {v['held_runs']} of {v['runs']} | {_why(v)} |")
  return "\n".join(lines)

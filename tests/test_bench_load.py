"""How a benchmark was taken: waiting for a loaded machine (injected load and clock, no real
sleeping), the 'loaded' mark, the threads read, repeated runs and the speed goals over them."""

import os

import jax
import jax.numpy as jnp
import pytest

from cirjax import bench_load
from cirjax import bench_repeats
from cirjax import errors
from cirjax.commands import bench


class FakeMachine:
  """A load that follows `load_at(seconds since start)` and a clock that only `sleep` moves."""

  def __init__(self, load_at):
    self.t, self.load_at, self.sleeps = 0.0, load_at, []

  def policy(self, **kw):
    return bench_load.LoadPolicy(cores=2, read_load=lambda: self.load_at(self.t),
                                 clock=lambda: self.t, sleep=self.sleep, **kw)

  def sleep(self, seconds):
    self.sleeps.append(seconds)
    self.t += seconds


def test_waits_until_the_load_settles_with_a_progress_line_per_poll():
  machine = FakeMachine(lambda t: 3.0 if t < 30 else 1.2)  # idle: at most 0.75 x 2 = 1.5
  lines = []
  wait = bench_load.wait_for_idle(machine.policy(max_wait_s=300, poll_s=15), "suite x",
                                  log=lines.append)
  assert machine.sleeps == [15, 15]
  assert wait["loaded"] is False and wait["waited_s"] == 30
  assert wait["load_1m_before_wait"] == 3.0 and wait["threshold_load_1m"] == 1.5
  assert len(lines) == 2 and all("suite x: 1-minute load 3.00 on 2 cores is above 1.50" in l
                                 for l in lines)
  assert "0 of at most 300 s" in lines[0] and "15 of at most 300 s" in lines[1]


def test_a_load_that_stays_high_is_waited_out_then_marked_loaded():
  machine = FakeMachine(lambda t: 9.0)
  lines = []
  wait = bench_load.wait_for_idle(machine.policy(max_wait_s=40, poll_s=15), "suite x",
                                  log=lines.append)
  assert machine.sleeps == [15, 15, 10]  # bounded: never past max_wait_s
  assert wait["loaded"] is True and wait["waited_s"] == 40
  assert "still above 1.50 after 40 s" in lines[-1] and "marked loaded" in lines[-1]


def test_no_wait_when_idle_or_when_told_not_to_wait():
  idle = FakeMachine(lambda t: 1.5)  # at the threshold counts as idle
  assert bench_load.wait_for_idle(idle.policy(), log=pytest.fail)["loaded"] is False
  busy = FakeMachine(lambda t: 4.0)
  lines = []
  wait = bench_load.wait_for_idle(busy.policy(max_wait_s=0), log=lines.append)
  assert wait["loaded"] is True and busy.sleeps == [] and idle.sleeps == []
  unknown = FakeMachine(lambda t: None)  # no load average on this OS: never marked
  assert bench_load.wait_for_idle(unknown.policy(), log=pytest.fail)["loaded"] is None


def test_policy_values_are_checked():
  with pytest.raises(errors.UsageError, match="--max-wait -1"):
    bench_load.LoadPolicy(max_wait_s=-1)
  with pytest.raises(errors.UsageError, match="--idle-load-per-core 0"):
    bench_load.LoadPolicy(per_core=0)
  assert bench_load.LoadPolicy(per_core=0.5, cores=8).threshold == 4.0


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="threads counted from /proc")
def test_xla_threads_counts_the_started_pool_and_falls_back_to_its_configured_size(
    monkeypatch):
  (jnp.ones((64, 64)) @ jnp.ones((64, 64))).block_until_ready()  # the CPU client is up
  n, source = bench_load.xla_threads()
  assert source.startswith("counted")
  # XLA sizes the pool by $PJRT_NPROC / $NPROC, else by the CPUs this process may run on,
  # and gives it at least a thread per CPU device (the suite runs with 4).
  configured = os.environ.get("PJRT_NPROC") or os.environ.get("NPROC")
  cpus = int(configured) if configured else len(os.sched_getaffinity(0))
  assert n == max(cpus, len(jax.devices("cpu")))
  monkeypatch.setattr(bench_load, "_count_threads", lambda name: 0)
  monkeypatch.setenv("PJRT_NPROC", "3")
  assert bench_load.xla_threads() == (3, "$PJRT_NPROC (XLA's pool size when set; pool not "
                                         "started)")


def _run(loaded: bool, step: float, ratio: float, load: float = 0.5) -> dict:
  cond = {"loaded": loaded, "start": {"load_1m": load}, "end": {"load_1m": load + 1}}
  return [{"name": "r", "impl": "jax", "step_time_s": step, "samples_per_s": 1 / step,
           "speedup_vs_torch": ratio, "vs_torch": ratio, "conditions": cond, "loaded": loaded},
          {"name": "r", "impl": "torch", "step_time_s": step * ratio, "conditions": cond,
           "loaded": loaded}]


def test_repeats_keep_every_run_and_report_the_median_run():
  rows = bench_repeats.combine_runs([_run(False, 0.3, 1.0, 0.1), _run(False, 0.1, 3.0, 0.2),
                                     _run(False, 0.2, 2.5, 0.3)])
  jax_row, torch_row = rows
  assert jax_row["median_run"] == 3 and jax_row["step_time_s"] == 0.2
  assert jax_row["conditions"]["start"]["load_1m"] == 0.3  # the median run's conditions
  assert jax_row["speedup_vs_torch"] == 2.5 and jax_row["vs_torch"] == 2.5  # median of ratios
  assert [r["step_time_s"] for r in jax_row["runs"]] == [0.3, 0.1, 0.2]
  assert [r["load_1m_start"] for r in jax_row["runs"]] == [0.1, 0.2, 0.3]
  assert [r["load_1m_end"] for r in jax_row["runs"]] == [1.1, 1.2, 1.3]
  assert torch_row["median_run"] == 2 and len(torch_row["runs"]) == 3  # 0.3, 0.3, 0.5 s
  two = bench_repeats.combine_runs([_run(False, 0.2, 1.0), _run(False, 0.1, 1.0)])
  assert two[0]["step_time_s"] == 0.1  # the lower median of an even count


@pytest.mark.parametrize("runs, held, met, why", [
    ([(False, 1.3), (False, 1.25), (False, 1.4)], 3, True, "met"),
    ([(False, 1.3), (False, 1.1), (False, 1.4)], 2, False, "not met"),
    ([(False, 1.3), (True, 1.25), (False, 1.4)], 3, False, "1 run(s) loaded: does not count"),
    ([(False, 1.3)], 1, False, "3 of 3 idle runs are needed to count"),
])
def test_a_speed_goal_counts_when_it_held_in_3_of_3_idle_runs(runs, held, met, why):
  rows = bench_repeats.combine_runs([
      [dict(r, name="retrieve_single") for r in _run(loaded, 0.1, ratio)]
      for loaded, ratio in runs])
  (v,) = bench_repeats.judge_goals("cpu", "eval", rows)
  assert v["minimum"] == 1.2 and v["column"] == "speedup_vs_torch"
  assert v["values"] == [ratio for _, ratio in runs]
  assert (v["held_runs"], v["runs"], v["met"]) == (held, len(runs), met)
  line = bench_repeats.verdict_line(v)
  assert line.startswith("goal eval/retrieve_single speedup_vs_torch >= 1.2: held in "
                         f"{held} of {len(runs)} run(s)") and line.endswith(why)


def test_default_repeats_judge_the_goals_and_spare_the_rest():
  assert bench_repeats.default_repeats("cpu", "eval", quick=False) == 3
  assert bench_repeats.default_repeats("cpu", "blip2", quick=False) == 3
  assert bench_repeats.default_repeats("cpu", "mining", quick=False) == 1
  assert bench_repeats.default_repeats("cpu", "eval", quick=True) == 1
  assert bench_repeats.default_repeats("gpu", "llava", quick=False) == 3


def _conditions(load_start, loaded):
  run = {"loaded": loaded, "waited_s": 0.0, "load_1m_before_wait": load_start,
         "start": {"time": "2026-12-05T10:00:00+00:00", "load_1m": load_start,
                   "threads_jax": 2, "threads_torch": 2},
         "end": {"time": "2026-12-05T10:01:00+00:00", "load_1m": 2.0, "threads_jax": 2,
                 "threads_torch": 3}}
  return {"cores": 2, "threshold_load_1m": 1.5, "idle_load_per_core": 0.75, "max_wait_s": 300,
          "threads_jax_source": "counted", "loaded": loaded, "runs": [run]}


def test_readme_table_shows_each_suites_load_threads_and_the_loaded_mark():
  payload = {
      "benchmark": "bench_cpu", "machine": {"date": "2026-12-05", "devices": ["cpu"]},
      "suites": ["mining", "eval", "train"], "suite_dates": {"mining": "2026-11-30"},
      "suite_conditions": {"eval": _conditions(3.5, True), "train": _conditions(0.4, False)},
      "rows": [{"suite": "mining", "name": "m", "impl": "jax"},
               {"suite": "eval", "name": "retrieve_single", "impl": "jax", "loaded": True},
               {"suite": "train", "name": "t", "impl": "jax", "loaded": False}]}
  text = bench.render_markdown(payload)
  assert "| mining | 2026-11-30 | - | not recorded | - | - | - |" in text
  assert ("| eval | 2026-12-05T10:00:00+00:00 | 1 | 3.50 -> 2.00 | 2 (1.50) | 2 / 2 -> 3 "
          "| **loaded** |") in text
  assert "| train | 2026-12-05T10:00:00+00:00 | 1 | 0.40 -> 2.00 | 2 (1.50) | 2 / 2 -> 3 |  |" \
      in text
  assert "| eval (loaded) | retrieve_single | jax |" in text
  assert "| train | t | jax |" in text and "| mining | m | jax |" in text


def test_merge_keeps_the_other_suites_conditions_and_goals():
  old = {"suites": ["mining", "eval"], "machine": {"date": "d0"}, "peak_flops": 1.0,
         "rows": [{"suite": "mining", "name": "m"}, {"suite": "eval", "name": "e"}],
         "suite_conditions": {"mining": _conditions(0.5, False), "eval": _conditions(3.0, True)},
         "goals": [{"suite": "eval", "name": "old"}, {"suite": "train", "name": "gone"}]}
  extra = {"quick": False, "suites": ["eval"], "peak_flops": 2.0, "peak_source": "p",
           "failures": {}, "suite_conditions": {"eval": _conditions(0.2, False)},
           "goals": [{"suite": "eval", "name": "new"}]}
  # pylint: disable-next=protected-access
  rows, merged = bench._merged(old, ["eval"], [{"suite": "eval", "name": "e2"}], extra, "d1")
  assert [r["name"] for r in rows] == ["m", "e2"]
  assert merged["suite_conditions"]["mining"] == old["suite_conditions"]["mining"]
  assert merged["suite_conditions"]["eval"]["loaded"] is False
  assert [g["name"] for g in merged["goals"]] == ["new"]


def test_source_commit_ignores_the_benchs_own_outputs(tmp_path):
  """A bench run rewrites benchmarks/results/ and README.md as it goes: the commit it
  records stays clean; any other change to a tracked file marks it dirty."""
  import subprocess
  from cirjax import benchmarking
  def git(*a):
    subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)
  git("init", "-q")
  (tmp_path / "benchmarks" / "results").mkdir(parents=True)
  for f in ("README.md", "benchmarks/results/eval_cpu.json", "code.py"):
    (tmp_path / f).write_text("x\n")
  git("add", "-A")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
  head = benchmarking.source_commit(tmp_path)
  assert len(head) == 40
  (tmp_path / "README.md").write_text("table\n")
  (tmp_path / "benchmarks/results/eval_cpu.json").write_text("{}\n")
  assert benchmarking.source_commit(tmp_path) == head
  (tmp_path / "code.py").write_text("y\n")
  assert benchmarking.source_commit(tmp_path) == head + "+dirty"
  assert benchmarking.source_commit(tmp_path / "nowhere") is None

"""`cirjax bench`: suite discovery, derived columns and ratios, JSON + table, README section."""

import json
import textwrap

import pytest

from cirjax import bench_load
from cirjax import cli
from cirjax.commands import bench
from cirjax.errors import UsageError

FAKE_SUITE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from cirjax import benchmarking

    def run(device="cpu", quick=False):
      x = jnp.ones((64, 64))
      f = jax.jit(lambda a: a @ a)
      compiled = f.lower(x).compile()
      t = benchmarking.time_fn(lambda: f(x), warmup=1, iters=3)
      jax_row = {"name": "matmul", "impl": "jax", "step_time_s": t["median_s"],
                 "samples_per_s": 64 / t["median_s"], "flops": 2 * 64 ** 3,
                 **{k: v for k, v in benchmarking.compiled_cost(compiled).items()
                    if k == "peak_memory_bytes"}}
      ref = {"name": "matmul", "impl": "torch_eager", "step_time_s": 2 * t["median_s"],
             "samples_per_s": 32 / t["median_s"]}
      return {"rows": [jax_row, ref], "note": "fake"}
    """)


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch):
  """The bench waits for a loaded machine (tests run on busy ones): an idle load here; the
  tests of loaded runs set their own."""
  monkeypatch.setattr(bench_load, "load_1m", lambda: 0.25)


def _fixed_peak(monkeypatch):
  """A constant CPU peak instead of timing a 2048^3 matmul (seconds on a busy machine)."""
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(benchmarking, "device_peak_flops",
                      lambda precision="fp32", device=None: (1e11, "fixed for the test"))


def test_parse_suites():
  assert bench.parse_suites("all") == [s for s in bench.SUITES if s not in bench.OPT_IN]
  assert "scale" in bench.OPT_IN and bench.parse_suites("scale") == ["scale"]
  assert bench.parse_suites("mining, eval") == ["mining", "eval"]
  with pytest.raises(UsageError, match="unknown --suite nope"):
    bench.parse_suites("mining,nope")


def test_ratios_pick_fastest_reference():
  rows = bench.normalise_rows("s", [
      {"name": "a", "impl": "jax", "step_time_s": 0.5, "samples_per_s": 100.0, "flops": 1e12},
      {"name": "a", "impl": "torch_eager", "samples_per_s": 50.0},
      {"name": "a", "impl": "torch_compile", "samples_per_s": 80.0},
      {"name": "b", "impl": "jax", "samples_per_s": 10.0},
  ], peak_flops=4e12)
  a = rows[0]
  assert a["speedup_vs_torch"] == pytest.approx(100 / 80)
  assert a["speedup_vs"] == "torch_compile"
  assert a["vs_torch_eager"] == pytest.approx(2.0)
  assert a["tflops_per_s"] == pytest.approx(2.0)
  assert a["mfu"] == pytest.approx(0.5)
  assert a["step_time_ms"] == pytest.approx(500.0)
  assert "speedup_vs_torch" not in rows[3]  # no reference for b


def test_run_writes_json_table_and_readme(tmp_path, capsys):
  bdir = tmp_path / "benchmarks"
  bdir.mkdir()
  (bdir / "bench_mining.py").write_text(FAKE_SUITE)
  out = tmp_path / "results"
  readme = tmp_path / "README.md"
  readme.write_text(f"# x\n\n## Results\n{bench.README_START}\nold table\n{bench.README_END}\n\nafter\n")
  rc = cli.main(["bench", "--suite", "mining", "--benchmarks-dir", str(bdir), "--out", str(out),
                 "--update-readme", "--readme", str(readme)])
  assert rc == 0
  payload = json.loads((out / "bench_cpu.json").read_text())
  assert payload["machine"]["jax_backend"] == "cpu"
  assert payload["mining_note"] == "fake"
  jax_row = [r for r in payload["rows"] if r["impl"] == "jax"][0]
  assert jax_row["speedup_vs_torch"] == pytest.approx(2.0)
  assert jax_row["mfu"] > 0
  assert (out / "mining_cpu.json").is_file()
  text = readme.read_text()
  assert "old table" not in text and "after" in text
  assert "| mining | matmul | jax |" in text
  assert "matmul" in capsys.readouterr().out


def test_missing_script_and_markers_are_clear_errors(tmp_path, capsys):
  rc = cli.main(["bench", "--suite", "eval", "--benchmarks-dir", str(tmp_path),
                 "--out", str(tmp_path / "r")])
  assert rc == 2
  assert "bench_eval.py not found" in capsys.readouterr().err
  readme = tmp_path / "README.md"
  readme.write_text("no markers\n")
  rc = cli.main(["bench", "--readme-only", "--readme", str(readme), "--out", str(tmp_path)])
  assert rc == 2
  assert "markers not found" in capsys.readouterr().err
  assert readme.read_text() == "no markers\n"


def test_gpu_run_bookkeeping_with_an_unknown_gpu(tmp_path, monkeypatch, capsys):
  """The --device gpu run's own code (device checks stubbed: no GPU here): JSON named *_gpu,
  an unknown GPU's missing peak leaves MFU empty instead of failing the run."""
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(bench, "_set_device", lambda device, dry_run=False: None)
  monkeypatch.setattr(benchmarking, "device_peak_flops",
                      lambda precision="fp32", device=None: (None, "unknown GPU 'NVIDIA X1'"))
  bdir = tmp_path / "benchmarks"
  bdir.mkdir()
  (bdir / "bench_mining.py").write_text(FAKE_SUITE)
  payload = bench.run_suites(["mining"], "gpu", True, bdir, tmp_path / "r")
  assert (tmp_path / "r" / "mining_gpu.json").is_file()
  assert (tmp_path / "r" / "bench_gpu.md").is_file()
  assert payload["peak_source"] == "unknown GPU 'NVIDIA X1'"
  assert all(r.get("mfu") is None for r in payload["rows"])
  assert "peak=unknown" in capsys.readouterr().out


def test_scaling_estimate_reads_the_gpu_train_rows(tmp_path):
  """The DP/FSDP estimate takes the GPU run's measured steps (bench_train_step's row names)."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(bench.repo_root() / "benchmarks"))
  try:
    import bench_scaling  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  rows = [{"name": n, "impl": "jax", "step_time_s": t, "batch": 32}
          for n, t in (("qure_step_pixels", 0.5), ("qure_step_cached", 0.1))]
  (tmp_path / "bench_gpu.json").write_text(json.dumps(
      {"machine": {"devices": ["NVIDIA H100 80GB HBM3"]}, "rows": rows}))
  est = bench_scaling.estimate_rows(tmp_path)
  src = {r["workload"]: r["step_source"] for r in est}
  assert src["qure (ViT in step)"] == "measured on NVIDIA H100 80GB HBM3"
  assert src["qure (cached ViT features)"] == "measured on NVIDIA H100 80GB HBM3"
  assert src["instructcir stage 2 (LoRA)"].startswith("modelled")


@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_merge_replaces_only_the_suites_run(tmp_path, capsys):
  bdir = tmp_path / "benchmarks"
  bdir.mkdir()
  (bdir / "bench_mining.py").write_text(FAKE_SUITE)
  (bdir / "bench_eval.py").write_text(FAKE_SUITE.replace('"matmul"', '"retrieve"'))
  out = tmp_path / "results"
  readme = tmp_path / "README.md"
  readme.write_text(f"# x\n{bench.README_START}\n{bench.README_END}\n")
  common = ["--benchmarks-dir", str(bdir), "--out", str(out), "--readme", str(readme)]
  assert cli.main(["bench", "--suite", "mining,eval", *common]) == 0
  first = json.loads((out / "bench_cpu.json").read_text())
  mining_rows = [r for r in first["rows"] if r["suite"] == "mining"]
  assert cli.main(["bench", "--suite", "eval", "--merge", "--update-readme", *common]) == 0
  merged = json.loads((out / "bench_cpu.json").read_text())
  assert merged["suites"] == ["mining", "eval"]
  assert [r for r in merged["rows"] if r["suite"] == "mining"] == mining_rows  # kept as they were
  assert [r["suite"] for r in merged["rows"]] == ["mining"] * 2 + ["eval"] * 2
  assert merged["suite_dates"]["mining"] == first["machine"]["date"]
  assert set(merged["suite_peak_flops"]) == {"mining", "eval"}
  assert merged["eval_note"] == merged["mining_note"] == "fake"
  assert "per suite (mining " in readme.read_text()
  # Without --merge the run's suites alone are the combined file.
  assert cli.main(["bench", "--suite", "eval", *common]) == 0
  assert json.loads((out / "bench_cpu.json").read_text())["suites"] == ["eval"]
  # A merge that cannot be done fails before running anything and leaves the file as it was.
  (out / "bench_cpu.json").write_text("{not json")
  capsys.readouterr()
  assert cli.main(["bench", "--suite", "eval", "--merge", *common]) == 2
  assert "bench_cpu.json is not valid JSON" in capsys.readouterr().err
  assert (out / "bench_cpu.json").read_text() == "{not json"
  (out / "bench_cpu.json").write_text(json.dumps({"rows": [], "quick": False}))
  assert cli.main(["bench", "--suite", "eval", "--merge", "--quick", *common]) == 2
  assert "full-size results; this run is quick" in capsys.readouterr().err


def test_every_row_records_its_runs_load_and_threads(tmp_path, monkeypatch):
  import torch  # pylint: disable=g-import-not-at-top
  _fixed_peak(monkeypatch)
  bdir = tmp_path / "benchmarks"
  bdir.mkdir()
  (bdir / "bench_mining.py").write_text(FAKE_SUITE)
  out = tmp_path / "results"
  assert cli.main(["bench", "--suite", "mining", "--benchmarks-dir", str(bdir),
                   "--out", str(out)]) == 0
  payload = json.loads((out / "bench_cpu.json").read_text())
  threads = bench_load.xla_threads()[0]
  for row in payload["rows"]:
    assert row["loaded"] is False and len(row["runs"]) == 1  # mining has no speed goal: 1 run
    for when in ("start", "end"):
      snap = row["conditions"][when]
      assert snap["load_1m"] == 0.25
      assert snap["threads_jax"] == threads >= 1
      assert snap["threads_torch"] == torch.get_num_threads()
  cond = payload["suite_conditions"]["mining"]
  assert cond["loaded"] is False and cond["cores"] == bench_load.machine_cores()
  assert cond["threshold_load_1m"] == pytest.approx(0.75 * bench_load.machine_cores())
  assert json.loads((out / "mining_cpu.json").read_text())["conditions"] == cond
  md = (out / "bench_cpu.md").read_text()
  assert f"| mining | {cond['runs'][0]['start']['time']} | 1 | 0.25 -> 0.25 |" in md


def test_update_readme_refuses_loaded_rows_unless_allowed(tmp_path, monkeypatch, capsys):
  _fixed_peak(monkeypatch)
  monkeypatch.setattr(bench_load, "load_1m", lambda: 1000.0)  # loaded on any machine
  bdir = tmp_path / "benchmarks"
  bdir.mkdir()
  (bdir / "bench_mining.py").write_text(FAKE_SUITE)
  out = tmp_path / "results"
  readme = tmp_path / "README.md"
  before = f"# x\n{bench.README_START}\nold table\n{bench.README_END}\n"
  readme.write_text(before)
  common = ["--out", str(out), "--readme", str(readme)]
  assert cli.main(["bench", "--suite", "mining", "--benchmarks-dir", str(bdir), "--max-wait",
                   "0", "--update-readme", *common]) == 2
  captured = capsys.readouterr()
  assert "still above" in captured.out and "marked loaded" in captured.out
  assert "mining (1-minute load at start 1000.00" in captured.err
  assert "loaded machine: not written to the README" in captured.err
  assert "--allow-loaded" in captured.err
  assert readme.read_text() == before  # refused before anything was written
  payload = json.loads((out / "bench_cpu.json").read_text())  # the measurement is kept
  assert all(r["loaded"] for r in payload["rows"]) and payload["suite_conditions"]["mining"]["loaded"]
  assert cli.main(["bench", "--readme-only", *common]) == 2
  assert readme.read_text() == before
  assert cli.main(["bench", "--readme-only", "--allow-loaded", *common]) == 0
  text = readme.read_text()
  assert "| mining (loaded) | matmul | jax |" in text and "**loaded** |" in text


def test_repeats_wait_for_the_load_and_judge_a_speed_goal(tmp_path, monkeypatch, capsys):
  """The eval suite (a speed goal on CPU) runs 3 times by default; each run waits for the
  injected load to settle (a fake clock: no real sleeping) and the goal is judged over all 3."""
  _fixed_peak(monkeypatch)
  bdir = tmp_path / "benchmarks"
  bdir.mkdir()
  (bdir / "bench_eval.py").write_text(FAKE_SUITE.replace('"matmul"', '"retrieve_single"'))
  clock = {"t": 0.0, "busy_until": 20.0}

  def load():  # busy for 20 s before each run starts (the snapshot at its end re-arms it)
    return 3.0 * bench_load.machine_cores() if clock["t"] < clock["busy_until"] else 0.1

  def sleep(s):
    clock["t"] += s

  policy = bench_load.LoadPolicy(read_load=load, clock=lambda: clock["t"], sleep=sleep,
                                 poll_s=15)
  real_snapshot = bench_load.snapshot

  def snapshot(p):
    snap = real_snapshot(p)
    if snap["load_1m"] == 0.1 and clock["t"] >= clock["busy_until"]:
      clock["busy_until"] = clock["t"] + 20.0  # the next run again finds a busy machine
    return snap
  monkeypatch.setattr(bench_load, "snapshot", snapshot)
  payload = bench.run_suites(["eval"], "cpu", False, bdir, tmp_path / "r", policy=policy)
  out = capsys.readouterr().out
  assert out.count("waiting for it to settle") == 6  # two polls before each of 3 runs
  runs = payload["suite_conditions"]["eval"]["runs"]
  assert len(runs) == 3 and all(r["waited_s"] == 30 and r["loaded"] is False for r in runs)
  jax_row = [r for r in payload["rows"] if r["impl"] == "jax"][0]
  assert len(jax_row["runs"]) == 3 and jax_row["speedup_vs_torch"] == pytest.approx(2.0)
  (goal,) = payload["goals"]
  assert goal["values"] == pytest.approx([2.0] * 3)
  assert (goal["held_runs"], goal["runs"], goal["met"]) == (3, 3, True)
  assert "goal eval/retrieve_single speedup_vs_torch >= 1.2: held in 3 of 3 run(s)" in out
  md = (tmp_path / "r" / "bench_cpu.md").read_text()
  assert "| eval | retrieve_single | speedup_vs_torch >= 1.2 | 2, 2, 2 | 3 of 3 | met |" in md


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats 0: must be at least 1"),
    (["--max-wait", "-5"], "--max-wait -5.0: must be >= 0 seconds"),
    (["--idle-load-per-core", "0"], "--idle-load-per-core 0.0: must be > 0"),
])
def test_bad_wait_and_repeat_values_fail_before_running(tmp_path, capsys, argv, message):
  out = tmp_path / "results"
  assert cli.main(["bench", "--suite", "mining", "--out", str(out), *argv]) == 2
  assert f"cirjax bench: error: {message}" in capsys.readouterr().err
  assert not out.exists()

"""`cirjax bench`: suite discovery, derived columns and ratios, JSON + table, README section."""

import json
import textwrap

import pytest

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

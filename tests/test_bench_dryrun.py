"""`cirjax bench --dry-run`: every suite's GPU code path once through on the CPU, lowered for
CUDA, with each program's outcome in <out>/dryrun/ and a failing program named."""

import json
import textwrap

import jax
import pytest

from cirjax import cli
from cirjax.commands import bench

STAGES = ("built", "compiled", "ran", "cuda_lowered")

# Two suites: one whose second program breaks, one that works (the run must go on to it).
BROKEN_SUITE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from cirjax import benchmarking

    def run(device="cpu", quick=False, dry_run=None):
      assert device == "gpu" and quick and dry_run is not None
      x = jnp.ones((8, 8))
      f = jax.jit(lambda a: a @ a)
      c = benchmarking.compile_program("good_matmul", f, x, dry_run=dry_run)
      benchmarking.time_fn(lambda: c(x), dry_run=dry_run, program="good_matmul")

      def broken():
        raise RuntimeError("no kernel for this layout")
      benchmarking.time_fn(broken, dry_run=dry_run, program="broken_step")
      return [{"name": "never", "impl": "jax"}]
    """)
GOOD_SUITE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from cirjax import benchmarking

    def run(device="cpu", quick=False, dry_run=None):
      x = jnp.ones((4,))
      f = jax.jit(jnp.sin)
      c = benchmarking.compile_program("sine", f, x, dry_run=dry_run)
      t = benchmarking.time_fn(lambda: c(x), warmup=3, iters=9, dry_run=dry_run, program="sine")
      return [{"name": "sine", "impl": "jax", "step_time_s": t["median_s"], "iters": t["iters"]}]
    """)


def _records(path):
  return {(r["program"], r["impl"]): r for r in json.loads(path.read_text())["programs"]}


def test_failing_program_is_named_and_other_suites_still_run(tmp_path, capsys):
  bdir = tmp_path / "benchmarks"
  bdir.mkdir()
  (bdir / "bench_eval.py").write_text(BROKEN_SUITE)
  (bdir / "bench_mining.py").write_text(GOOD_SUITE)
  out = tmp_path / "results"
  rc = cli.main(["bench", "--dry-run", "--suite", "eval,mining", "--benchmarks-dir", str(bdir),
                 "--out", str(out)])
  assert rc == 2
  err = capsys.readouterr().err
  assert "suite eval, program broken_step (jax): ran: RuntimeError: no kernel for this layout" in err
  assert "1 program(s) failed" in err
  combined = json.loads((out / "dryrun" / "bench_gpu_dryrun.json").read_text())
  assert combined["failed"] == ["eval/broken_step (jax)"]
  recs = _records(out / "dryrun" / "bench_gpu_dryrun.json")
  good = recs[("good_matmul", "jax")]
  assert all(good[s] is True for s in STAGES) and good["compiled_s"] > 0
  assert recs[("broken_step", "jax")]["ran"] is False
  sine = recs[("sine", "jax")]  # the suite after the failure ran, and only once
  assert all(sine[s] is True for s in STAGES)
  rows = json.loads((out / "dryrun" / "mining_gpu_dryrun.json").read_text())["rows"]
  assert rows[0]["iters"] == 1
  assert not (out / "bench_gpu.json").exists() and not (out / "bench_cpu.json").exists()


def test_dry_run_usage_errors(tmp_path, capsys):
  rc = cli.main(["bench", "--dry-run", "--device", "cpu", "--out", str(tmp_path)])
  assert rc == 2
  assert "--device must be gpu or omitted" in capsys.readouterr().err
  rc = cli.main(["bench", "--dry-run", "--update-readme", "--out", str(tmp_path)])
  assert rc == 2
  assert "drop --update-readme" in capsys.readouterr().err
  script = bench._load_suite(bench.repo_root() / "benchmarks", "eval")  # pylint: disable=protected-access
  assert script.main(["--dry-run", "--device", "cpu", "--out", str(tmp_path)]) == 2
  assert "bench_eval.py: error: --dry-run" in capsys.readouterr().err


def _tiny(monkeypatch):
  """The real mining and eval scripts at smaller-than-quick sizes (seconds): the two mining
  problems share one kernel shape (one compile); eval's input-pipeline row (a generated
  dataset, no GPU-specific code) is left to the slow test."""
  load = bench._load_suite  # pylint: disable=protected-access

  def tiny_load(bench_dir, suite):
    mod = load(bench_dir, suite)
    if suite == "mining":
      mod._quick_problems = lambda device: [  # pylint: disable=protected-access
          {"name": "ids", "q": 32, "n": 128, "repeat_ids": True, "loop_queries": 32, "iters": 2},
          {"name": "matmul", "q": 32, "n": 128, "matmul_blocks": True, "loop_queries": 8,
           "iters": 2}]
    if suite == "eval":
      mod._sizes = lambda device, quick: {  # pylint: disable=protected-access
          "nq": 32, "n": 256, "tokens": 4, "dim": 16, "iters": 2, "min_s": 0.0}
      mod._encode_rows = lambda sz, dry_run=None: []  # pylint: disable=protected-access
    return mod
  monkeypatch.setattr(bench, "_load_suite", tiny_load)


def test_dry_run_of_mining_and_eval_takes_their_gpu_paths(tmp_path, monkeypatch):
  _tiny(monkeypatch)
  out = tmp_path / "results"
  rc = cli.main(["bench", "--dry-run", "--suite", "mining,eval", "--out", str(out)])
  assert rc == 0
  recs = _records(out / "dryrun" / "bench_gpu_dryrun.json")
  for prog in ("mine_ids", "mine_matmul", "retrieve_qure", "retrieve_single"):
    assert all(recs[(prog, "jax")][s] is True for s in STAGES), recs[(prog, "jax")]
  assert recs[("mine_ids", "torch_per_block")]["ran"] is True
  assert recs[("mine_ids", "numpy_per_query_loop")]["ran"] is True
  assert recs[("mine_matmul", "torch_per_query_loop")]["ran"] is True
  assert recs[("retrieve_qure", "torch")]["ran"] is True
  mining = json.loads((out / "dryrun" / "mining_gpu_dryrun.json").read_text())
  # The GPU path: the XLA kernels only (the NumPy method is the CPU path).
  assert {r["variant"] for r in mining["rows"] if r["impl"] == "jax"} == {"cirjax_xla"}
  assert mining["suite_error"] is None


@pytest.mark.slow
def test_dry_run_of_every_suite(tmp_path):
  out = tmp_path / "results"
  precision = jax.config.jax_default_matmul_precision
  try:
    rc = cli.main(["bench", "--dry-run", "--suite", "all", "--out", str(out)])
  finally:  # the train and blip2 suites set 'highest' for the process, as their runs need
    jax.config.update("jax_default_matmul_precision", precision)
  payload = json.loads((out / "dryrun" / "bench_gpu_dryrun.json").read_text())
  assert rc == 0, payload["failed"]
  assert set(payload["suites"]) == {s for s in bench.SUITES if s not in bench.OPT_IN}
  recs = _records(out / "dryrun" / "bench_gpu_dryrun.json")
  for prog in ("qure_step_cached", "qure_step_pixels", "encode_image", "compose",
               "llava_embed_image", "llava_lora_step"):
    assert recs[(prog, "jax")]["cuda_lowered"] is True
    assert "cuDNN" in recs[(prog, "jax")]["cuda_note"]
  assert recs[("llava_lora_step", "torch_peft")]["ran"] is True
  assert recs[("encode_pipeline", "jax")]["ran"] is True
  assert recs[("dp_fsdp_estimate", "host")]["ran"] is True

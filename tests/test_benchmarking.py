"""The shared benchmark harness measures what it says and writes loadable JSON."""

import json
import time

import jax
import jax.numpy as jnp

from cirjax import benchmarking


def test_time_fn_reports_median_of_sleeps():
  calls = []

  def fn():
    calls.append(1)
    time.sleep(0.01)
    return jnp.zeros(())

  t = benchmarking.time_fn(fn, warmup=1, iters=3)
  assert len(calls) == 4
  assert t["iters"] == 3
  assert 0.009 < t["median_s"] < 0.5
  assert t["min_s"] <= t["median_s"]


def test_compiled_cost_counts_matmul_flops_and_memory():
  a = jnp.ones((64, 32), jnp.float32)
  b = jnp.ones((32, 16), jnp.float32)
  compiled = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
  cost = benchmarking.compiled_cost(compiled)
  assert cost["flops"] == 2 * 64 * 32 * 16
  assert cost["peak_memory_bytes"] >= (64 * 32 + 32 * 16 + 64 * 16) * 4


def test_write_results_and_table(tmp_path):
  rows = [{"name": "x", "samples_per_s": 1234.5, "ratio": 0.5, "missing": None}]
  path = benchmarking.write_results("unit", rows, out_dir=tmp_path)
  data = json.loads(path.read_text())
  assert data["rows"] == rows
  assert data["machine"]["jax"] == jax.__version__
  table = benchmarking.format_table(rows, ["name", "samples_per_s", "ratio", "missing"])
  assert "| x | 1,234 | 0.5 | - |" in table


def test_gpu_peaks_know_h100_and_h200_variants_and_say_where_from():
  peak, src = benchmarking.gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16")
  assert peak == 989e12 and "H100 SXM datasheet" in src and "sparsity" in src
  assert benchmarking.gpu_peak_flops("NVIDIA H200", "bf16")[0] == 989e12
  assert benchmarking.gpu_peak_flops("NVIDIA H100 PCIe", "bf16")[0] == 756e12
  assert benchmarking.gpu_peak_flops("NVIDIA H100 NVL", "fp32")[0] == 60e12
  peak, src = benchmarking.gpu_peak_flops("NVIDIA L4", "bf16")
  assert peak is None and "unknown GPU 'NVIDIA L4'" in src


def test_dry_run_records_stages_and_lowers_for_cuda():
  dry = benchmarking.DryRun("unit")
  x = jnp.ones((4, 4))
  compiled = benchmarking.compile_program("mm", jax.jit(lambda a: a @ a), x, dry_run=dry,
                                          attention=True)
  t = benchmarking.time_fn(lambda: compiled(x), warmup=5, iters=5, dry_run=dry, program="mm")
  assert t["iters"] == 1
  (rec,) = dry.records
  assert [rec[s] for s in ("built", "compiled", "ran", "cuda_lowered")] == [True] * 4
  assert "cuDNN" in rec["cuda_note"] and not dry.failures()


def test_kernel_counts_see_repeated_fusions_as_one():
  def layer(x):
    return jnp.tanh(x * 3.0 + 1.0) * x

  def two(x, y):  # the same fusion twice, on two same-shaped inputs: one kernel to generate
    return layer(x) @ layer(y).T
  x = jnp.ones((8, 8))
  total, distinct = benchmarking.kernel_counts(jax.jit(two).lower(x, x + 1).compile())
  assert total >= 2 and distinct < total


def test_cudnn_attention_calls_counted_from_the_compiled_program():
  q = jnp.ones((1, 4, 2, 8), jnp.float32)
  f = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, implementation="xla"))
  assert benchmarking.compiled_cost(f.lower(q).compile())["cudnn_attention_calls"] == 0

  class GpuProgram:  # the custom calls a GPU compile of cuDNN attention holds (fwd + bwd)
    def as_text(self):
      return ('%a = custom-call(...), custom_call_target="__cudnn$fmhaSoftmax"\n'
              '%b = custom-call(...), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n')
  assert benchmarking.cudnn_attention_calls(GpuProgram()) == 2

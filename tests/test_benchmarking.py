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

"""Shared benchmark harness: timing, analytic cost, device peaks, JSON and table output.

Every script under `benchmarks/` times cirjax and the PyTorch reference with the same
helpers, so the two sides are measured the same way in the same run: warm-up calls first
(compilation, caches), then the median of repeated runs, each ended by a device sync.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import flax
import jax
import numpy as np

# Dense peak FLOP/s per device by precision (vendor datasheets, no sparsity).
# MFU is model FLOPs per second over this number.
_GPU_PEAKS = {
    # device_kind substring: {precision: flop/s}
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


def block(x: Any) -> Any:
  """Waits for every JAX array (or torch tensor on CUDA) in a pytree."""
  leaves = jax.tree.leaves(x)
  for leaf in leaves:
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()
  if any(type(l).__module__.startswith("torch") for l in leaves):
    # torch is optional: only a torch pytree (already imported by its caller) needs it.
    import torch  # pylint: disable=g-import-not-at-top
    if torch.cuda.is_available():
      torch.cuda.synchronize()
  return x


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 5,
            min_time_s: float = 0.0) -> dict:
  """Times `fn()` (which must return its outputs) after `warmup` calls.

  Returns median/min/mean seconds and all samples. With `min_time_s`, keeps running past
  `iters` until that much time was spent measuring, so tiny steps get enough samples.
  """
  for _ in range(warmup):
    block(fn())
  samples = []
  start = time.perf_counter()
  while len(samples) < iters or (time.perf_counter() - start) < min_time_s:
    t0 = time.perf_counter()
    block(fn())
    samples.append(time.perf_counter() - t0)
    if len(samples) >= 1000:
      break
  return {
      "median_s": statistics.median(samples),
      "min_s": min(samples),
      "mean_s": statistics.fmean(samples),
      "iters": len(samples),
      "warmup": warmup,
  }


def compiled_cost(compiled) -> dict:
  """FLOPs, bytes accessed and peak memory of a `jax.jit(...).lower(...).compile()` result."""
  out = {"flops": None, "bytes_accessed": None, "peak_memory_bytes": None}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    if cost:
      out["flops"] = float(cost.get("flops", 0.0)) or None
      out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    pass  # Some backends don't implement cost analysis; the caller reports analytic FLOPs.
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      # Arguments and outputs that alias (donation) are counted once.
      out["peak_memory_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def measure_cpu_matmul_peak(n: int = 2048, dtype=np.float32) -> float:
  """Achieved FLOP/s of a large jitted fp32 matmul: the CPU's practical peak.

  CPUs publish no single peak number that holds for a container's share of a machine, so
  MFU on CPU is reported against this measured ceiling (and labelled as such).
  """
  a = jax.numpy.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  # The fastest of many runs: a peak is what the machine can do, not what it did while busy.
  t = time_fn(lambda: f(a), warmup=2, iters=10)
  return 2.0 * n ** 3 / t["min_s"]


def device_peak_flops(precision: str = "fp32", device=None) -> tuple[float | None, str]:
  """(peak FLOP/s, where the number comes from) for the first local device."""
  device = device or jax.local_devices()[0]
  kind = getattr(device, "device_kind", "") or ""
  if device.platform == "gpu":
    for key, peaks in _GPU_PEAKS.items():
      if key in kind:
        return peaks.get(precision), f"datasheet {key} {precision} dense"
    return None, f"unknown GPU {kind!r}"
  if device.platform == "cpu":
    return measure_cpu_matmul_peak(), "measured jitted fp32 2048^3 matmul on this CPU (fastest of 10)"
  return None, f"no peak known for {device.platform}"


def machine_info() -> dict:
  """Facts that make a benchmark result comparable: machine, versions, date."""
  info = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "hostname": platform.node(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "devices": [getattr(d, "device_kind", str(d)) for d in jax.devices()],
  }
  info["flax"] = flax.__version__
  try:
    # torch and transformers are optional here: only their versions are recorded.
    import torch  # pylint: disable=g-import-not-at-top
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name(0)
  except ImportError:
    info["torch"] = None
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    info["transformers"] = transformers.__version__
  except ImportError:
    pass
  return info


def write_results(name: str, rows: Sequence[dict], out_dir: str | os.PathLike = "benchmarks/results",
                  extra: dict | None = None) -> Path:
  """Writes `{machine, rows, ...}` to `<out_dir>/<name>.json` atomically and returns the path."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  payload = {"benchmark": name, "machine": machine_info(), "rows": list(rows)}
  if extra:
    payload.update(extra)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
  os.replace(tmp, path)
  return path


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def format_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
  """A GitHub-markdown table of `columns` over `rows` (missing values shown as '-')."""
  rows = list(rows)

  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      if v == 0:
        return "0"
      if abs(v) >= 1000:
        return f"{v:,.0f}"
      if abs(v) >= 1:
        return f"{v:.2f}"
      return f"{v:.3g}"
    return str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
  return "\n".join(lines)

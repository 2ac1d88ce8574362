"""Shared benchmark harness: timing, analytic cost, device peaks, JSON and table output.

Every script under `benchmarks/` times cirjax and the PyTorch reference with the same
helpers, so the two sides are measured the same way in the same run: warm-up calls first
(compilation, caches), then the median of repeated runs, each ended by a device sync.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import flax
import jax
import numpy as np

from cirjax import bench_load

# Dense peak FLOP/s per device by precision: NVIDIA's datasheets, whose tensor-core figures
# are "with sparsity" (halved here). MFU is model FLOPs per second over this number. Matched
# as a substring of `device_kind` in this order: the PCIe / NVL variants (lower clocks and
# power) before the SXM parts, whose kinds read e.g. "NVIDIA H100 80GB HBM3" / "NVIDIA H200".
_GPU_PEAKS = {
    # device_kind substring: (datasheet, {precision: flop/s})
    "H100 PCIe": ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    "H100 NVL": ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    "H200 NVL": ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    "H200": ("H200 SXM", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    "H100": ("H100 SXM", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    "A100": ("A100 SXM/PCIe", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12,
                               "fp32": 19.5e12}),
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
            min_time_s: float = 0.0, dry_run: "DryRun | None" = None, program: str = "",
            impl: str = "jax") -> dict:
  """Times `fn()` (which must return its outputs) after `warmup` calls.

  Returns median/min/mean seconds and all samples. With `min_time_s`, keeps running past
  `iters` until that much time was spent measuring, so tiny steps get enough samples.
  With `dry_run`, runs `fn` once instead, recorded as `program` (see `DryRun`).
  """
  if dry_run is not None:
    return dry_run.run_once(program, fn, impl)[0]
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


# ------------------------------------------------------------------ dry runs of the GPU path

CUDNN_NOTE = ("lowered for CUDA with XLA attention: cuDNN's fused attention cannot be lowered "
              "without cuDNN present, so whether attention_impl='auto' selects the cuDNN "
              "kernels (and that they accept these shapes) can only be checked on a GPU")
_STAGES = ("built", "compiled", "ran", "cuda_lowered")


class DryRun:
  """A suite's GPU code path taken once through on the CPU (`cirjax bench --dry-run`).

  The suite runs with `device="gpu"` (the GPU branch's sizes, dtypes, attention kernel,
  mining method) while JAX and torch execute on the CPU: every program the GPU run would
  time is built, compiled and run once (`compile_program`, `time_fn(dry_run=...)`,
  `run_once`), and each main JAX program is also lowered for CUDA with `jax.export`, so a
  broken GPU path shows here. One record per (program, impl): each stage True, False (with
  `error`) or None (not applicable), and its seconds.
  """

  def __init__(self, suite: str = ""):
    self.suite = suite
    self._records: dict[tuple[str, str], dict] = {}

  def record(self, program: str, impl: str = "jax", **info) -> dict:
    key = (program, impl)
    if key not in self._records:
      self._records[key] = {"suite": self.suite, "program": program, "impl": impl,
                            **{s: None for s in _STAGES}, "error": None}
    self._records[key].update(info)
    return self._records[key]

  @property
  def records(self) -> list[dict]:
    return list(self._records.values())

  def failures(self) -> list[dict]:
    return failed_programs(self.records)

  @contextlib.contextmanager
  def stage(self, program: str, stage: str, impl: str = "jax"):
    """Records `stage` of `program` as done (with its seconds), or failed with the error."""
    rec = self.record(program, impl)
    t0 = time.perf_counter()
    try:
      yield rec
    except Exception as e:
      rec[stage] = False
      rec["error"] = f"{stage}: {type(e).__name__}: {e}"[:2000]
      raise
    rec[stage] = True
    rec[f"{stage}_s"] = time.perf_counter() - t0

  def run_once(self, program: str, fn: Callable[[], Any], impl: str = "jax") -> tuple[dict, Any]:
    """(a one-sample timing dict like `time_fn`'s, the output) of one recorded call."""
    with self.stage(program, "ran", impl) as rec:
      out = block(fn())
    t = rec["ran_s"]
    return {"median_s": t, "min_s": t, "mean_s": t, "iters": 1, "warmup": 0,
            "dry_run": True}, out

  def lower_for_cuda(self, program: str, jitted, *args, attention: bool = False,
                     **kwargs) -> None:
    """Lowers `jitted` for the CUDA platform from the shapes of `args` (`jax.export`). A
    failure is recorded, not raised: the CPU run of the suite goes on."""
    rec = self.record(program)
    if attention:
      rec["cuda_note"] = CUDNN_NOTE
    t0 = time.perf_counter()
    try:
      jax.export.export(jitted, platforms=("cuda",))(*abstract(args), **abstract(kwargs))
    except Exception as e:  # pylint: disable=broad-except  # recorded: the point of a dry run
      rec["cuda_lowered"] = False
      rec["error"] = (rec["error"] or "") + f"cuda_lowered: {type(e).__name__}: {e}"[:2000]
      return
    rec["cuda_lowered"] = True
    rec["cuda_lowered_s"] = time.perf_counter() - t0


def failed_programs(records: Sequence[dict]) -> list[dict]:
  """The dry-run records with a failed stage."""
  return [r for r in records if any(r.get(s) is False for s in _STAGES)]


def abstract(tree):
  """Arrays (JAX, NumPy, NumPy scalars) as `jax.ShapeDtypeStruct`s; anything else as is."""
  def one(x):
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    return x
  return jax.tree.map(one, tree)


def compile_program(program: str, jitted, *args, dry_run: DryRun | None = None,
                    attention: bool = False, **kwargs):
  """`jitted.lower(*args, **kwargs).compile()`. In a dry run also recorded (built = traced
  and lowered, compiled) and lowered for CUDA; `attention`: the program has attention (its
  CUDA lowering uses XLA's, see `CUDNN_NOTE`)."""
  if dry_run is None:
    return jitted.lower(*args, **kwargs).compile()
  with dry_run.stage(program, "built"):
    lowered = jitted.lower(*args, **kwargs)
  with dry_run.stage(program, "compiled"):
    compiled = lowered.compile()
  dry_run.lower_for_cuda(program, jitted, *args, attention=attention, **kwargs)
  return compiled


def torch_device(device: str, dry_run: DryRun | None = None) -> str:
  """Where the PyTorch side runs: 'cuda' for device 'gpu', the CPU otherwise and in a dry run."""
  return "cuda" if device == "gpu" and dry_run is None else "cpu"


def compiled_cost(compiled) -> dict:
  """FLOPs, bytes accessed, peak memory and cuDNN fused-attention calls of a
  `jax.jit(...).lower(...).compile()` result."""
  out = {"flops": None, "bytes_accessed": None, "peak_memory_bytes": None,
         "cudnn_attention_calls": cudnn_attention_calls(compiled)}
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


def cudnn_attention_calls(compiled) -> int | None:
  """cuDNN fused-attention kernels (forward and backward custom calls) in a compiled program:
  on a GPU, > 0 shows `attention_impl` 'auto' / 'cudnn' reached cuDNN's kernels; 0 means XLA's
  attention ran. None if the program's text is unavailable."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except  # not every backend gives its HLO
    return None
  return len(re.findall(r'custom_call_target="__cudnn\$fmha', text or ""))


def kernel_counts(compiled) -> tuple[int, int]:
  """(fused computations, distinct ones) in a compiled program's optimized HLO. Distinct:
  equal once instruction names and metadata are dropped -- XLA's CPU backend generates code
  once for identical fusions, so unrolled copies of a layer add HLO but little codegen."""
  blocks = [b for b in re.split(r"\n\s*\n", compiled.as_text())
            if b.lstrip().startswith("%fused")]
  distinct = set()
  for block in blocks:
    head, _, body = block.strip().partition("\n")
    head = re.sub(r"%[\w.\-]+|[\w.\-]+:", "", head)
    body = re.sub(r", metadata=\{[^}]*\}", "", re.sub(r"%[\w.\-]+", "%", body))
    distinct.add(head + body)
  return len(blocks), len(distinct)


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
    return gpu_peak_flops(kind, precision)
  if device.platform == "cpu":
    return measure_cpu_matmul_peak(), "measured jitted fp32 2048^3 matmul on this CPU (fastest of 10)"
  return None, f"no peak known for {device.platform}"


def gpu_peak_flops(device_kind: str, precision: str = "bf16") -> tuple[float | None, str]:
  """(datasheet dense peak FLOP/s, its source) of a GPU named by its JAX `device_kind`."""
  for key, (sheet, peaks) in _GPU_PEAKS.items():
    if key in device_kind:
      how = "" if precision == "fp32" else " (half the datasheet's 'with sparsity' figure)"
      return peaks.get(precision), (f"NVIDIA {sheet} datasheet, {precision} dense{how}, "
                                    f"for {device_kind!r}")
  return None, f"unknown GPU {device_kind!r}: no datasheet peak, MFU left empty"


def blip2_from_torch(model) -> tuple[Any, Any]:
  """(cirjax `Blip2Config`, host parameters) of an HF BLIP-2 torch module: each BLIP-2 bench
  and profile builds both sides from one randomly initialised model."""
  from cirjax.convert import blip2_convert  # pylint: disable=g-import-not-at-top
  state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  cfg = blip2_convert.config_from_hf(model.config.to_dict())
  return cfg, blip2_convert.params_from_hf_state(state, cfg)


def qure_text(rng: np.random.Generator, batch: int, length: int = 32
              ) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, attention mask) [batch, length] int32 as the BLIP-2 benches feed them: ids
  drawn over BERT's vocabulary, every other row padded after half its length."""
  ids = rng.integers(1, 30523, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1::2, length // 2:] = 0
  return ids, mask


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
  # The load when the results were written, and XLA's intra-op threads: a script run on its
  # own records at least these (`cirjax bench` records each suite run's start and end).
  info["load_1m"] = bench_load.load_1m()
  info["threads_jax"] = bench_load.xla_threads()[0]
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
  info["commit"] = source_commit()
  return info


# What `cirjax bench` itself writes while it runs: not a change to the code it measures.
_BENCH_OUTPUTS = ("benchmarks/results", "README.md")


def source_commit(root: str | os.PathLike | None = None) -> str | None:
  """The git commit of the cirjax source measured ("+dirty" with uncommitted changes to
  tracked files other than the bench's own outputs, `_BENCH_OUTPUTS`); None outside a git
  checkout (an installed wheel). `root`: the checkout (default: this package's)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
  git = ["git", "-C", str(root)]
  try:
    rev = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "--", "."]
                           + [f":(exclude){p}" for p in _BENCH_OUTPUTS],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return rev + ("+dirty" if dirty else "") if rev else None


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

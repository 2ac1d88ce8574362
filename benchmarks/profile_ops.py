"""Which ops take the time: the jitted cirjax programs of the CPU speed goals (BLIP-2
`encode_image` / `compose`, the QuRe step with cached features and with pixels; the bench's
sizes and weights, benchmarks/bench_blip2_encode.py and bench_train_step.py) profiled op by
op, and the PyTorch reference beside each, grouped into the same kinds of work.

    python benchmarks/profile_ops.py --out benchmarks/results/profile_ops_cpu.json

JAX: one `jax.profiler` trace per program with XLA's per-op trace events on
(`--xla_cpu_enable_xprof_traceme`); each event is an HLO instruction of the compiled program,
grouped by what it computes (read from the compiled HLO):
  gemm         dots without batch dimensions and convolutions (the dense layers, the patch
               embedding), alone or in a library (XNNPACK/YNNPACK) fusion
  attention    dots with batch dimensions (QK^T and AV per head), alone or fused with the
               softmax in a library fusion
  elementwise  XLA's own loop/reduction fusions (GELU, LayerNorm, softmax, residuals, the
               optimizer update)
  copy         copies and transposes
  other        everything else (custom calls, while loops' own bookkeeping, ...)
torch: `torch.profiler`'s self CPU time per aten op, grouped the same way (`mm`/`addmm`/
`linear`/`convolution` -> gemm, `bmm`/`baddbmm`/`matmul` on 3-D+ -> attention, copies, the
rest elementwise). Each program: median wall time of 3 runs without the profiler, and the
share of each kind in the profiled run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import profiling  # pylint: disable=g-import-not-at-top,wrong-import-position

KINDS = ("gemm", "attention", "elementwise", "copy", "other")



def hlo_kinds(hlo: str) -> dict[str, str]:
  """Instruction name -> kind, for the compiled module's text."""
  blocks: dict[str, str] = {}
  name = None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      name = m.group(1)
      blocks[name] = ""
    elif name is not None:
      blocks[name] += line + "\n"

  def dots(body: str) -> str | None:
    if re.search(r"= \S+ dot\(.*lhs_batch_dims", body):
      return "attention"
    if re.search(r"= \S+ (dot|convolution)\(", body):
      return "gemm"
    return None

  kinds = {}
  for body in blocks.values():
    for line in body.splitlines():
      m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
      if not m:
        continue
      inst, op = m.groups()
      if op in ("dot", "convolution"):
        kinds[inst] = dots(line + "\n") or "gemm"
      elif op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        inner = dots(blocks.get(called.group(1), "")) if called else None
        kinds[inst] = inner or "elementwise"
      elif op in ("copy", "transpose"):
        kinds[inst] = "copy"
      else:
        kinds[inst] = "other"
  return kinds


def jax_profile(fn, args, iters: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  compiled = fn.lower(*args).compile()
  kinds = hlo_kinds(compiled.as_text())
  wall = profiling.median(lambda: jax.block_until_ready(compiled(*args)), iters)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    files = list(Path(tmp).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(files[0]))
  per_kind = collections.Counter()
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        kind = kinds.get(ev.name)
        if kind is None:
          continue
        per_kind[kind] += ev.duration_ns / 1e9
        per_op[ev.name] += ev.duration_ns / 1e9
  return {"wall_s": wall, "profiled_op_s": dict(per_kind),
          "top_ops_s": dict(per_op.most_common(12))}


def _torch_kind(name: str) -> str:
  n = name.removeprefix("aten::")
  if n in ("mm", "addmm", "linear", "convolution", "_convolution", "mkldnn_convolution",
           "conv2d"):
    return "gemm"
  if n in ("bmm", "baddbmm", "_softmax", "softmax", "matmul"):
    return "attention"
  if n in ("copy_", "contiguous", "clone", "transpose", "permute", "to", "_to_copy"):
    return "copy"
  return "elementwise"


def torch_profile(fn, iters: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  wall = profiling.median(fn, iters)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    fn()
  per_kind = collections.Counter()
  top = {}
  for ev in prof.key_averages():
    if ev.self_cpu_time_total <= 0:
      continue
    per_kind[_torch_kind(ev.key)] += ev.self_cpu_time_total / 1e6
    top[ev.key] = ev.self_cpu_time_total / 1e6
  return {"wall_s": wall, "profiled_op_s": dict(per_kind),
          "top_ops_s": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12])}


def programs():
  """(name, jitted jax fn, args, torch fn) for the four goal rows at the bench's CPU sizes."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_blip2_encode as enc_bench  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_train_step as step_bench  # pylint: disable=g-import-not-at-top
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  from cirjax.models import blip2  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  sz = enc_bench._sizes("cpu", False)
  m = enc_bench._hf_model(sz, "cpu")
  cfg, params = benchmarking.blip2_from_torch(m)
  params = jax.device_put(params)
  rng = np.random.default_rng(0)
  b, text_len = sz["batch"], 32
  px = rng.standard_normal((b, 224, 224, 3)).astype(np.float32)
  ids, mask = benchmarking.qure_text(rng, b, text_len)
  px_t = torch.from_numpy(px.transpose(0, 3, 1, 2).copy())
  t_enc, t_comp = enc_bench._torch_fns(m)
  yield ("encode_image", jax.jit(lambda p, x: blip2.encode_image(p, cfg, x)), (params, px),
         lambda: t_enc(px_t))
  yield ("compose", jax.jit(lambda p, x, i, k: blip2.compose(p, cfg, x, i, k)),
         (params, px, ids, mask),
         lambda: t_comp(px_t, torch.from_numpy(ids).long(), torch.from_numpy(mask).long()))
  ssz = step_bench._sizes("cpu", False)
  sm = step_bench._hf_model(ssz, "cpu")
  scfg, sparams = benchmarking.blip2_from_torch(sm)
  run_cfg = scfg.replace(dtype="float32", vision_dtype=None, attention_impl="xla")
  for cached in (True, False):
    batch, imgs_t = step_bench.step_inputs(rng, b, cached, ids, mask)
    step, st = step_bench._jax_step(run_cfg, jax.device_put(sparams), cached, "float32")
    batch = jax.device_put(batch)
    # Not donated here: the profile calls the same state several times.
    plain = jax.jit(step.__wrapped__ if hasattr(step, "__wrapped__") else step)
    tstep = step_bench._torch_step(step_bench._hf_model(ssz, "cpu"), cached, False)
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    yield ("qure_step_cached" if cached else "qure_step_pixels", plain, (st, batch),
           lambda tstep=tstep, imgs_t=imgs_t: tstep(*imgs_t, ids_t, mask_t))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", type=Path, default=None, help="write the JSON here (else stdout)")
  p.add_argument("--iters", type=int, default=3, help="timed runs per program (default 3)")
  args = p.parse_args(argv)
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_enable_xprof_traceme=true").strip()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "highest")
  out = {**profiling.start_record(), "programs": {}}
  for name, fn, fargs, tfn in programs():
    row = {"jax": jax_profile(fn, fargs, args.iters), "torch": torch_profile(tfn, args.iters)}
    row["speedup_vs_torch"] = row["torch"]["wall_s"] / row["jax"]["wall_s"]
    out["programs"][name] = row
    print(name, json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "top_ops_s"}
                            if isinstance(v, dict) else v for k, v in row.items()}), flush=True)
  profiling.finish(out, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())

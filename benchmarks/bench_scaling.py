"""QuRe train step versus device count on fake CPU devices, and the DP/FSDP estimate.

Each device count runs in its own subprocess (XLA fixes the number of host devices at
start-up): the QuRe step on cached ViT features (Q-Former at real width 768 trained, ViT
frozen and not run, pairwise sigmoid loss, AdamW), the global batch fixed, compiled by the
trainer's own `make_train_step`/`compile_step` with data-parallel or FSDP shardings. The fake
devices share the host's cores, so this measures the sharded program's overhead and checks
that it computes the same loss as one device; real speed-ups need real devices (see the
estimate in docs/benchmarks.md).

  python benchmarks/bench_scaling.py [--quick]        # JSON to benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

HERE = Path(__file__).resolve().parent
# Run as a script (also the worker subprocesses): this folder and the checkout's cirjax.
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# pylint: disable=g-import-not-at-top,wrong-import-position
import scaling_estimate as est  # noqa: E402
from cirjax import benchmarking  # noqa: E402
from cirjax.losses import pairwise_sigmoid_loss, qure_scores  # noqa: E402
from cirjax.models import blip2, qformer as qf, vit as vit_lib  # noqa: E402
from cirjax.train import sharding, state as state_lib, step as step_lib  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position

TEXT_LEN = 32


def _sizes(quick: bool) -> dict:
  # Quick: fewer ViT feature tokens (112 px) and one Q-Former layer; widths stay real.
  return {"qformer_layers": 1 if quick else 2, "batch": 8 if quick else 16,
          "image_size": 112 if quick else 224,
          "device_counts": [1, 2, 4] if quick else [1, 2, 4, 8], "steps": 2 if quick else 3}


def worker(n_devices: int, strategy: str, qformer_layers: int, batch: int, steps: int,
           image_size: int = 224) -> dict:
  """Runs in a fresh process with `n_devices` host devices; returns one result row."""
  jax.config.update("jax_default_matmul_precision", "highest")
  assert len(jax.devices()) == n_devices, (len(jax.devices()), n_devices)
  vision = vit_lib.ViTConfig(image_size=image_size, patch_size=14, hidden_size=1024,
                             intermediate_size=4096, num_layers=1, num_heads=16,
                             layer_norm_eps=1e-5, hidden_act="quick_gelu", variant="clip",
                             post_layernorm=False)
  cfg = blip2.Blip2Config(vision=vision, qformer=qf.QFormerConfig(
      num_layers=qformer_layers, encoder_hidden_size=1024), ln_vision_eps=1e-5)
  seq = (image_size // 14) ** 2 + 1

  def loss_fn(params, b, rng):
    del rng
    q = blip2.compose_from_features(params, cfg, b["ref_feats"], b["input_ids"],
                                    b["attention_mask"])
    t = blip2.encode_target_from_features(params, cfg,
                                          jnp.concatenate([b["pos_feats"], b["neg_feats"]]))
    s_pos = qure_scores(q, t[:batch], params["temp"])
    s_neg = qure_scores(q, t[batch:], params["temp"])
    return pairwise_sigmoid_loss(s_pos, s_neg), {}

  mesh_spec = (("data", -1), ("fsdp", 1)) if strategy == "dp" else (("data", 1), ("fsdp", -1))
  mesh = sharding.make_mesh(mesh_spec)
  params = blip2.init_blip2(jax.random.PRNGKey(0), cfg)
  mask = state_lib.trainable_mask(params, freeze=["vision/.*"])
  total, trainable = state_lib.count_params(params, mask)
  opt_cfg = ml_collections.ConfigDict({"lr": 1e-5, "weight_decay": 0.05, "schedule": "constant"})
  tx, _ = state_lib.make_optimizer(opt_cfg, mask, 1, 1)
  step = step_lib.make_train_step(loss_fn, tx, mask)
  state = state_lib.init_state(params, tx)
  abstract_state = jax.eval_shape(lambda: state)
  specs = sharding.param_specs(abstract_state, mesh, rules=((".*", "fsdp"),))
  state_sh = sharding.to_shardings(specs, mesh)
  state = jax.device_put(state, state_sh)

  rng = np.random.default_rng(0)
  host = {
      "ref_feats": rng.standard_normal((batch, seq, 1024), np.float32),
      "pos_feats": rng.standard_normal((batch, seq, 1024), np.float32),
      "neg_feats": rng.standard_normal((batch, seq, 1024), np.float32),
      "input_ids": rng.integers(1000, 30000, (batch, TEXT_LEN)).astype(np.int32),
      "attention_mask": np.ones((batch, TEXT_LEN), np.int32),
  }
  host["input_ids"][:, 0] = 101
  data = sharding.global_batch(host, mesh)
  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data)
  batch_sh = jax.tree.map(lambda x: x.sharding, data)
  compiled, mem = step_lib.compile_step(step, abstract_state, state_sh, abstract_batch, batch_sh,
                                        sharding.replicated(mesh), verbose=False)
  cost = benchmarking.compiled_cost(compiled)
  state, metrics = compiled(state, data)
  first_loss = float(metrics["loss"])
  state, metrics = compiled(state, data)  # warm-up
  benchmarking.block(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    benchmarking.block((state, metrics))
    times.append(time.perf_counter() - t0)
  times.sort()
  t = times[len(times) // 2]
  # XLA's cost analysis of an SPMD program is per device: the step's total is N times it.
  flops = cost["flops"] * n_devices if cost["flops"] else None
  return {"name": f"qure_step_cached_{strategy}_{n_devices}dev", "impl": "jax", "devices": n_devices,
          "strategy": strategy, "batch": batch, "step_time_s": t, "samples_per_s": batch / t,
          "flops": flops, "peak_memory_bytes": cost["peak_memory_bytes"],
          "first_loss": first_loss, "params_total": total, "params_trainable": trainable,
          "shapes": {"batch": batch, "qformer_layers": qformer_layers, "width": 768,
                     "vision_width": 1024, "image_size": image_size, "features": seq,
                     "text_len": TEXT_LEN}}


def _spawn(n: int, strategy: str, sizes: dict) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={n}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["CUDA_VISIBLE_DEVICES"] = ""
  cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n), "--strategy",
         strategy, "--qformer-layers", str(sizes["qformer_layers"]), "--batch",
         str(sizes["batch"]), "--steps", str(sizes["steps"]), "--image-size", str(sizes["image_size"])]
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if p.returncode != 0:
    raise RuntimeError(f"scaling worker ({n} devices, {strategy}) failed:\n{p.stderr[-3000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def estimate_rows(results_dir: Path = HERE / "results") -> list[dict]:
  """The DP/FSDP table, from a measured single-GPU step when bench_gpu.json has one."""
  vision = vit_lib.ViTConfig(image_size=224, patch_size=14, hidden_size=1024,
                             intermediate_size=4096, num_layers=24, num_heads=16,
                             hidden_act="quick_gelu", variant="clip", post_layernorm=False)
  cfg = blip2.Blip2Config(vision=vision, qformer=qf.QFormerConfig(encoder_hidden_size=1024))
  shapes = blip2.abstract_params(cfg)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  vit = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["vision"]))
  qformer_trainable = total - vit

  measured, gpu_kind = {}, "GPU"
  gpu = results_dir / "bench_gpu.json"
  if gpu.is_file():
    payload = json.loads(gpu.read_text())
    gpu_kind = ", ".join(sorted(set(payload.get("machine", {}).get("devices", [])))) or "GPU"
    for r in payload.get("rows", []):
      if r.get("impl") == "jax" and r.get("name", "").startswith("qure_step") and r.get("step_time_s"):
        measured.setdefault(r["name"], r)
  qure_batch = 32

  def step_for(name, flops):
    r = measured.get(name)
    if r and r.get("batch"):
      # Rescale a measured step to the papers' per-GPU batch (compute scales with batch).
      return r["step_time_s"] * qure_batch / r["batch"], f"measured on {gpu_kind}"
    return est.modelled_step_s(flops), "modelled: analytic FLOPs at 40% MFU of H100 bf16"

  t_full, src_full = step_for("qure_step_pixels", est.qure_step_flops(qure_batch))
  t_cached, src_cached = step_for("qure_step_cached",
                                  est.qure_step_flops(qure_batch, cached_features=True))
  # Phi-3.5-mini (3.82 B) + CLIP-L; LoRA r=64 on every linear of the decoder (~100 M).
  lora_params = 32 * 64 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))
  t_lora = est.modelled_step_s(est.instructcir_lora_step_flops(64))
  workloads = [
      est.Workload("qure (ViT in step)", t_full, src_full, qformer_trainable, qformer_trainable),
      est.Workload("qure (cached ViT features)", t_cached, src_cached, qformer_trainable,
                   qformer_trainable),
      est.Workload("instructcir stage 2 (LoRA)", t_lora,
                   "modelled: analytic FLOPs at 40% MFU of H100 bf16", lora_params, 3_821_000_000,
                   backward_fraction=0.5),
  ]
  return est.table(workloads)


def run(device: str = "cpu", quick: bool = False, dry_run=None) -> dict:
  """The fake-device sweep (CPU only) and the DP/FSDP estimate; on GPU the estimate alone
  (from this GPU's measured train step, when bench_gpu.json has one). `dry_run`: a
  `benchmarking.DryRun`: the `device` path once on the CPU."""
  if dry_run is not None and device == "gpu":
    _, estimate = dry_run.run_once("dp_fsdp_estimate", estimate_rows, "host")
    return {"rows": [], "estimate": estimate}
  sizes = _sizes(quick)
  rows = []
  if device == "cpu":
    for strategy in ("dp", "fsdp"):
      base = None
      for n in sizes["device_counts"]:
        if strategy == "fsdp" and n == 1:
          continue  # identical to dp on one device
        print(f"[bench scaling] {strategy} on {n} fake devices ...", flush=True)
        r = _spawn(n, strategy, sizes)
        if strategy == "dp" and n == 1:
          base = r
        ref = base or rows[0]
        r["loss_matches_1_device"] = bool(abs(r["first_loss"] - ref["first_loss"])
                                          <= 1e-4 * max(1.0, abs(ref["first_loss"])))
        r["overhead_vs_1_device"] = r["step_time_s"] / ref["step_time_s"]
        rows.append(r)
        if not r["loss_matches_1_device"]:
          raise AssertionError(f"{strategy} on {n} devices: loss {r['first_loss']} != "
                               f"1-device loss {ref['first_loss']}")
  return {"rows": rows, "estimate": estimate_rows()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default=str(HERE / "results"))
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--strategy", default="dp", help=argparse.SUPPRESS)
  p.add_argument("--qformer-layers", type=int, default=2, help=argparse.SUPPRESS)
  p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
  p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
  p.add_argument("--image-size", type=int, default=224, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.worker is not None:
    print(json.dumps(worker(a.worker, a.strategy, a.qformer_layers, a.batch, a.steps, a.image_size)))
    return 0
  result = run("cpu", a.quick)
  path = benchmarking.write_results("scaling_cpu", result["rows"], a.out,
                                    extra={"estimate": result["estimate"], "quick": a.quick})
  print(benchmarking.format_table(result["rows"], ["name", "devices", "step_time_s",
                                                   "samples_per_s", "overhead_vs_1_device",
                                                   "loss_matches_1_device"]))
  print(benchmarking.format_table(result["estimate"], ["workload", "strategy", "gpus",
                                                       "step_compute_ms", "comm_ms",
                                                       "exposed_comm_ms", "efficiency"]))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

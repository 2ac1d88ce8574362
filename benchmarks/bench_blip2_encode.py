"""BLIP-2 encoding throughput: jitted cirjax `encode_image` / `compose` vs HF PyTorch.

Both sides run the same weights (a random HF `Blip2ForImageTextRetrieval` converted to
cirjax) on the same inputs, on the same machine, in fp32 (cirjax with matmul precision
'highest'; torch: eager attention on CPU, HF's default SDPA on GPU):

* `encode_image` — corpus/target encoding: ViT -> ln_vision -> Q-Former over the 32 queries
  -> vision_projection -> L2-normalise, `[B, 32, 256]`. torch: HF's ITC image path.
* `compose` — QuRe composed query: ViT on the reference image, queries + 32 text tokens
  jointly through the Q-Former, text_projection of the query outputs, mean, normalise.
  torch: the same computation from HF's modules (the ITM-path Q-Former pass).

Widths are the real ones (EVA-g 1408/16 heads, Q-Former 768/12, 32 queries, 256-d, BERT
vocab 30523, 224 px); depth is reduced on CPU (set by `_sizes`) and full (39 + 12 layers)
on GPU. Times are the median of several runs after warm-up, each ended by a device sync.
FLOPs are XLA's count of the compiled cirjax computation (the same math on both sides).
The rows also report the max relative difference of the two outputs.

`python benchmarks/bench_blip2_encode.py [--device cpu|gpu] [--quick]` writes
benchmarks/results/blip2_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def _sizes(device: str, quick: bool) -> dict:
  if quick:
    return {"batch": 2, "vision_layers": 1, "qformer_layers": 2, "iters": 2, "warmup": 1}
  if device == "gpu":
    return {"batch": 64, "vision_layers": 39, "qformer_layers": 12, "iters": 10, "warmup": 3}
  return {"batch": 4, "vision_layers": 2, "qformer_layers": 2, "iters": 3, "warmup": 1}


def _hf_model(sz: dict, tdev: str):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vision = transformers.Blip2VisionConfig(
      hidden_size=1408, num_attention_heads=16, intermediate_size=6144,
      num_hidden_layers=sz["vision_layers"], image_size=224, patch_size=14)
  qformer = transformers.Blip2QFormerConfig(
      hidden_size=768, num_attention_heads=12, intermediate_size=3072,
      num_hidden_layers=sz["qformer_layers"], cross_attention_frequency=2,
      encoder_hidden_size=1408, vocab_size=30523, use_qformer_text_input=True)
  cfg = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                 num_query_tokens=32, image_text_hidden_size=256)
  # PyTorch's side as its users run it: HF's default fused attention (SDPA) on GPU; the
  # exact eager formulation on the CPU path (parity-grade numerics).
  cfg._attn_implementation = "sdpa" if tdev == "cuda" else "eager"  # pylint: disable=protected-access
  torch.manual_seed(0)
  m = transformers.Blip2ForImageTextRetrieval(cfg).eval()
  with torch.no_grad():  # HF zero-inits query tokens; make them matter
    m.query_tokens.normal_(0, 0.5)
  return m.to(tdev)


def _torch_fns(m):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def image_ctx(px):
    return m.vision_model(px).last_hidden_state  # post-layernormed sequence = ln_vision

  def encode_image(px):
    with torch.no_grad():
      img = image_ctx(px)
      q = m.query_tokens.expand(img.shape[0], -1, -1)
      h = m.qformer(query_embeds=q, encoder_hidden_states=img).last_hidden_state
      return F.normalize(m.vision_projection(h), dim=-1)

  def compose(px, ids, mask):
    with torch.no_grad():
      img = image_ctx(px)
      q = m.query_tokens.expand(img.shape[0], -1, -1)
      nq = q.shape[1]
      full = torch.cat([torch.ones(mask.shape[0], nq, dtype=mask.dtype, device=mask.device),
                        mask], dim=1)
      h = m.qformer(query_embeds=m.embeddings(input_ids=ids, query_embeds=q), query_length=nq,
                    attention_mask=full, encoder_hidden_states=img).last_hidden_state
      return F.normalize(m.text_projection(h[:, :nq]).mean(1), dim=-1)

  return encode_image, compose


def _torch_peak(tdev: str, fn) -> int | None:
  if tdev != "cuda":
    return None
  import torch  # pylint: disable=g-import-not-at-top
  torch.cuda.reset_peak_memory_stats()
  fn()
  torch.cuda.synchronize()
  return int(torch.cuda.max_memory_allocated())


def _rel(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run(device: str = "cpu", quick: bool = False, dry_run=None) -> list[dict]:
  """Rows for encode_image and compose, jax and torch (see the module docstring).
  `dry_run`: a `benchmarking.DryRun`: the `device` path run once on the CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  from cirjax.models import blip2  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  tdev = benchmarking.torch_device(device, dry_run)
  if tdev == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
  sz = _sizes(device, quick)
  print(f"[bench_blip2] building HF model (EVA 1408 x {sz['vision_layers']}, Q-Former 768 x "
        f"{sz['qformer_layers']}) and converting", file=sys.stderr, flush=True)
  m = _hf_model(sz, tdev)
  cfg, params = benchmarking.blip2_from_torch(m)
  params = jax.device_put(params)
  b, text_len = sz["batch"], 32
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((b, 224, 224, 3)).astype(np.float32)
  ids, mask = benchmarking.qure_text(rng, b, text_len)  # half the rows padded
  px_j, ids_j, mask_j = jax.device_put((pixels, ids, mask))
  px_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(tdev)
  ids_t = torch.from_numpy(ids).long().to(tdev)
  mask_t = torch.from_numpy(mask).long().to(tdev)
  t_enc, t_comp = _torch_fns(m)

  enc_j = jax.jit(lambda p, x: blip2.encode_image(p, cfg, x))
  comp_j = jax.jit(lambda p, x, i, k: blip2.compose(p, cfg, x, i, k))
  cases = [
      ("encode_image", enc_j, (params, px_j), lambda: t_enc(px_t)),
      ("compose", comp_j, (params, px_j, ids_j, mask_j), lambda: t_comp(px_t, ids_t, mask_t)),
  ]
  shapes = {"batch": b, "image_size": 224, "text_len": text_len, "vision": "EVA 1408/16",
            "vision_layers": sz["vision_layers"], "qformer": "768/12",
            "qformer_layers": sz["qformer_layers"], "queries": 32, "embed_dim": 256,
            "dtype": "float32", "matmul_precision": "highest"}
  rows = []
  for name, fn, args, torch_fn in cases:
    print(f"[bench_blip2] {name}: compiling and timing", file=sys.stderr, flush=True)
    compiled = benchmarking.compile_program(name, fn, *args, dry_run=dry_run, attention=True)
    cost = benchmarking.compiled_cost(compiled)
    t = benchmarking.time_fn(lambda: compiled(*args), warmup=sz["warmup"], iters=sz["iters"],
                             dry_run=dry_run, program=name)
    tt = benchmarking.time_fn(torch_fn, warmup=sz["warmup"], iters=sz["iters"],
                              dry_run=dry_run, program=name, impl="torch_eager")
    err = _rel(np.asarray(compiled(*args)), torch_fn().float().cpu().numpy())
    common = {"name": name, "batch": b, "flops": cost["flops"], "shapes": shapes,
              "precision": "fp32",
              "max_rel_diff_vs_torch": err}
    rows.append({**common, "impl": "jax", "step_time_s": t["median_s"],
                 "samples_per_s": b / t["median_s"], "mfu": None,
                 "peak_memory_bytes": cost["peak_memory_bytes"],
                 "cudnn_attention_calls": cost["cudnn_attention_calls"], "timing": t})
    rows.append({**common, "impl": "torch", "step_time_s": tt["median_s"],
                 "samples_per_s": b / tt["median_s"], "mfu": None,
                 "peak_memory_bytes": _torch_peak(tdev, torch_fn), "timing": tt})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--device", default=None, choices=["cpu", "gpu"], help="default cpu")
  p.add_argument("--quick", action="store_true", help="smallest sizes: a smoke run")
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
  p.add_argument("--dry-run", action="store_true",
                 help="the --device gpu path once through on this CPU at quick sizes (as "
                 "`cirjax bench --dry-run`); writes <out>/dryrun/")
  args = p.parse_args(argv)
  if args.dry_run:
    from cirjax.commands import bench  # pylint: disable=g-import-not-at-top
    return bench.script_dry_run(__file__, args.device, args.out)
  args.device = args.device or "cpu"
  if args.device == "cpu":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  rows = run(args.device, args.quick)
  peak, peak_src = benchmarking.device_peak_flops("fp32")
  for r in rows:
    if r.get("flops") and peak:
      r["mfu"] = r["flops"] / r["step_time_s"] / peak
  path = benchmarking.write_results(f"blip2_{args.device}", rows, args.out,
                                    extra={"quick": args.quick, "peak_flops": peak,
                                           "peak_source": peak_src})
  print(benchmarking.format_table(rows, ["name", "impl", "batch", "step_time_s", "samples_per_s",
                                         "flops", "mfu", "peak_memory_bytes",
                                         "max_rel_diff_vs_torch"]))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

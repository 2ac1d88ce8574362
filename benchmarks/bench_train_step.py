"""QuRe train-step throughput: the jitted cirjax step vs the same step in PyTorch.

The step (docs/reference_semantics.md): BLIP-2, frozen ViT at CLIP-L widths (1024 wide, 16 heads,
MLP 4096, 224 px, patch 14) and a trained Q-Former (768/12, 32 queries, 256-d heads); per
query, the composed query (queries + 32 text tokens jointly, cross-attending to the reference
image), the target features of the positive and of one negative image, QuRe's pairwise loss
`-log sigmoid((s_pos - s_neg) / temp)`, backward through the trained parameters and an AdamW
update (weight decay 0.05); the Q-Former drops out at its config's rates (0.1) on both sides,
as training runs (before 2026-12-05 only the torch side did). Two cases:

* `qure_step_cached` — the frozen ViT's features are inputs (cirjax's default when the ViT is
  frozen and there is no augmentation): only `ln_vision` + Q-Former + heads run;
* `qure_step_pixels` — pixels in; the frozen ViT runs forward for 3B images every step.

PyTorch runs HF `Blip2ForImageTextRetrieval` modules with the same weights (converted with
`cirjax.convert.blip2_convert`), `torch.optim.AdamW` on the same trainable set, eager and, where
it compiles, `torch.compile`. On CPU both sides fp32 (cirjax with matmul precision 'highest');
on GPU as training runs: bf16 compute over fp32 weights (cirjax with `attention_impl='auto'`,
cuDNN's fused attention where the model allows; torch under bf16 autocast).
The HF vision tower is EVA-style (BLIP-2's own), at CLIP-L widths: same FLOPs as CLIP-L.
Depth is reduced on CPU (`_sizes`), full (23 ViT + 12 Q-Former layers) on GPU.
FLOPs are XLA's count of the compiled cirjax step; MFU = FLOPs / step time / peak
(datasheet bf16 dense on GPU, a measured matmul ceiling on CPU).

`python benchmarks/bench_train_step.py [--device cpu|gpu] [--quick]` writes
benchmarks/results/train_step_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def _sizes(device: str, quick: bool) -> dict:
  # On GPU the step runs as training does (configs/qure_blip2_cirr.py): bf16 compute over fp32
  # master weights, attention_impl 'auto' (cuDNN's fused kernels where the model allows);
  # on CPU in fp32. `quick` shrinks the shapes, never the GPU path.
  dtype = {"dtype": "bfloat16" if device == "gpu" else "float32"}
  if quick:
    return {"batch": 2, "vision_layers": 1, "qformer_layers": 2, "iters": 2, "warmup": 1, **dtype}
  if device == "gpu":
    return {"batch": 32, "vision_layers": 23, "qformer_layers": 12, "iters": 10, "warmup": 3,
            **dtype}
  return {"batch": 4, "vision_layers": 2, "qformer_layers": 2, "iters": 3, "warmup": 1, **dtype}


def torch_attention(sz: dict) -> str:
  return "sdpa" if sz["dtype"] == "bfloat16" else "eager"


def _hf_model(sz: dict, tdev: str):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vision = transformers.Blip2VisionConfig(
      hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
      num_hidden_layers=sz["vision_layers"], image_size=224, patch_size=14)
  qformer = transformers.Blip2QFormerConfig(
      hidden_size=768, num_attention_heads=12, intermediate_size=3072,
      num_hidden_layers=sz["qformer_layers"], cross_attention_frequency=2,
      encoder_hidden_size=1024, vocab_size=30523, use_qformer_text_input=True)
  cfg = transformers.Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                 num_query_tokens=32, image_text_hidden_size=256)
  # PyTorch's side as its users run it: HF's default fused attention (SDPA) on the
  # bf16 GPU path; the exact eager formulation on the fp32 CPU path (parity-grade numerics).
  cfg._attn_implementation = torch_attention(sz)  # pylint: disable=protected-access
  torch.manual_seed(0)
  m = transformers.Blip2ForImageTextRetrieval(cfg)
  with torch.no_grad():  # HF zero-inits the query tokens; make them matter
    m.query_tokens.normal_(0, 0.5)
  return m.to(tdev)


def _torch_step(m, cached: bool, compile_: bool, dtype: str = "float32"):
  """A closure running one QuRe step in PyTorch (frozen ViT, trained rest, AdamW); bf16:
  under autocast (fp32 weights, bf16 matmuls), as the reference trains in mixed precision."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  trained = [p for n, p in m.named_parameters()
             if not n.startswith("vision_model.") or n.startswith("vision_model.post_layernorm")]
  for n, p in m.named_parameters():
    p.requires_grad_(not n.startswith("vision_model.") or n.startswith("vision_model.post_layernorm"))
  temp = torch.nn.Parameter(torch.tensor(0.07, device=m.query_tokens.device))
  opt = torch.optim.AdamW(trained + [temp], lr=1e-5, weight_decay=0.05)
  post_ln = m.vision_model.post_layernorm

  def vit(px):  # frozen: no graph
    with torch.no_grad():
      h = m.vision_model.embeddings(px)
      return m.vision_model.encoder(inputs_embeds=h).last_hidden_state

  def loss_fn(ref, pos, neg, ids, mask):
    b, nq = ref.shape[0], m.query_tokens.shape[1]
    ctx = post_ln(ref)
    q = m.query_tokens.expand(b, -1, -1)
    full = torch.cat([torch.ones(b, nq, dtype=mask.dtype, device=mask.device), mask], dim=1)
    h = m.qformer(query_embeds=m.embeddings(input_ids=ids, query_embeds=q), query_length=nq,
                  attention_mask=full, encoder_hidden_states=ctx).last_hidden_state
    query = F.normalize(m.text_projection(h[:, :nq]).mean(1), dim=-1)
    tctx = post_ln(torch.cat([pos, neg]))
    tq = m.query_tokens.expand(2 * b, -1, -1)
    th = m.qformer(query_embeds=tq, encoder_hidden_states=tctx).last_hidden_state
    t = F.normalize(m.vision_projection(th), dim=-1)
    s = torch.einsum("bd,nkd->bnk", query, t).amax(-1) / temp
    s_pos, s_neg = s[torch.arange(b), torch.arange(b)], s[torch.arange(b), b + torch.arange(b)]
    return -F.logsigmoid(s_pos - s_neg).mean()

  if compile_:
    loss_fn = torch.compile(loss_fn)

  autocast = torch.autocast(m.query_tokens.device.type, dtype=torch.bfloat16,
                            enabled=dtype == "bfloat16")

  def step(ref, pos, neg, ids, mask):
    with autocast:
      if not cached:
        ref, pos, neg = vit(ref), vit(pos), vit(neg)
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(ref, pos, neg, ids, mask)
    loss.backward()
    opt.step()
    return loss.detach()

  step.optimizer = opt  # profile_step_floor.py times its update alone
  return step


def step_inputs(rng, b: int, cached: bool, ids, mask, tdev: str = "cpu"):
  """(the jax step's host batch, the torch step's three image tensors) of one step: ref, pos
  and neg ViT features [b, 257, 1024] (`cached`) or pixels [b, 224, 224, 3] (NCHW for
  torch), drawn from `rng` in that order, with the text `ids` and `mask`."""
  import torch  # pylint: disable=g-import-not-at-top
  shape = (b, (224 // 14) ** 2 + 1, 1024) if cached else (b, 224, 224, 3)
  imgs = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
  imgs_t = [torch.from_numpy(x if cached else x.transpose(0, 3, 1, 2).copy()).to(tdev)
            for x in imgs]
  return {"ref": imgs[0], "pos": imgs[1], "neg": imgs[2], "ids": ids, "mask": mask}, imgs_t


def jax_optimizer(params):
  """(optax AdamW over the trained parameters, the trainable mask): the frozen ViT and ITM
  head as QuReTask freezes them, lr 1e-5 and weight decay 0.05 as the torch side's AdamW."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from cirjax.train import state as st  # pylint: disable=g-import-not-at-top
  mask = st.trainable_mask(params, freeze=("vision/.*", "itm_head/.*"))
  tcfg = ml_collections.ConfigDict(dict(lr=1e-5, schedule="constant", weight_decay=0.05))
  tx, _ = st.make_optimizer(tcfg, mask, 1, 1)
  return tx, mask


def _jax_step(cfg, params, cached: bool, dtype: str = "float32"):
  """The cirjax train step (cirjax.train.step.make_train_step) and its initial state; `cfg` is
  the run config (compute dtype, attention kernel), as `QuReTask._run_cfg` makes it."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cirjax.models import blip2  # pylint: disable=g-import-not-at-top
  from cirjax import losses  # pylint: disable=g-import-not-at-top
  from cirjax.train import state as st  # pylint: disable=g-import-not-at-top
  from cirjax.train.step import make_train_step  # pylint: disable=g-import-not-at-top

  def loss_fn(p, batch, rng):
    # The Q-Former drops out as cirjax trains (`QuReTask.loss_fn`) and as the torch side,
    # a module in train mode, does: both sides do the same work.
    rng_query, rng_target = jax.random.split(rng)
    if cached:
      ref, pos, neg = batch["ref"], batch["pos"], batch["neg"]
    else:
      b = batch["ref"].shape[0]
      f = blip2.vision_features(p, cfg, jnp.concatenate([batch["ref"], batch["pos"],
                                                         batch["neg"]]))
      ref, pos, neg = f[:b], f[b:2 * b], f[2 * b:]
    b = ref.shape[0]
    q = blip2.compose_from_features(p, cfg, ref, batch["ids"], batch["mask"],
                                    dropout_rng=rng_query)
    t = blip2.encode_target_from_features(p, cfg, jnp.concatenate([pos, neg]),
                                          dropout_rng=rng_target)
    temp = p["temp"]
    s_pos, s_neg = losses.qure_scores(q, t[:b], temp), losses.qure_scores(q, t[b:], temp)
    return losses.pairwise_sigmoid_loss(s_pos, s_neg), {}

  tx, mask = jax_optimizer(params)
  state = st.init_state(params, tx)
  step = make_train_step(loss_fn, tx, mask, compute_dtype=dtype)
  return jax.jit(step, donate_argnums=(0,)), state


def run(device: str = "cpu", quick: bool = False, torch_compile: bool | None = None,
        dry_run=None) -> list[dict]:
  """Rows for the cached-feature and pixel QuRe steps, jax and torch (eager, compiled).

  `torch_compile`: also time `torch.compile` (default: on GPU only; inductor's C++ build
  takes minutes on a small CPU machine; never in a dry run). `dry_run`: a
  `benchmarking.DryRun`: the `device` path run once on the CPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from cirjax import benchmarking  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  tdev = benchmarking.torch_device(device, dry_run)
  if tdev == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
  sz = _sizes(device, quick)
  print(f"[bench_train_step] HF BLIP-2 (ViT 1024 x {sz['vision_layers']}, Q-Former 768 x "
        f"{sz['qformer_layers']}), batch {sz['batch']}, {sz['dtype']}", file=sys.stderr,
        flush=True)
  m = _hf_model(sz, tdev)
  cfg, params = benchmarking.blip2_from_torch(m)
  bf16 = sz["dtype"] == "bfloat16"
  run_cfg = cfg.replace(dtype=sz["dtype"], vision_dtype=None,
                        attention_impl="auto" if bf16 else "xla")
  b, text_len = sz["batch"], 32
  rng = np.random.default_rng(0)
  ids, mask = benchmarking.qure_text(rng, b, text_len)
  ids_t, mask_t = torch.from_numpy(ids).long().to(tdev), torch.from_numpy(mask).long().to(tdev)
  precision = "bf16" if bf16 else "fp32"
  peak = None if dry_run else benchmarking.device_peak_flops(precision)[0]
  rows = []
  for cached in (True, False):
    name = "qure_step_cached" if cached else "qure_step_pixels"
    batch, imgs_t = step_inputs(rng, b, cached, ids, mask, tdev)
    shapes = {"batch": b, "text_len": text_len, "image_size": 224, "vision": "1024/16 (CLIP-L)",
              "vision_layers": sz["vision_layers"], "qformer": "768/12",
              "qformer_layers": sz["qformer_layers"], "queries": 32, "embed_dim": 256,
              "inputs": "vision features" if cached else "pixels", "dtype": sz["dtype"],
              "attention_impl": run_cfg.attention_impl}
    print(f"[bench_train_step] {name}: jax compile + time", file=sys.stderr, flush=True)
    step, state = _jax_step(run_cfg, jax.device_put(params), cached, sz["dtype"])
    batch = jax.device_put(batch)
    compiled = benchmarking.compile_program(name, step, state, batch, dry_run=dry_run,
                                            attention=True)
    cost = benchmarking.compiled_cost(compiled)
    holder = {"s": state}

    def jstep():
      holder["s"], metrics = compiled(holder["s"], batch)
      return metrics

    t = benchmarking.time_fn(jstep, warmup=sz["warmup"], iters=sz["iters"], dry_run=dry_run,
                             program=name)
    flops = cost["flops"]
    rows.append({"name": name, "impl": "jax", "variant": "jit", "precision": precision,
                 "step_time_s": t["median_s"],
                 "samples_per_s": b / t["median_s"], "flops": flops,
                 "mfu": flops / t["median_s"] / peak if flops and peak else None,
                 "peak_memory_bytes": cost["peak_memory_bytes"],
                 "cudnn_attention_calls": cost["cudnn_attention_calls"], "shapes": shapes,
                 "timing": t})
    if torch_compile is None:
      torch_compile = device == "gpu" and not quick
    for variant in ("eager", "compile") if torch_compile and not dry_run else ("eager",):
      print(f"[bench_train_step] {name}: torch {variant}", file=sys.stderr, flush=True)
      try:
        tstep = _torch_step(_hf_model(sz, tdev), cached, variant == "compile", sz["dtype"])
        if tdev == "cuda":
          torch.cuda.reset_peak_memory_stats()
        tt = benchmarking.time_fn(lambda: tstep(*imgs_t, ids_t, mask_t), warmup=sz["warmup"],
                                  iters=sz["iters"], dry_run=dry_run, program=name,
                                  impl=f"torch_{variant}")
      except Exception as e:  # pylint: disable=broad-except  # torch.compile may not work here
        if dry_run:  # the eager reference must run: a dry run reports its failure
          raise
        rows.append({"name": name, "impl": "torch", "variant": variant, "error": repr(e)[:300],
                     "shapes": shapes})
        continue
      mem = int(torch.cuda.max_memory_allocated()) if tdev == "cuda" else None
      rows.append({"name": name, "impl": "torch", "variant": variant, "precision": precision,
                   "step_time_s": tt["median_s"], "samples_per_s": b / tt["median_s"],
                   "flops": flops, "mfu": flops / tt["median_s"] / peak if flops and peak else None,
                   "peak_memory_bytes": mem, "shapes": shapes, "timing": tt})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--device", default=None, choices=["cpu", "gpu"], help="default cpu")
  p.add_argument("--quick", action="store_true", help="smallest sizes: a smoke run")
  p.add_argument("--torch-compile", action="store_true", default=None,
                 help="also time torch.compile on CPU (always on for --device gpu)")
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
  p.add_argument("--dry-run", action="store_true", help="the --device gpu path once through on this CPU at quick "
                 "sizes (as `cirjax bench --dry-run`); writes <out>/dryrun/")
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
  rows = run(args.device, args.quick, args.torch_compile)
  peak, peak_src = benchmarking.device_peak_flops("bf16" if args.device == "gpu" else "fp32")
  path = benchmarking.write_results(f"train_step_{args.device}", rows, args.out,
                                    extra={"quick": args.quick, "peak_flops": peak,
                                           "peak_source": peak_src})
  print(benchmarking.format_table(rows, ["name", "impl", "variant", "step_time_s",
                                         "samples_per_s", "flops", "mfu", "peak_memory_bytes"]))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""LLaVA-Phi embedding and the InstructCIR LoRA train step: cirjax (jitted) vs HF PyTorch.

Both sides hold the same random weights (an HF `LlavaForConditionalGeneration` built from a
config and converted with `cirjax.convert.llava_convert`) and get the same inputs; the rows
also record how far the two embeddings are apart, so a fast but wrong number cannot pass.

Rows (`run(device, quick) -> list[dict]`):

* `llava_embed_image` - composed-query side: left-padded prompts, each with one 224 px
  image (256 image tokens) and a short instruction; L2-normalised last-token embedding.
* `llava_embed_text`  - caption side: text-only prompts.
* `llava_lora_step`   - one InstructCIR stage-2 training step: LoRA (r=64, alpha=16,
  dropout 0.05 on qkv/o/gate_up/down) on the frozen model, InfoNCE (cosine / 0.05) of the
  image+instruction embeddings against caption embeddings, AdamW update of the adapters.
  jax: `jax.value_and_grad` + optax.adamw under one `jax.jit`; torch: PEFT + torch.optim.AdamW.

Widths are the real ones (CLIP ViT-L/14: 1024 wide, 16 heads; Phi-3.5-mini: 3072 hidden,
32 heads, 8192 MLP, 32064 vocab); depth is reduced on CPU (vision 2 layers, LLM 1 layer) and
full on GPU (24 + 32, bf16 compute). `--quick` shrinks everything to a smoke run.
FLOPs are analytic (matmuls + attention, 2 per MAC), reported identically for both
implementations; a LoRA step counts the forward plus the decoder's input-gradient backward
(the frozen base needs no weight gradients, the tower none at all). XLA's own count of the
compiled program is recorded beside it (`xla_flops`) as a check.

`python benchmarks/bench_llava_embed.py [--device cpu|gpu] [--quick]` writes
benchmarks/results/llava_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Run as a script from a checkout: make the repository's cirjax importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cirjax import benchmarking, lora  # noqa: E402  pylint: disable=g-import-not-at-top
from cirjax.convert import llava_convert  # noqa: E402  pylint: disable=g-import-not-at-top
from cirjax.models import llava  # noqa: E402  pylint: disable=g-import-not-at-top


def _sizes(device: str, quick: bool) -> dict:
  # The GPU path (bf16, attention_impl 'auto': cuDNN's fused kernels) holds at quick sizes too.
  if quick:
    return dict(vision=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_hidden_layers=2, image_size=56, patch_size=14),
                text=dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4),
                batch=4, text_len=24, iters=2, rank=8,
                dtype="bfloat16" if device == "gpu" else "float32")
  real_v = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                image_size=224, patch_size=14)
  real_t = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                num_attention_heads=32)
  if device == "gpu":
    return dict(vision=dict(real_v, num_hidden_layers=24),
                text=dict(real_t, num_hidden_layers=32), batch=32, text_len=48, iters=10,
                rank=64, dtype="bfloat16")
  return dict(vision=dict(real_v, num_hidden_layers=2), text=dict(real_t, num_hidden_layers=1),
              batch=2, text_len=24, iters=3, rank=64, dtype="float32")


def build(sz: dict, seed: int = 0):
  """(HF torch model, cirjax params, cirjax config) with the same random weights."""
  # torch and transformers are the optional PyTorch reference (the `torch` extra).
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  tc = transformers.Phi3Config(**sz["text"], num_key_value_heads=sz["text"]["num_attention_heads"],
                               max_position_embeddings=4096, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2)
  vc = transformers.CLIPVisionConfig(**sz["vision"])
  cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=3)
  # PyTorch's side as its users run it: HF's default fused attention (SDPA) on the
  # bf16 GPU path; the exact eager formulation on the fp32 CPU path (parity-grade numerics).
  cfg._attn_implementation = "sdpa" if sz["dtype"] == "bfloat16" else "eager"  # pylint: disable=protected-access
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # move norms/biases off their init so nothing is trivially 0 or 1
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
      p.add_(torch.randn(p.shape, generator=g) * 0.02)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  config = llava_convert.llava_config_from_hf(model.config.to_dict())
  params = llava_convert.convert_state_dict(state, config)
  return model, params, config


def inputs(config, batch: int, text_len: int, images: bool, seed: int = 0):
  """Left-padded ids/mask (rows 0..3 tokens shorter) and NHWC pixels (one image per row)."""
  rng = np.random.default_rng(seed)
  p = config.num_image_tokens if images else 0
  seq = text_len + p
  ids = np.zeros((batch, seq), np.int32)
  mask = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    n = text_len - (b % 4) + p
    row = rng.integers(4, config.text.vocab_size, n)
    if images:
      row[1:1 + p] = config.image_token_id
    ids[b, seq - n:] = row
    mask[b, seq - n:] = 1
  pix = None
  if images:
    v = config.vision
    pix = rng.standard_normal((batch, v.image_size, v.image_size, 3)).astype(np.float32)
  return ids, mask, pix


def flops_parts(config, batch: int, seq: int, images: bool) -> dict[str, float]:
  """Forward FLOPs (2 per MAC): the decoder on [batch, seq] and, with images, the CLIP layers
  actually run (up to the feature layer), the patch conv and the projector."""
  t, v = config.text, config.vision
  hd = t.dim_per_head
  per_tok = (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * hd
             + t.num_heads * hd * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
  attn = 2 * seq * t.num_heads * hd  # QK^T and PV per query token
  out = {"decoder": 2.0 * batch * seq * t.num_layers * (per_tok + attn), "vision": 0.0}
  if images:
    n_tok = v.num_patches + 1
    layers = max(l % (v.num_layers + 1) for l in config.feature_layers)
    vper = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
    f = 2.0 * batch * n_tok * layers * (vper + 2 * n_tok * v.hidden_size)
    f += 2.0 * batch * v.num_patches * (v.hidden_size * t.hidden_size + t.hidden_size ** 2)
    f += 2.0 * batch * v.num_patches * 3 * v.patch_size ** 2 * v.hidden_size
    out["vision"] = f
  return out


def analytic_flops(config, batch: int, seq: int, images: bool) -> float:
  """Forward FLOPs of one embedding batch (see `flops_parts`)."""
  return sum(flops_parts(config, batch, seq, images).values())


def lora_step_flops(config, batch: int, seq_q: int, seq_c: int) -> float:
  """One LoRA step: forward of both towers; backward only through the decoder, and with a
  frozen base only input gradients (about one more forward) are needed there. The adapters'
  own FLOPs (rank 64 over width 3072: ~2-4 %) are left out, on both sides alike."""
  q = flops_parts(config, batch, seq_q, True)
  c = flops_parts(config, batch, seq_c, False)
  return q["vision"] + 2.0 * (q["decoder"] + c["decoder"])


def _progress(row: dict) -> None:
  print(f"  {row['name']:<18} {row['impl']:<6} {row['step_time_s'] * 1e3:10.1f} ms/step",
        file=sys.stderr, flush=True)


def _torch_device(device: str, dry_run=None):
  # torch is the optional PyTorch reference (the `torch` extra).
  import torch  # pylint: disable=g-import-not-at-top
  return torch.device(benchmarking.torch_device(device, dry_run))


def _run_config(config, sz: dict):
  """The run's model config: its compute dtype; on bf16 (the GPU path) attention 'auto', which
  takes cuDNN's fused kernels on a GPU, as InstructCIR's training configs do."""
  return config.replace(dtype=sz["dtype"], param_dtype=sz["dtype"],
                        attention_impl="auto" if sz["dtype"] == "bfloat16" else "xla")


def _embed_rows(sz, device, model, params, config, dry_run=None) -> list[dict]:
  # torch is the optional PyTorch reference (the `torch` extra).
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  dev = _torch_device(device, dry_run)
  tdtype = torch.bfloat16 if sz["dtype"] == "bfloat16" else torch.float32
  cfg = _run_config(config, sz)
  p = jax.device_put(llava.cast_params(params, cfg))
  tmodel = model.to(dev, tdtype)
  f = jax.jit(llava.embed, static_argnames=("config",))
  rows = []
  for name, images in (("llava_embed_image", True), ("llava_embed_text", False)):
    ids, mask, pix = inputs(config, sz["batch"], sz["text_len"], images)
    b, seq = ids.shape
    j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)
    j_pix = None if pix is None else jnp.asarray(pix)
    compiled = benchmarking.compile_program(name, f, p, cfg, j_ids, j_mask, j_pix,
                                            dry_run=dry_run, attention=True)
    cost = benchmarking.compiled_cost(compiled)
    flops = analytic_flops(config, b, seq, images)
    shapes = {"batch": b, "seq_len": seq, "image_tokens": config.num_image_tokens if images
              else 0, "image_size": config.vision.image_size,
              "vision_layers": config.vision.num_layers, "text_layers": config.text.num_layers,
              "hidden": config.text.hidden_size, "dtype": sz["dtype"],
              "attention_impl": cfg.attention_impl}
    t = benchmarking.time_fn(lambda: compiled(p, j_ids, j_mask, j_pix), warmup=1,
                             iters=sz["iters"], dry_run=dry_run, program=name)
    got = np.asarray(compiled(p, j_ids, j_mask, j_pix), np.float32)
    rows.append({"name": name, "impl": "jax", "step_time_s": t["median_s"],
                 "samples_per_s": b / t["median_s"], "flops": flops,
                 "xla_flops": cost["flops"], "peak_memory_bytes": cost["peak_memory_bytes"],
                 "cudnn_attention_calls": cost["cudnn_attention_calls"],
                 "batch": b, "shapes": shapes, "timing": t})
    _progress(rows[-1])
    t_ids = torch.from_numpy(ids.astype(np.int64)).to(dev)
    t_mask = torch.from_numpy(mask.astype(np.int64)).to(dev)
    t_pix = None if pix is None else torch.from_numpy(
        np.ascontiguousarray(pix.transpose(0, 3, 1, 2))).to(dev, tdtype)

    def torch_embed():
      with torch.no_grad():
        out = tmodel(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pix,
                     output_hidden_states=True)
        return F.normalize(out.hidden_states[-1][:, -1].float(), dim=-1)
    if dev.type == "cuda":
      torch.cuda.reset_peak_memory_stats()
    t = benchmarking.time_fn(torch_embed, warmup=1, iters=sz["iters"], dry_run=dry_run,
                             program=name, impl="torch_eager")
    want = torch_embed().cpu().numpy()
    rows[-1]["max_abs_diff_vs_torch"] = float(np.max(np.abs(got - want)))
    rows.append({"name": name, "impl": "torch", "step_time_s": t["median_s"],
                 "samples_per_s": b / t["median_s"], "flops": flops,
                 "peak_memory_bytes": (torch.cuda.max_memory_allocated() if dev.type == "cuda"
                                       else None),
                 "batch": b, "shapes": shapes, "timing": t,
                 "torch_threads": torch.get_num_threads()})
    _progress(rows[-1])
  return rows


def run_lora_step(device: str = "cpu", quick: bool = False, *, built=None, dry_run=None
                  ) -> list[dict]:
  """One InstructCIR stage-2 LoRA train step (see module docstring), jax vs PyTorch+PEFT."""
  # peft and torch are the optional PyTorch reference (the `torch` extra).
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  sz = _sizes(device, quick)
  model, params, config = built or build(sz)
  cfg = _run_config(config, sz)
  p = jax.device_put(llava.cast_params(params, cfg))
  b = sz["batch"]
  q_ids, q_mask, pix = inputs(config, b, sz["text_len"], True, seed=1)
  c_ids, c_mask, _ = inputs(config, b, sz["text_len"], False, seed=2)
  lcfg = lora.LoraConfig(rank=sz["rank"], alpha=16.0, dropout=0.05)
  adapter = lora.init_lora(params, lcfg, jax.random.PRNGKey(0))
  tx = optax.adamw(2e-5, weight_decay=0.0)
  opt = tx.init(adapter.params)
  labels = jnp.arange(b)

  # Base params and batch are arguments, not closed-over constants: XLA would otherwise
  # constant-fold the frozen vision tower at compile time and time a different program.
  def loss_fn(ap, rng, base, batch):
    a = adapter.replace_params(ap)
    r1, r2 = jax.random.split(rng)
    q = llava.embed(base, cfg, batch["q_ids"], batch["q_mask"], batch["pix"], lora=a, rng=r1,
                    deterministic=False)
    t = llava.embed(base, cfg, batch["c_ids"], batch["c_mask"], None, lora=a, rng=r2,
                    deterministic=False)
    return optax.softmax_cross_entropy_with_integer_labels(q @ t.T / 0.05, labels).mean()

  def step(ap, opt, rng, base, batch):
    loss, g = jax.value_and_grad(loss_fn)(ap, rng, base, batch)
    upd, opt = tx.update(g, opt, ap)
    return optax.apply_updates(ap, upd), opt, loss

  batch = jax.device_put({"q_ids": q_ids, "q_mask": q_mask, "pix": pix, "c_ids": c_ids,
                          "c_mask": c_mask})
  args = (adapter.params, opt, jax.random.PRNGKey(1), p, batch)
  compiled = benchmarking.compile_program("llava_lora_step", jax.jit(step, donate_argnums=(0, 1)),
                                          *args, dry_run=dry_run, attention=True)
  cost = benchmarking.compiled_cost(compiled)
  state = {"ap": adapter.params, "opt": opt, "i": 0}

  def jax_step():
    state["i"] += 1
    state["ap"], state["opt"], loss = compiled(state["ap"], state["opt"],
                                               jax.random.PRNGKey(state["i"]), p, batch)
    return loss
  seq_q, seq_c = q_ids.shape[1], c_ids.shape[1]
  flops = lora_step_flops(config, b, seq_q, seq_c)
  shapes = {"batch": b, "query_seq_len": seq_q, "caption_seq_len": seq_c,
            "text_layers": config.text.num_layers, "vision_layers": config.vision.num_layers,
            "hidden": config.text.hidden_size, "lora_rank": lcfg.rank,
            "lora_params": adapter.num_params(), "dtype": sz["dtype"],
            "attention_impl": cfg.attention_impl}
  t = benchmarking.time_fn(jax_step, warmup=1, iters=sz["iters"], dry_run=dry_run,
                           program="llava_lora_step")
  rows = [{"name": "llava_lora_step", "impl": "jax", "step_time_s": t["median_s"],
           "samples_per_s": b / t["median_s"], "flops": flops, "xla_flops": cost["flops"],
           "peak_memory_bytes": cost["peak_memory_bytes"],
           "cudnn_attention_calls": cost["cudnn_attention_calls"], "batch": b, "shapes": shapes,
           "timing": t}]
  _progress(rows[-1])
  dev = _torch_device(device, dry_run)
  tdtype = torch.bfloat16 if sz["dtype"] == "bfloat16" else torch.float32
  pcfg = peft.LoraConfig(r=lcfg.rank, lora_alpha=16, lora_dropout=0.05,
                         target_modules=lora.DEFAULT_TARGET_MODULES)
  pm = peft.get_peft_model(copy.deepcopy(model).to(dev, tdtype), pcfg)
  pm.train()
  topt = torch.optim.AdamW([x for x in pm.parameters() if x.requires_grad], lr=2e-5,
                           weight_decay=0.0)
  tq = [torch.from_numpy(x.astype(np.int64)).to(dev) for x in (q_ids, q_mask)]
  tc = [torch.from_numpy(x.astype(np.int64)).to(dev) for x in (c_ids, c_mask)]
  tpix = torch.from_numpy(np.ascontiguousarray(pix.transpose(0, 3, 1, 2))).to(dev, tdtype)
  tlabels = torch.arange(b, device=dev)

  def torch_step():
    topt.zero_grad(set_to_none=True)
    q = pm(input_ids=tq[0], attention_mask=tq[1], pixel_values=tpix, output_hidden_states=True)
    c = pm(input_ids=tc[0], attention_mask=tc[1], output_hidden_states=True)
    qe = F.normalize(q.hidden_states[-1][:, -1].float(), dim=-1)
    ce = F.normalize(c.hidden_states[-1][:, -1].float(), dim=-1)
    loss = F.cross_entropy(qe @ ce.T / 0.05, tlabels)
    loss.backward()
    topt.step()
    return loss.detach()
  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t = benchmarking.time_fn(torch_step, warmup=1, iters=sz["iters"], dry_run=dry_run,
                           program="llava_lora_step", impl="torch_peft")
  rows.append({"name": "llava_lora_step", "impl": "torch", "step_time_s": t["median_s"],
               "samples_per_s": b / t["median_s"], "flops": flops,
               "peak_memory_bytes": (torch.cuda.max_memory_allocated() if dev.type == "cuda"
                                     else None),
               "batch": b, "shapes": shapes, "timing": t, "torch_threads": torch.get_num_threads(),
               "note": "PEFT LoRA + torch.optim.AdamW, "
                       + ("SDPA" if sz["dtype"] == "bfloat16" else "eager") + " attention"})
  _progress(rows[-1])
  return rows


def run(device: str = "cpu", quick: bool = False, dry_run=None) -> list[dict]:
  """Benchmark rows (see the module docstring); `dry_run`: a `benchmarking.DryRun`: the
  `device` path run once on the CPU."""
  sz = _sizes(device, quick)
  print(f"bench_llava_embed: building the models ({device}, quick={quick})", file=sys.stderr,
        flush=True)
  built = build(sz)
  rows = _embed_rows(sz, device, *built, dry_run=dry_run)
  rows += run_lora_step(device, quick, built=built, dry_run=dry_run)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--device", default=None, choices=["cpu", "gpu"], help="default cpu")
  p.add_argument("--quick", action="store_true")
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
    jax.config.update("jax_platforms", "cpu")
  rows = run(args.device, args.quick)
  name = f"llava_{args.device}" + ("_quick" if args.quick else "")
  path = benchmarking.write_results(name, rows, args.out, extra={"quick": args.quick})
  print(benchmarking.format_table(rows, ["name", "impl", "batch", "step_time_s", "samples_per_s",
                                         "max_abs_diff_vs_torch"]))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Shared pieces of the InstructCIR config files (configs/instructcir_stage{1,2}.py).

The paper's settings (appendix E/F, table 12): LoRA r 64 / alpha 16 (dropout 0.05) on the
language model, tower and projector frozen; lr 2e-5, cosine with warm-up ratio 0.03, weight
decay 0, one epoch per stage; 4 GPUs x 48 (stage 1) / x 64 (stage 2) = global batches 192 /
256; model max length 512; InfoNCE with cosine / 0.05.
"""

from __future__ import annotations

import os

import ml_collections

# LLaVA-Phi (InstructCIR's base): CLIP ViT-L/14 at 224 px + Phi-3.5-mini.
CLIP_L = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
              num_layers=24, num_heads=16)
PHI35_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32,
                  num_heads=32, num_kv_heads=32, max_position_embeddings=4096, layout="fused",
                  rope_theta=10000.0)
TINY_VISION = dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=2)
TINY_TEXT = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=4, max_position_embeddings=512, layout="fused", rope_theta=10000.0)
GLOBAL_BATCH = {1: 192, 2: 256}


def base(stage: int) -> ml_collections.ConfigDict:
  """The paper's run of `stage` (1 or 2)."""
  c = ml_collections.ConfigDict()
  c.task = "instructcir"
  c.stage = stage
  c.seed = 0
  c.data = dict(source="jsonl", train_file="", image_root="", eval_file="", eval_image_root="",
                on_missing="skip", tokenizer="", transform="clip", max_length=512,
                cache_images=False, root="", train_split="train", eval_split="val",
                synth=dict(seed=0, resolution=64, num_images=(1500, 1000, 500),
                           num_queries=(4000, 1000, 500)))
  c.model = dict(init="", vision=dict(CLIP_L), text=dict(PHI35_MINI), vision_feature_layer=-2)
  c.init_from = ""               # stage 2: the stage-1 workdir (or adapter / merged model dir)
  c.allow_scratch_stage2 = False
  c.lora = dict(rank=64, alpha=16.0, dropout=0.05, target_modules="", use_rslora=False,
                init="kaiming")
  c.loss = dict(temperature=0.05, hard_negatives=True, hard_negative_scope="batch")
  c.fixed_templates = False      # the paper's ablation: always the first template
  c.freeze = ()
  c.train_only = ("lora/.*",)    # tower, projector and base LLM frozen
  c.train = dict(batch_size=GLOBAL_BATCH[stage], epochs=1, lr=2e-5, schedule="warmup_cosine",
                 warmup_ratio=0.03, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                 grad_clip_norm=0.0, accum_steps=1, max_steps=-1)
  c.compute_dtype = "bfloat16"   # the paper trains in fp16; bf16 needs no loss scaling
  c.remat = True
  c.mesh = (("data", -1), ("fsdp", 1))
  c.sharding_rules = ((".*", "fsdp"),)
  c.fsdp_min_size = 2 ** 20
  c.checkpoint = dict(keep=2, every_steps=500, best_metric="", best_mode="max", async_save=True)
  c.evaluate = True              # False: no evaluation at all (throughput runs)
  c.eval_every_epochs = 1
  c.eval_every_steps = 0
  c.eval_max = 2000
  c.eval_batch_size = 64
  c.eval_cir = True
  c.log_every_steps = 10
  c.tensorboard = True
  c.export = True
  c.export_hf = True
  return c


def variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`tiny`: a tiny random LLaVA on a tiny synthetic set (smoke run, seconds);
  `synthetic`: a small LLaVA on the default synthetic set (learning visible on a CPU);
  `real_width`: random weights at CLIP-L + Phi-3.5-mini widths, 2 layers each (throughput)."""
  if arg in (None, ""):
    return c
  data_home = os.environ.get("CIRJAX_DATA", "~/.cache/cirjax")
  if arg in ("tiny", "synthetic"):
    c.data.source = "synthetic"
    c.data.cache_images = True
    c.model.vision = dict(TINY_VISION)
    c.model.text = dict(TINY_TEXT)
    c.lora.rank = 8
    c.compute_dtype = "float32"
    c.remat = False
    c.checkpoint.every_steps = 0
    c.log_every_steps = 1
    c.eval_batch_size = 32
    c.export_hf = True
    c.fsdp_min_size = 2 ** 14
  if arg == "tiny":
    c.data.root = os.path.join(data_home, "synthetic_tiny")
    c.data.synth = dict(seed=0, resolution=32, num_images=(60, 60, 20), num_queries=(64, 32, 16))
    c.train.batch_size = 16
    c.train.lr = 1e-3
    c.train.max_steps = -1       # 60 pairs / 64 triplets: 3-4 steps
    c.eval_max = 32
    c.tensorboard = False
    return c
  if arg == "synthetic":
    c.data.root = os.path.join(data_home, "synthetic_ic")
    c.data.synth = dict(seed=0, resolution=32, num_images=(1500, 300, 100),
                        num_queries=(4000, 200, 100))
    c.model.text = dict(TINY_TEXT, hidden_size=128, intermediate_size=256)
    c.train.batch_size = 64
    c.train.lr = 1e-3
    # Stage 2 needs more passes than the paper's one: this LLM is random and frozen, so the
    # instruction phrasings (absent from stage 1's captions) are read through LoRA alone.
    c.train.epochs = 2 if c.stage == 1 else 3
    c.eval_max = 200
    c.eval_every_steps = 20
    return c
  if arg == "real_width":
    c.model.init = ""
    c.model.vision = dict(CLIP_L, num_layers=2)
    c.model.text = dict(PHI35_MINI, num_layers=2)
    c.data.source = "synthetic"
    c.data.root = os.path.join(data_home, "synthetic_tiny")
    c.data.synth = dict(seed=0, resolution=32, num_images=(60, 60, 20), num_queries=(64, 32, 16))
    c.data.cache_images = True
    c.train.batch_size = 8
    c.train.max_steps = 4
    c.allow_scratch_stage2 = True
    c.export = False
    c.evaluate = False
    c.tensorboard = False
    c.log_every_steps = 1
    return c
  raise KeyError(f"unknown variant {arg!r} (tiny, synthetic, real_width)")

"""Shared pieces of the QuRe config files (configs/qure_blip2_*.py, configs/synthetic.py).

A config file stays a short, readable `get_config(arg)`; the long but identical settings
(the model widths of LAVIS `pretrain_vitL`, the reference optimizer, the variants) live here.
"""

from __future__ import annotations

import ml_collections

# LAVIS BLIP-2 `pretrain_vitL`: CLIP ViT-L/14 at 224 px (23 of 24 blocks kept) + BERT-base
# Q-Former with 32 queries, cross-attention every 2nd layer, 256-d projections.
CLIP_L_VISION = dict(variant="clip", image_size=224, patch_size=14, hidden_size=1024,
                     intermediate_size=4096, num_layers=23, num_heads=16)
BERT_QFORMER = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                    cross_attention_frequency=2, vocab_size=30523, max_position_embeddings=512)

TINY_VISION = dict(variant="clip", image_size=32, patch_size=16, hidden_size=32,
                   intermediate_size=64, num_layers=1, num_heads=2)
TINY_QFORMER = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                    cross_attention_frequency=1, vocab_size=0, max_position_embeddings=64)


def base(dataset: str, *, epochs: int, lr: float) -> ml_collections.ConfigDict:
  """The reference QuRe run on `dataset` ('cirr' or 'fashioniq')."""
  c = ml_collections.ConfigDict()
  c.task = "qure"
  c.seed = 1000
  c.data = dict(dataset=dataset, root="", train_split="train", eval_split="val",
                categories=("dress", "shirt", "toptee"), transform="targetpad",
                max_text_length=32, tokenizer="", cache_images=False)
  c.model = dict(init="", num_query_tokens=32, embed_dim=256, vision=dict(CLIP_L_VISION),
                 qformer=dict(BERT_QFORMER))
  # Trained (reference): ln_vision, Q-Former, query tokens, projections, temp. Frozen: the
  # ViT, and the ITM head the loss never uses.
  c.freeze = ("vision/.*", "itm_head/.*")
  c.train_only = ()
  c.qure = dict(n_def=6, strategy="qure", consecutive_threshold=1, strict_below=False,
                sampling="walk", cache_features=True, feature_dtype="bfloat16",
                loss="pairwise", encode_batch_size=128, k=100)
  c.train = dict(batch_size=32, epochs=epochs, lr=lr, schedule="cosine_per_epoch",
                 final_lr_ratio=0.01, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                 grad_clip_norm=0.0, accum_steps=1, max_steps=-1)
  c.compute_dtype = "bfloat16"  # reference: fp16 autocast; bf16 needs no loss scaling
  c.remat = False
  c.mesh = (("data", -1), ("fsdp", 1))
  c.sharding_rules = ((".*", "fsdp"),)
  c.fsdp_min_size = 2 ** 20
  best = "avg" if dataset in ("cirr", "fashioniq") else "R@10"
  c.checkpoint = dict(keep=2, every_steps=1000, best_metric=best, best_mode="max",
                      async_save=True)
  c.eval_every_epochs = 1
  c.eval_max_queries = 0
  c.eval_metrics = None
  c.log_every_steps = 20
  c.tensorboard = True
  c.export = True
  return c


def variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies `tiny` (smoke run) or `real_width` (random weights, real widths, few layers)."""
  if arg in (None, ""):
    return c
  if arg == "tiny":
    c.model.init = ""
    c.model.vision = dict(TINY_VISION)
    c.model.qformer = dict(TINY_QFORMER)
    c.model.num_query_tokens = 4
    c.model.embed_dim = 16
    c.data.max_text_length = 16
    c.qure.feature_dtype = "float32"
    c.compute_dtype = "float32"
    c.train.batch_size = 8
    c.train.epochs = 2
    c.train.max_steps = 6
    c.train.lr = 1e-4
    c.qure.n_def = 2
    c.checkpoint.every_steps = 0
    c.log_every_steps = 1
    c.tensorboard = False
    return c
  if arg == "real_width":
    c.model.init = ""
    c.model.vision = dict(CLIP_L_VISION, num_layers=2)
    c.model.qformer = dict(BERT_QFORMER, num_layers=2)
    return c
  raise KeyError(f"unknown variant {arg!r} (tiny, real_width)")

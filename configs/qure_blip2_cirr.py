# COMMAND: cirjax train --config configs/qure_blip2_cirr.py --workdir runs/qure_cirr --config.data.root=/data/CIRR --config.model.init=/ckpt/blip2_pretrained_vitL.pth --config.data.tokenizer=google-bert/bert-base-uncased
r"""QuRe on CIRR with BLIP-2 (CLIP ViT-L, frozen) — the paper's / reference code's settings.

AdamW (weight decay 0.05), batch 32, lr 1e-5 with the per-epoch cosine to lr/100, 50 epochs,
n_def = 6 (re-mining every 8 epochs after the warm-up), one negative per query per epoch,
seed 1000 (docs/reference_semantics.md#qure-training). The frozen ViT's features are cached once
(bf16: ~9 GB of host memory for CIRR's ~17k training images at 224 px).

`model.init`: a BLIP-2 checkpoint to start from (LAVIS `pretrain_vitL` model.pth, an HF
Blip2ForImageTextRetrieval directory or hub id such as Salesforce/blip2-itm-vit-g, or a cirjax
model dir; docs/weights.md says where each lives). Required: an empty one is refused;
`--config.model.init=random` trains from random weights on purpose. `data.tokenizer`: a
directory, vocab.txt or hub id of bert-base-uncased ([DEC] is added); empty: the tokenizer
beside `model.init` (an HF directory's, a LAVIS file's directory's), if it has one.

Arguments (`configs/qure_blip2_cirr.py:tiny,batch_size=8`):
  tiny          a random tiny BLIP-2 for a few steps (give --config.data.root and
                --config.data.tokenizer; any CIRR-layout data, e.g. `cirjax data synth`)
  real_width    no checkpoint: random weights at the real widths with few layers (throughput)
  batch_size=N  global batch;  epochs=N  epochs
"""

import ml_collections

from cirjax.train import config_utils
from cirjax.train.widths import BERT_QFORMER, CLIP_L_VISION, TINY_CLIP_VISION, TINY_QFORMER


# BERT's dropout in training steps (docs/blip2.md#dropout). None: the checkpoint's rates
# (an HF config.json's; a LAVIS model.pth's are bert-base-uncased's 0.1, as QuRe trains), or
# 0.1 for a random model; a number overrides them.
QFORMER_DROPOUT = dict(hidden_dropout_prob=None, attention_probs_dropout_prob=None)


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, tiny=False, real_width=False, batch_size=0, epochs=0)
  c = ml_collections.ConfigDict()
  c.task = "qure"
  c.seed = 1000
  c.data = dict(dataset="cirr", root="", train_split="train", eval_split="val",
                categories=("dress", "shirt", "toptee"), transform="targetpad",
                max_text_length=32, tokenizer="", cache_images=False, cache_images_max_bytes=1 << 30,
                pixel_store="auto", pixel_store_dir="",  # docs/train.md, "Memory at scale"
                workers=-1,  # batch-building threads: -1 the machine's cores (<= 8), 0 none
                # 'prefetch' (the dataset root's files) or 'grain' (the ArrayRecords of a
                # `cirjax data tfds` build in tfds_dir, grain_workers worker processes).
                pipeline="prefetch", tfds_dir="", grain_workers=2)  # docs/data.md#grain
  # require_init: an empty init is refused (`--config.model.init=random` to mean it).
  c.model = dict(init="", require_init=True, num_query_tokens=32, embed_dim=256,
                 vision=dict(CLIP_L_VISION), qformer=dict(BERT_QFORMER, **QFORMER_DROPOUT))
  # Trained (reference): ln_vision, Q-Former, query tokens, projections, temp. Frozen: the
  # ViT, and the ITM head the loss never uses.
  c.freeze = ("vision/.*", "itm_head/.*")
  c.train_only = ()
  c.qure = dict(n_def=6, strategy="qure", consecutive_threshold=1, strict_below=False,
                sampling="walk", cache_features=True, feature_dtype="float16",
                loss="pairwise", encode_batch_size=128, k=100, mining_method="auto",
                feature_store_dir="", feature_store_verify=True)
  c.train = dict(batch_size=32, epochs=50, lr=1e-5, schedule="cosine_per_epoch",
                 final_lr_ratio=0.01, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                 grad_clip_norm=0.0, accum_steps=1, max_steps=-1)
  c.compute_dtype = "bfloat16"  # reference: fp16 autocast; bf16 needs no loss scaling
  c.remat = False
  # What a rematerialised layer keeps: full | dots_saveable | dots_with_no_batch_dims_saveable
  # (cirjax/models/remat.py; docs/train.md).
  c.remat_policy = "full"
  # cuDNN's fused attention on GPU in bf16/fp16, XLA's otherwise (docs/architecture.md).
  c.attention_impl = "auto"
  # One compiled layer body instead of an unrolled stack: shorter compiles at full depth.
  c.scan_layers = False
  c.mesh = (("data", -1), ("fsdp", 1))
  c.sharding_rules = ((".*", "fsdp"),)
  c.fsdp_min_size = 2 ** 20
  c.checkpoint = dict(keep=2, every_steps=1000, best_metric="avg", best_mode="max",
                      async_save=True)
  c.eval_every_epochs = 1
  c.eval_max_queries = 0
  c.eval_metrics = None
  c.log_every_steps = 20
  c.tensorboard = True
  # Off a terminal (a SLURM log), one plain progress line every this many seconds.
  c.progress_every_s = 30.0
  # "FIRST,LAST": a jax.profiler trace of those steps in WORKDIR/profile ("" none).
  c.profile_steps = ""
  # Weights & Biases, on when project is set (pip install 'cirjax[wandb]'; docs/train.md).
  c.wandb = dict(project="", entity="", name="", mode="offline")
  c.export = True

  if arg.tiny:
    c.model.init = ""
    c.model.require_init = False
    c.model.vision = dict(TINY_CLIP_VISION)
    c.model.qformer = dict(TINY_QFORMER, **QFORMER_DROPOUT)
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
  if arg.real_width:
    c.model.init = ""
    c.model.require_init = False
    c.model.vision = dict(CLIP_L_VISION, num_layers=2)
    c.model.qformer = dict(BERT_QFORMER, num_layers=2, **QFORMER_DROPOUT)
  c.train.batch_size = arg.batch_size or c.train.batch_size
  c.train.epochs = arg.epochs or c.train.epochs
  return c

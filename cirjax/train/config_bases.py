"""The shared bodies of the config files that come in pairs: the two InstructCIR stages
(configs/instructcir_stage1.py, stage2.py) and QuRe on BLIP-2 for CIRR and FashionIQ
(configs/qure_blip2_cirr.py, qure_blip2_fashioniq.py). Each file still is a self-contained
`get_config(arg)` loaded by path; it names what sets it apart (stage, batch, epochs, learning
rate, dataset) and calls its base here. A new experiment is still a new config file.
"""

import os

import ml_collections

from cirjax.train import config_utils
from cirjax.train.widths import (BERT_QFORMER, CLIP_L, CLIP_L_VISION, PHI35_MINI,
                                 TINY_CLIP_VISION, TINY_LLAVA_TEXT, TINY_LLAVA_VISION,
                                 TINY_QFORMER)

# BERT's dropout in training steps (docs/blip2.md#dropout). None: the checkpoint's rates
# (an HF config.json's; a LAVIS model.pth's are bert-base-uncased's 0.1, as QuRe trains), or
# 0.1 for a random model; a number overrides them.
QFORMER_DROPOUT = dict(hidden_dropout_prob=None, attention_probs_dropout_prob=None)


def instructcir(arg, *, stage: int, global_batch: int, synthetic_epochs: int
                ) -> ml_collections.ConfigDict:
  """An InstructCIR stage's config (configs/instructcir_stage{1,2}.py): the paper's settings
  with that stage's global batch and the epochs of its `synthetic` variant. Stage 1 carries
  `model.require_init` (an empty `model.init` refused on real data); stage 2 starts from
  `init_from` instead."""
  arg = config_utils.parse_arg(arg, tiny=False, synthetic=False, real_width=False,
                               batch_size=0, epochs=0)
  c = ml_collections.ConfigDict()
  c.task = "instructcir"
  c.stage = stage
  c.seed = 0
  c.data = dict(source="jsonl", train_file="", image_root="", eval_file="", eval_image_root="",
                on_missing="skip", tokenizer="", transform="clip", max_length=512,
                cache_images=False, cache_images_max_bytes=1 << 30, root="",
                pixel_store="auto", pixel_store_dir="",  # docs/train.md, "Memory at scale"
                train_split="train", eval_split="val",
                synth=dict(seed=0, resolution=64, num_images=(1500, 1000, 500),
                           num_queries=(4000, 1000, 500)),
                workers=-1)  # batch-building threads: -1 the machine's cores (<= 8), 0 none
  c.model = dict(init="", vision=dict(CLIP_L), text=dict(PHI35_MINI), vision_feature_layer=-2)
  if stage == 1:
    # require_init: on real data an empty init is refused (`--config.model.init=random`).
    c.model.require_init = True
  c.init_from = ""               # stage 2: the stage-1 workdir (or adapter / merged model dir)
  c.allow_scratch_stage2 = False
  c.lora = dict(rank=64, alpha=16.0, dropout=0.05, target_modules="", use_rslora=False,
                init="kaiming")
  c.loss = dict(temperature=0.05, hard_negatives=True, hard_negative_scope="batch")
  c.fixed_templates = False      # the paper's ablation: always the first template
  c.freeze = ()
  c.train_only = ("lora/.*",)    # tower, projector and base LLM frozen
  c.train = dict(batch_size=global_batch, epochs=1, lr=2e-5, schedule="warmup_cosine",
                 warmup_ratio=0.03, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                 grad_clip_norm=0.0, accum_steps=1, max_steps=-1)
  c.compute_dtype = "bfloat16"   # the paper trains in fp16; bf16 needs no loss scaling
  c.remat = True
  _run_options(c)
  c.checkpoint = dict(keep=2, every_steps=500, best_metric="", best_mode="max", async_save=True)
  c.evaluate = True              # False: no evaluation at all (throughput runs)
  c.eval_every_epochs = 1
  c.eval_every_steps = 0
  c.eval_max = 2000
  c.eval_batch_size = 64
  c.eval_cir = True
  c.log_every_steps = 10
  _logging_and_export(c)
  c.export_hf = True

  _instructcir_variant(c, arg, stage, synthetic_epochs)
  c.train.batch_size = arg.batch_size or c.train.batch_size
  c.train.epochs = arg.epochs or c.train.epochs
  return c



def _instructcir_variant(c, arg, stage: int, synthetic_epochs: int) -> None:
  """The `tiny`, `synthetic` and `real_width` variants of an InstructCIR stage, in place."""
  data_home = os.environ.get("CIRJAX_DATA", "~/.cache/cirjax")
  if arg.tiny or arg.synthetic:  # a tiny random LLaVA on synthetic data
    c.data.source = "synthetic"
    if stage == 1:
      c.model.require_init = False
    c.data.cache_images = True
    c.model.vision = dict(TINY_LLAVA_VISION)
    c.model.text = dict(TINY_LLAVA_TEXT)
    c.lora.rank = 8
    c.compute_dtype = "float32"
    c.remat = False
    c.checkpoint.every_steps = 0
    c.log_every_steps = 1
    c.eval_batch_size = 32
    c.fsdp_min_size = 2 ** 14
    c.train.lr = 1e-3
  if arg.tiny:
    c.data.root = os.path.join(data_home, "synthetic_tiny")
    c.data.synth = dict(seed=0, resolution=32, num_images=(60, 60, 20), num_queries=(64, 32, 16))
    c.train.batch_size = 16      # 60 pairs / 64 triplets: 3-4 steps
    c.eval_max = 32
    c.tensorboard = False
  if arg.synthetic:
    c.data.root = os.path.join(data_home, "synthetic_ic")
    c.data.synth = dict(seed=0, resolution=32, num_images=(1500, 300, 100),
                        num_queries=(4000, 200, 100))
    c.model.text = dict(TINY_LLAVA_TEXT, hidden_size=128, intermediate_size=256)
    c.train.batch_size = 64
    c.train.epochs = synthetic_epochs
    c.eval_max = 200
    c.eval_every_steps = 20
  if arg.real_width:
    c.model.init = ""
    if stage == 1:
      c.model.require_init = False
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


def qure_blip2(arg, *, dataset: str, epochs: int, lr: float) -> ml_collections.ConfigDict:
  """QuRe on a dataset with BLIP-2 (configs/qure_blip2_{cirr,fashioniq}.py): the paper's /
  reference code's settings, with the dataset's epochs and learning rate."""
  arg = config_utils.parse_arg(arg, tiny=False, real_width=False, batch_size=0, epochs=0)
  c = ml_collections.ConfigDict()
  c.task = "qure"
  c.seed = 1000
  c.data = dict(dataset=dataset, root="", train_split="train", eval_split="val",
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
  c.train = dict(batch_size=32, epochs=epochs, lr=lr, schedule="cosine_per_epoch",
                 final_lr_ratio=0.01, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                 grad_clip_norm=0.0, accum_steps=1, max_steps=-1)
  c.compute_dtype = "bfloat16"  # reference: fp16 autocast; bf16 needs no loss scaling
  c.remat = False
  _run_options(c)
  c.checkpoint = dict(keep=2, every_steps=1000, best_metric="avg", best_mode="max",
                      async_save=True)
  c.eval_every_epochs = 1
  c.eval_max_queries = 0
  c.eval_metrics = None
  c.log_every_steps = 20
  _logging_and_export(c)

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


def _run_options(c) -> None:
  """How a run executes, the same for both methods (a config file may override any)."""
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


def _logging_and_export(c) -> None:
  """Progress, profiling, W&B and the end-of-run export, the same for both methods."""
  c.tensorboard = True
  # Off a terminal (a SLURM log), one plain progress line every this many seconds.
  c.progress_every_s = 30.0
  # "FIRST,LAST": a jax.profiler trace of those steps in WORKDIR/profile ("" none).
  c.profile_steps = ""
  # Weights & Biases, on when project is set (pip install 'cirjax[wandb]'; docs/train.md).
  c.wandb = dict(project="", entity="", name="", mode="offline")
  c.export = True

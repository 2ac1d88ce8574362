# COMMAND: cirjax train --config configs/instructcir_stage2.py --workdir runs/ic_stage2 --config.init_from=runs/ic_stage1 --config.data.train_file=/data/cc3m_instruct/triplets_300k.jsonl --config.data.image_root=/data/cc3m/images
r"""InstructCIR stage 2: CC3M-Instruct triplets, the original caption as the hard negative.

Query = reference image + instruction under an image template drawn from the paper's table 9
(first set); target = the modified caption under a caption template drawn from the second
set; the original caption under the same caption template is an extra InfoNCE column
(`loss.hard_negatives`, `loss.hard_negative_scope`: `batch` = every hard negative of the
global batch, `own` = the row's own). Templates are reproducible from (seed, epoch, step).
`fixed_templates=True` is the paper's fixed-prompt ablation.

Starts from stage 1 (`init_from`): its workdir (the latest checkpoint's base and adapter,
its tokenizer and model config), a PEFT adapter directory on `model.init`, or a merged LLaVA
directory (a fresh adapter). Paper settings as stage 1 but global batch 256 (4 GPUs x 64).
`data.train_file`: JSON lines of {"image", "instruction", "modified_caption",
"original_caption"}; `data.eval_file`: held-out triplets for query -> modified caption
Recall@K (the original captions are in the corpus as distractors).

Arguments: tiny, synthetic, real_width, batch_size=N, epochs=N as in
configs/instructcir_stage1.py (tiny/synthetic: give --config.init_from=<the stage-1 workdir
of the same variant>; synthetic runs 3 epochs: this LLM is random and frozen, so the
instruction phrasings, absent from stage 1's captions, are read through LoRA alone).
"""

import os

import ml_collections

from cirjax.train import config_utils
from cirjax.train.widths import CLIP_L, PHI35_MINI, TINY_LLAVA_TEXT, TINY_LLAVA_VISION

STAGE = 2
GLOBAL_BATCH = 256     # the paper's 4 GPUs x 64
SYNTHETIC_EPOCHS = 3


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, tiny=False, synthetic=False, real_width=False,
                               batch_size=0, epochs=0)
  data_home = os.environ.get("CIRJAX_DATA", "~/.cache/cirjax")
  c = ml_collections.ConfigDict()
  c.task = "instructcir"
  c.stage = STAGE
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
  c.init_from = ""               # stage 2: the stage-1 workdir (or adapter / merged model dir)
  c.allow_scratch_stage2 = False
  c.lora = dict(rank=64, alpha=16.0, dropout=0.05, target_modules="", use_rslora=False,
                init="kaiming")
  c.loss = dict(temperature=0.05, hard_negatives=True, hard_negative_scope="batch")
  c.fixed_templates = False      # the paper's ablation: always the first template
  c.freeze = ()
  c.train_only = ("lora/.*",)    # tower, projector and base LLM frozen
  c.train = dict(batch_size=GLOBAL_BATCH, epochs=1, lr=2e-5, schedule="warmup_cosine",
                 warmup_ratio=0.03, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                 grad_clip_norm=0.0, accum_steps=1, max_steps=-1)
  c.compute_dtype = "bfloat16"   # the paper trains in fp16; bf16 needs no loss scaling
  c.remat = True
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
  c.checkpoint = dict(keep=2, every_steps=500, best_metric="", best_mode="max", async_save=True)
  c.evaluate = True              # False: no evaluation at all (throughput runs)
  c.eval_every_epochs = 1
  c.eval_every_steps = 0
  c.eval_max = 2000
  c.eval_batch_size = 64
  c.eval_cir = True
  c.log_every_steps = 10
  c.tensorboard = True
  # Off a terminal (a SLURM log), one plain progress line every this many seconds.
  c.progress_every_s = 30.0
  # "FIRST,LAST": a jax.profiler trace of those steps in WORKDIR/profile ("" none).
  c.profile_steps = ""
  # Weights & Biases, on when project is set (pip install 'cirjax[wandb]'; docs/train.md).
  c.wandb = dict(project="", entity="", name="", mode="offline")
  c.export = True
  c.export_hf = True

  if arg.tiny or arg.synthetic:  # a tiny random LLaVA on synthetic data
    c.data.source = "synthetic"
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
    c.train.epochs = SYNTHETIC_EPOCHS
    c.eval_max = 200
    c.eval_every_steps = 20
  if arg.real_width:
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
  c.train.batch_size = arg.batch_size or c.train.batch_size
  c.train.epochs = arg.epochs or c.train.epochs
  return c

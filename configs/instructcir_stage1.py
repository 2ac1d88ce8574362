# COMMAND: cirjax train --config configs/instructcir_stage1.py --workdir runs/ic_stage1 --config.model.init=xtuner/llava-phi-3-mini-hf --config.data.train_file=/data/llava_pretrain/pairs.jsonl --config.data.image_root=/data/llava_pretrain/images
r"""InstructCIR stage 1: image-caption InfoNCE with the one-word summarisation prompts.

The paper's settings (appendix E, table 12): LoRA r 64 / alpha 16 / dropout 0.05 on every
projection of the language model (CLIP tower and projector frozen), AdamW lr 2e-5 with a
linear warm-up over 3 % of the steps then cosine to 0, weight decay 0, one epoch, global batch
192 (4 GPUs x 48), prompts of at most 512 tokens, InfoNCE on cosine / 0.05 over the global
batch. Compute in bf16 (the paper: fp16) with fp32 parameters, losses and norms; remat on.

`model.init`: the LLaVA-Phi to adapt (an HF LLaVA directory or hub id, e.g.
xtuner/llava-phi-3-mini-hf or InstructCIR's LLaVA-Phi-3.5, or a cirjax LLaVA dir; see
docs/weights.md); its tokenizer is used. Required on real data (`data.source=jsonl`): an empty
one is refused; `--config.model.init=random` trains from random weights on purpose.
`data.train_file`: JSON lines of {"image", "caption"} (or LLaVA-Pretrain's "conversations"),
images under `data.image_root`; `data.eval_file`: held-out pairs for image -> caption
Recall@K. The result (`<workdir>/checkpoints`, `adapter`, `model`, `model_hf`) is what
configs/instructcir_stage2.py starts from (`--config.init_from=<this workdir>`).

Arguments (`configs/instructcir_stage1.py:tiny`, `...:synthetic,epochs=3`):
  tiny          tiny random LLaVA on a tiny synthetic set (generated on first use), 4 steps
  synthetic     a small random LLaVA on a synthetic set, 2 epochs: learning shows in minutes
  real_width    random weights at CLIP-L + Phi-3.5-mini widths, 2 layers each, batch 8, 4 steps
                (throughput on the machine at hand)
  batch_size=N  global batch;  epochs=N  epochs
"""

import os

import ml_collections

from cirjax.train import config_utils
from cirjax.train.widths import CLIP_L, PHI35_MINI, TINY_LLAVA_TEXT, TINY_LLAVA_VISION

STAGE = 1
GLOBAL_BATCH = 192     # the paper's 4 GPUs x 48
SYNTHETIC_EPOCHS = 2


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
  # require_init: on real data an empty init is refused (`--config.model.init=random`).
  c.model = dict(init="", require_init=True, vision=dict(CLIP_L), text=dict(PHI35_MINI),
                 vision_feature_layer=-2)
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
    c.train.epochs = SYNTHETIC_EPOCHS
    c.eval_max = 200
    c.eval_every_steps = 20
  if arg.real_width:
    c.model.init = ""
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
  c.train.batch_size = arg.batch_size or c.train.batch_size
  c.train.epochs = arg.epochs or c.train.epochs
  return c

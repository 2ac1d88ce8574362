# COMMAND: cirjax study --config configs/study_qure_synthetic.py --workdir runs/study --out benchmarks/results/study_qure_synthetic
r"""QuRe's central claim on the synthetic set, where every false negative is known.

One shared warm-up, then five arms trained from it with the same budget (epochs, batch,
learning rate), each with several seeds (`cirjax study` runs them all, docs/study.md):

  warmup           InfoNCE over the batch's positives and one random negative per query,
                   no mining: the contrastive stage that stands in for BLIP-2's pretraining
                   (QuRe fine-tunes a pretrained model; from scratch the pairwise loss finds
                   a shortcut, see configs/synthetic.py)
  infonce_inbatch  (a) InfoNCE with in-batch negatives only
  pairwise_topk    (b) QuRe's pairwise loss, negatives from the top-k (k = 100)
  pairwise_corpus  (c) pairwise, negatives drawn from the whole corpus (never mined)
  pairwise_qure    (d) pairwise with QuRe's hard-negative sets (the paper's recipe)
  infonce_qure     (e) InfoNCE plus QuRe-mined negatives (the main job's loss)

Every arm follows QuRe's reference schedule: epoch 0 draws random negatives, then the
training corpus is re-mined every `epochs // n_def` epochs (here epochs 1 and 2). The arms
start from `model.init`, the warm-up's exported model, which `cirjax study` fills in; to run
one arm alone:

  cirjax train --config configs/study_qure_synthetic.py:arm=warmup --workdir W/warmup
  cirjax train --config configs/study_qure_synthetic.py:pairwise_qure --workdir W/a \
      --config.model.init=W/warmup/model

Arguments: an arm name (or `arm=NAME`; default `warmup`), `quick` (tiny data and model, a
plumbing check of seconds per run, not an outcome), `seeds=N` (seeds per arm, default 3).
"""

import os

import ml_collections

from cirjax.train import config_utils

ARMS = ("infonce_inbatch", "pairwise_topk", "pairwise_corpus", "pairwise_qure", "infonce_qure")
# arm -> (loss, mining strategy or None for never mined)
_ARM = {"warmup": ("infonce", None),
        "infonce_inbatch": ("infonce_inbatch", None),
        "pairwise_topk": ("pairwise", "topk"),
        "pairwise_corpus": ("pairwise", None),
        "pairwise_qure": ("pairwise", "qure"),
        "infonce_qure": ("infonce", "qure")}


def _parse(arg):
  items = [x.strip() for x in (arg or "").split(",") if x.strip()]
  items = [f"arm={x}" if x in _ARM else x for x in items]
  a = config_utils.parse_arg(",".join(items), arm="warmup", quick=False, seeds=3)
  if a.arm not in _ARM:
    raise config_utils.ConfigError(f"arm={a.arm!r}: use one of warmup, {', '.join(ARMS)}")
  return a


def get_config(arg=None):
  a = _parse(arg)
  loss, strategy = _ARM[a.arm]
  data_home = os.environ.get("CIRJAX_DATA", "~/.cache/cirjax")
  c = ml_collections.ConfigDict()
  c.task = "qure"
  c.seed = 0
  c.data = dict(
      dataset="synthetic", root=os.path.join(data_home, "synthetic_study_q8k"),
      train_split="train", eval_split="val", transform="targetpad", max_text_length=16,
      tokenizer="", cache_images=True, cache_images_max_bytes=1 << 30, workers=-1,
      pixel_store="auto", pixel_store_dir="",  # docs/train.md, "Memory at scale"
      synth=dict(seed=0, resolution=64, num_images=(1500, 1000, 500),
                 num_queries=(8000, 1000, 500)))
  c.model = dict(
      init="",  # the arms: the warm-up's exported model (`cirjax study` sets it)
      num_query_tokens=8, embed_dim=64,
      vision=dict(variant="eva", image_size=64, patch_size=8, hidden_size=128,
                  intermediate_size=256, num_layers=2, num_heads=4),
      qformer=dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                   cross_attention_frequency=1, vocab_size=0, max_position_embeddings=64))
  c.freeze = ("vision/.*", "itm_head/.*")
  c.train_only = ()
  c.qure = dict(n_def=3 if strategy else 0, strategy=strategy or "qure",
                consecutive_threshold=1, strict_below=False, sampling="walk",
                cache_features=True, feature_dtype="float32", loss=loss,
                encode_batch_size=250, k=100, mining_method="auto", feature_store_dir="",
                feature_store_verify=True)
  c.train = dict(batch_size=64, epochs=3, lr=5e-4, schedule="cosine_per_epoch",
                 final_lr_ratio=0.01, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
                 grad_clip_norm=0.0, accum_steps=1, max_steps=-1)
  if a.arm == "warmup":
    c.train.update(epochs=4, lr=1e-3)
  c.compute_dtype = "float32"
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
  c.fsdp_min_size = 2 ** 14
  c.checkpoint = dict(keep=1, every_steps=0, best_metric="", best_mode="max",
                      async_save=True)
  c.eval_every_epochs = 0   # the trainer's final evaluation only; `cirjax study` scores
  c.eval_max_queries = 0
  c.eval_metrics = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1", "mAP@5", "mAP@10", "mAP@25",
                    "rel@5")
  c.log_every_steps = 25
  c.tensorboard = False
  # Off a terminal (a SLURM log), one plain progress line every this many seconds.
  c.progress_every_s = 30.0
  # "FIRST,LAST": a jax.profiler trace of those steps in WORKDIR/profile ("" none).
  c.profile_steps = ""
  # Weights & Biases, on when project is set (pip install 'cirjax[wandb]'; docs/train.md).
  c.wandb = dict(project="", entity="", name="", mode="offline")
  c.export = True
  c.study = dict(arm=a.arm, arms=ARMS, seeds=tuple(range(int(a.seeds))),
                 preference_seed=0)

  if a.quick:
    c.data.root = os.path.join(data_home, "synthetic_tiny")
    c.data.synth = dict(seed=0, resolution=32, num_images=(60, 60, 20),
                        num_queries=(64, 32, 16))
    c.model.vision = dict(variant="eva", image_size=32, patch_size=16, hidden_size=32,
                          intermediate_size=64, num_layers=1, num_heads=2)
    c.model.qformer = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           cross_attention_frequency=1, vocab_size=0, max_position_embeddings=64)
    c.model.num_query_tokens = 4
    c.model.embed_dim = 16
    c.train.batch_size = 16
    c.train.epochs = 2 if a.arm != "warmup" else 1
    c.qure.n_def = 2 if strategy else 0
    c.qure.k = 20
    c.log_every_steps = 1
  return c

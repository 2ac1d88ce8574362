# COMMAND: cirjax study --config configs/study_qure_synthetic.py --workdir runs/study
r"""QuRe's claims on the synthetic set, where every false negative is known (docs/study.md).

The protocol, fixed before any test1 number was seen:

  start point   `warmup`: InfoNCE over the batch's positives and one random negative per
                query, never mined, trained until the validation mAP@10 stops improving
                (`study.plateau`); `study.warmups` independent warm-ups (seeds 0..W-1)
                stand in for BLIP-2's pretraining
  arms          infonce_inbatch      InfoNCE, in-batch negatives only
                pairwise_topk        QuRe's pairwise loss, negatives from the top-k
                pairwise_topk_oracle pairwise, top-k minus every true false negative
                pairwise_corpus      pairwise, a random corpus image (never mined)
                pairwise_qure        pairwise, QuRe's hard-negative sets (the paper's recipe)
                infonce_qure         InfoNCE plus QuRe-mined negatives (configs/synthetic.py:infonce)
  budget        every arm the same: 12 epochs, batch 64, QuRe's schedule with n_def = 6
                (random negatives in epochs 0-1, re-mined every 2 epochs), AdamW with a 5 %
                linear lr warm-up then a cosine to lr/100 over the whole run; the warm
                start's temperature reset to QuRe's 0.07; validation every epoch
  tuning        each arm's lr from `study.lrs` (widened while the best is at an edge),
                chosen on validation mAP@10 with warm-up 0, seed 0
  final         every arm at its lr, once per (warm-up, seed): `study.warmups` x
                `study.seeds` paired replicates; reported on test1
  density       three synthetic sets differing only in images per attribute combination
                (`DENSITIES`), so top-k's false-negative share is about 2, 10 and 30 %

Arguments (after the colon, comma-separated): an arm name (or `arm=NAME`, default
`warmup`), `density=low|mid|high` (default low), `quick` (tiny data and model, 2 warm-ups x
1 seed, lrs 1e-4/1e-3, scored on val: plumbing, not an outcome), `spotcheck` (the previous study's data and model size, today's size:
pairwise_qure against pairwise_topk at one density), `warmups=N`, `seeds=N` (per warm-up),
`lrs=1e-5/3e-5` (the tuning grid, `/`-separated).

One run alone (what `cirjax study` runs for each cell):

  cirjax train --config configs/study_qure_synthetic.py:arm=warmup --workdir W/warmup0
  cirjax train --config configs/study_qure_synthetic.py:pairwise_qure --workdir W/a \
      --config.model.init=W/warmup0/model --config.train.lr=3e-5
"""

import os

import ml_collections

from cirjax.train import config_utils

ARMS = ("infonce_inbatch", "pairwise_topk", "pairwise_topk_oracle", "pairwise_corpus",
        "pairwise_qure", "infonce_qure")
# arm -> (loss, mining strategy or None for never mined)
_ARM = {"warmup": ("infonce", None),
        "infonce_inbatch": ("infonce_inbatch", None),
        "pairwise_topk": ("pairwise", "topk"),
        "pairwise_topk_oracle": ("pairwise", "topk_oracle"),
        "pairwise_corpus": ("pairwise", None),
        "pairwise_qure": ("pairwise", "qure"),
        "infonce_qure": ("infonce", "qure")}
# Images per attribute combination (uniform in [min, max]): the false-negative density.
DENSITIES = {"low": (1, 6), "mid": (12, 18), "high": (28, 40)}
QUICK_DENSITIES = {"low": (1, 6), "mid": (2, 4), "high": (3, 6)}   # 60-image corpora
# `quick` unless given: fewer replicates and lrs, so its whole study runs in minutes.
QUICK_DEFAULTS = {"warmups": 2, "seeds": 1, "lrs": "1e-4/1e-3"}
LRS = "1e-5/3e-5/1e-4/3e-4"


def _parse(arg):
  items = [x.strip() for x in (arg or "").split(",") if x.strip()]
  items = [f"arm={x}" if x in _ARM else x for x in items]
  a = config_utils.parse_arg(",".join(items), arm="warmup", density="low", quick=False,
                             spotcheck=False, warmups=3, seeds=2, lrs=LRS)
  if a.quick:
    given = {x.partition("=")[0] for x in items}
    for k, v in QUICK_DEFAULTS.items():
      if k not in given:
        a[k] = v
  if a.arm not in _ARM:
    raise config_utils.ConfigError(f"arm={a.arm!r}: use one of warmup, {', '.join(ARMS)}")
  if a.density not in DENSITIES:
    raise config_utils.ConfigError(f"density={a.density!r}: use one of "
                                   f"{', '.join(DENSITIES)}")
  try:
    lrs = tuple(float(x) for x in str(a.lrs).split("/") if x.strip())
  except ValueError:
    raise config_utils.ConfigError(f"lrs={a.lrs!r}: learning rates separated by '/'") from None
  if not lrs or min(lrs) <= 0 or a.warmups < 1 or a.seeds < 1:
    raise config_utils.ConfigError(f"{arg!r}: lrs (positive), warmups and seeds need at "
                                   "least one each")
  return a, lrs


def get_config(arg=None):
  a, lrs = _parse(arg)
  loss, strategy = _ARM[a.arm]
  warm = a.arm == "warmup"
  data_home = os.environ.get("CIRJAX_DATA", "~/.cache/cirjax")
  lo, hi = (QUICK_DENSITIES if a.quick else DENSITIES)[a.density]
  c = ml_collections.ConfigDict()
  c.task = "qure"
  c.seed = 0
  c.data = dict(
      dataset="synthetic", root=os.path.join(data_home, f"synthetic_study_{a.density}"),
      train_split="train", eval_split="val", transform="targetpad", max_text_length=16,
      tokenizer="", cache_images=True, cache_images_max_bytes=1 << 30, workers=-1,
      pixel_store="auto", pixel_store_dir="",  # docs/train.md, "Memory at scale"
      synth=dict(seed=0, resolution=32, num_images=(1000, 500, 500),
                 num_queries=(2000, 500, 500), min_duplicates=lo, max_duplicates=hi))
  c.model = dict(
      init="",  # the arms: a warm-up's exported model (`cirjax study` sets it)
      num_query_tokens=8, embed_dim=32,
      vision=dict(variant="eva", image_size=32, patch_size=8, hidden_size=64,
                  intermediate_size=128, num_layers=1, num_heads=4),
      qformer=dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                   cross_attention_frequency=1, vocab_size=0, max_position_embeddings=64))
  c.freeze = ("vision/.*", "itm_head/.*")
  c.train_only = ()
  c.qure = dict(n_def=6 if strategy else 0, strategy=strategy or "qure",
                consecutive_threshold=1, strict_below=False, sampling="walk",
                cache_features=True, feature_dtype="float32", loss=loss,
                encode_batch_size=250, k=50, mining_method="auto", feature_store_dir="",
                feature_store_verify=True,
                init_temp=0.0 if warm else 0.07)   # QuRe's initial temperature
  c.train = dict(batch_size=64, epochs=12, lr=1e-4, schedule="warmup_cosine",
                 warmup_ratio=0.05, final_lr_ratio=0.01, weight_decay=0.05, b1=0.9,
                 b2=0.999, eps=1e-8, grad_clip_norm=0.0, accum_steps=1, max_steps=-1)
  if warm:  # stops at the plateau (study.plateau), long before the epoch bound
    c.train.update(epochs=40, lr=1e-3, schedule="constant")
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
  c.eval_every_epochs = 1   # the curves; the warm-up's plateau
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
  c.study = dict(
      arm=a.arm, arms=ARMS, density=a.density, densities=tuple(DENSITIES),
      warmups=int(a.warmups), seeds=int(a.seeds), lrs=lrs, widen_max=2,
      primary="mAP@10", primary_pair=("pairwise_qure", "pairwise_topk"),
      tune_split="val", report_split="test1", preference_seed=0, bootstrap=10000,
      plateau=dict(metric="mAP@10", patience=3, min_delta=0.1, min_epochs=8))

  if a.quick:
    c.data.root = os.path.join(data_home, "synthetic_tiny" if a.density == "low"
                               else f"synthetic_tiny_{a.density}")
    c.data.synth = dict(seed=0, resolution=32, num_images=(60, 60, 20),
                        num_queries=(64, 32, 16), min_duplicates=lo, max_duplicates=hi)
    c.model.vision = dict(variant="eva", image_size=32, patch_size=16, hidden_size=32,
                          intermediate_size=64, num_layers=1, num_heads=2)
    c.model.qformer = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           cross_attention_frequency=1, vocab_size=0, max_position_embeddings=64)
    c.model.num_query_tokens = 4
    c.model.embed_dim = 16
    c.train.batch_size = 16
    c.train.epochs = 3 if not warm else 4
    c.qure.n_def = 3 if strategy else 0
    c.qure.k = 20
    c.log_every_steps = 1
    c.study.plateau = dict(metric="mAP@10", patience=1, min_delta=0.0, min_epochs=2)
    c.study.bootstrap = 200
    c.study.report_split = "val"   # the tiny test1 corpus is too small for R@50
    c.study.widen_max = 1
  elif a.spotcheck:   # the previous protocol's sizes: 3,000 images, 8,000 training queries
    c.data.root = os.path.join(data_home, "synthetic_study_q8k")
    c.data.synth = dict(seed=0, resolution=64, num_images=(1500, 1000, 500),
                        num_queries=(8000, 1000, 500))
    c.model.num_query_tokens, c.model.embed_dim = 8, 64
    c.model.vision = dict(variant="eva", image_size=64, patch_size=8, hidden_size=128,
                          intermediate_size=256, num_layers=2, num_heads=4)
    c.model.qformer = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256,
                           cross_attention_frequency=1, vocab_size=0, max_position_embeddings=64)
    c.qure.k = 100
    c.study.arms = ("pairwise_topk", "pairwise_qure")
    c.study.densities = ("low",)
  return c

# COMMAND: cirjax train --config configs/qure_blip2_cirr.py --workdir runs/qure_cirr --config.data.root=/data/CIRR --config.model.init=/ckpt/blip2_pretrain_vitL.pth --config.data.tokenizer=/ckpt/bert-base-uncased
r"""QuRe on CIRR with BLIP-2 (CLIP ViT-L, frozen) — the paper's / reference code's settings.

AdamW (weight decay 0.05), batch 32, lr 1e-5 with the per-epoch cosine to lr/100, 50 epochs,
n_def = 6 (re-mining every 8 epochs after the warm-up), one negative per query per epoch,
seed 1000 (docs/reference_semantics.md#qure-training). The frozen ViT's features are cached once
(bf16: ~9 GB of host memory for CIRR's ~17k training images at 224 px).

`model.init`: a BLIP-2 checkpoint to start from (LAVIS `pretrain_vitL` model.pth, an HF
Blip2ForImageTextRetrieval directory or a cirjax model dir). `data.tokenizer`: a directory or
vocab.txt of bert-base-uncased ([DEC] is added).

Variants:
  tiny        a random tiny BLIP-2 for a few steps (give --config.data.root and
              --config.data.tokenizer; any CIRR-layout data, e.g. `cirjax data synth`)
  real_width  no checkpoint: random weights at the real widths with few layers (throughput)
"""

import ml_collections

from cirjax.train import qure_configs


def get_config(arg=None):
  c = qure_configs.base("cirr", epochs=50, lr=1e-5)
  return qure_configs.variant(c, arg)

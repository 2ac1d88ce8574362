# COMMAND: cirjax train --config configs/qure_blip2_fashioniq.py --workdir runs/qure_fiq --config.data.root=/data/FashionIQ --config.model.init=/ckpt/blip2_pretrained_vitL.pth --config.data.tokenizer=google-bert/bert-base-uncased
r"""QuRe on FashionIQ (dress, shirt, toptee together) with BLIP-2 (CLIP ViT-L, frozen).

The paper's / reference code's settings: AdamW (weight decay 0.05), batch 32, lr 5e-6 with
the per-epoch cosine to lr/100, 30 epochs, n_def = 6 (re-mining every 5 epochs after the
warm-up), seed 1000. Mining corpus per category: the targets of that category's training
triplets (one entry per triplet); sets de-duplicated by image id. Evaluation: R@10/R@50 per
category on the validation split and their averages (QuRe Table 2).

`model.init`, `data.tokenizer`: as in configs/qure_blip2_cirr.py.

Arguments (`configs/qure_blip2_fashioniq.py:tiny,epochs=1`):
  tiny          a random tiny BLIP-2 for a few steps (give --config.data.root and
                --config.data.tokenizer; any FashionIQ-layout data)
  real_width    no checkpoint: random weights at the real widths with few layers (throughput)
  batch_size=N  global batch;  epochs=N  epochs
"""

from cirjax.train import config_bases

DATASET = "fashioniq"
EPOCHS = 30
LR = 5e-6


def get_config(arg=None):
  return config_bases.qure_blip2(arg, dataset=DATASET, epochs=EPOCHS, lr=LR)

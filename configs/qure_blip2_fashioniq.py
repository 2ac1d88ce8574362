# COMMAND: cirjax train --config configs/qure_blip2_fashioniq.py --workdir runs/qure_fiq --config.data.root=/data/FashionIQ --config.model.init=/ckpt/blip2_pretrain_vitL.pth --config.data.tokenizer=/ckpt/bert-base-uncased
r"""QuRe on FashionIQ (dress, shirt, toptee together) with BLIP-2 (CLIP ViT-L, frozen).

The paper's / reference code's settings: AdamW (weight decay 0.05), batch 32, lr 5e-6 with
the per-epoch cosine to lr/100, 30 epochs, n_def = 6 (re-mining every 5 epochs after the
warm-up), seed 1000. Mining corpus per category: the targets of that category's training
triplets (one entry per triplet); sets de-duplicated by image id. Evaluation: R@10/R@50 per
category on the validation split and their averages (QuRe Table 2).

Variants: tiny, real_width (see configs/qure_blip2_cirr.py).
"""

import ml_collections

from cirjax.train import qure_configs


def get_config(arg=None):
  c = qure_configs.base("fashioniq", epochs=30, lr=5e-6)
  return qure_configs.variant(c, arg)

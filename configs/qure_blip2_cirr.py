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

from cirjax.train import config_bases

DATASET = "cirr"
EPOCHS = 50
LR = 1e-5


def get_config(arg=None):
  return config_bases.qure_blip2(arg, dataset=DATASET, epochs=EPOCHS, lr=LR)

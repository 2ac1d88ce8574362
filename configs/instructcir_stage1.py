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

from cirjax.train import config_bases

STAGE = 1
GLOBAL_BATCH = 192     # the paper's 4 GPUs x 48
SYNTHETIC_EPOCHS = 2


def get_config(arg=None):
  return config_bases.instructcir(arg, stage=STAGE, global_batch=GLOBAL_BATCH,
                                  synthetic_epochs=SYNTHETIC_EPOCHS)

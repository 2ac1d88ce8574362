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

from cirjax.train import config_bases

STAGE = 2
GLOBAL_BATCH = 256     # the paper's 4 GPUs x 64
SYNTHETIC_EPOCHS = 3


def get_config(arg=None):
  return config_bases.instructcir(arg, stage=STAGE, global_batch=GLOBAL_BATCH,
                                  synthetic_epochs=SYNTHETIC_EPOCHS)

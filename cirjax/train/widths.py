"""Model widths the config files share (configs/*.py), by the checkpoint they describe."""

# LAVIS BLIP-2 `pretrain_vitL`: CLIP ViT-L/14 at 224 px (23 of 24 blocks kept) + BERT-base
# Q-Former with 32 queries, cross-attention every 2nd layer, 256-d projections.
CLIP_L_VISION = dict(variant="clip", image_size=224, patch_size=14, hidden_size=1024,
                     intermediate_size=4096, num_layers=23, num_heads=16)
BERT_QFORMER = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                    cross_attention_frequency=2, vocab_size=30523, max_position_embeddings=512)
# A BLIP-2 of the same layout small enough for a smoke run (the `tiny` variants).
TINY_CLIP_VISION = dict(variant="clip", image_size=32, patch_size=16, hidden_size=32,
                        intermediate_size=64, num_layers=1, num_heads=2)
TINY_QFORMER = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                    cross_attention_frequency=1, vocab_size=0, max_position_embeddings=64)

# LLaVA-Phi (InstructCIR's base): CLIP ViT-L/14 at 224 px (all 24 blocks) + Phi-3.5-mini.
CLIP_L = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
              num_layers=24, num_heads=16)
PHI35_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32,
                  num_heads=32, num_kv_heads=32, max_position_embeddings=4096, layout="fused",
                  rope_theta=10000.0)
# A LLaVA of the same layout for smoke runs; vocab_size 0 = the tokenizer's size.
TINY_LLAVA_VISION = dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=2)
TINY_LLAVA_TEXT = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=4, max_position_embeddings=512, layout="fused",
                       rope_theta=10000.0)

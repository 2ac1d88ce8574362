"""Shared helpers for the LLaVA/Phi-3/LoRA tests: tiny HF reference models built from configs
(random weights, every parameter perturbed so a missed norm weight or bias shows), inputs with
mixed prompt lengths and left padding, and the parity relative error measure."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from cirjax import prompts

# docs/reference_semantics.md#parity: 1e-5 relative for single layers, 1e-4 for whole models
# (fp32, highest precision).
TOL_LAYER = 1e-5
TOL_MODEL = 1e-4


def rel_err(got, want) -> float:
  """max |got - want| / max |want|: the error relative to the tensor's scale."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def assert_close(got, want, tol, what=""):
  err = rel_err(got, want)
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
  """Adds noise to every parameter (norm weights leave 1, biases leave 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in sorted(model.named_parameters()):
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return model.eval()


def longrope_factors(half: int, seed: int = 1):
  rng = np.random.default_rng(seed)
  return ([float(x) for x in 1.0 + rng.uniform(0, 0.5, half)],
          [float(x) for x in 1.0 + rng.uniform(1.0, 8.0, half)])


def phi3_config(**kw) -> transformers.Phi3Config:
  base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
  base.update(kw)
  return transformers.Phi3Config(**base)


def llama_config(**kw) -> transformers.LlamaConfig:
  base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
  base.update(kw)
  return transformers.LlamaConfig(**base)


def clip_config(**kw) -> transformers.CLIPVisionConfig:
  base = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14)
  base.update(kw)
  return transformers.CLIPVisionConfig(**base)


IMAGE_TOKEN = 5


def llava_model(text_config, vision_config=None, seed=0, **kw):
  torch.manual_seed(seed)
  cfg = transformers.LlavaConfig(vision_config=vision_config or clip_config(),
                                 text_config=text_config, image_token_index=IMAGE_TOKEN, **kw)
  cfg._attn_implementation = "eager"
  model = transformers.LlavaForConditionalGeneration(cfg)
  model.config._attn_implementation = "eager"
  for sub in (cfg.text_config, cfg.vision_config):
    sub._attn_implementation = "eager"
  return perturb_(model, seed)


def state_numpy(model) -> dict:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def left_padded_ids(lengths, seq_len, vocab, seed=0, image_tokens=0, pad_id=0):
  """[B, T] ids/mask, rows left-padded to seq_len; row i has lengths[i] tokens, the first
  `image_tokens` of which (after a bos) are the image placeholder."""
  rng = np.random.default_rng(seed)
  ids = np.full((len(lengths), seq_len), pad_id, np.int64)
  mask = np.zeros((len(lengths), seq_len), np.int64)
  for i, n in enumerate(lengths):
    row = rng.integers(IMAGE_TOKEN + 1, vocab, n)
    row[0] = 1
    if image_tokens:
      row[1:1 + image_tokens] = IMAGE_TOKEN
    ids[i, seq_len - n:] = row
    mask[i, seq_len - n:] = 1
  return ids, mask


def pixels(n, size, seed=0):
  """NCHW torch pixels and the NHWC numpy copy cirjax takes."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
  return torch.from_numpy(x), np.ascontiguousarray(x.transpose(0, 2, 3, 1))


# Phi-3's chat template (microsoft/Phi-3.5-mini-instruct), used by the tiny test tokenizer.
PHI3_CHAT_TEMPLATE = prompts.PHI3_CHAT_TEMPLATE
SPECIAL_TOKENS = prompts.LLAVA_PHI_SPECIAL_TOKENS  # ids 0..7; <image> = IMAGE_TOKEN = 5


def make_tokenizer(out_dir, words=None, vocab_size=96, chat_template=True):
  """A small word-level HF fast tokenizer saved to `out_dir` (tokenizer.json + config), with
  LLaVA-Phi's special tokens at fixed ids and Phi-3's chat template; words beyond the vocab
  map to <unk>. Returns the tokenizer loaded back with AutoTokenizer."""
  words = words or ("a an the image this in one word describe summarize caption dog cat red "
                    "blue make it modify with shirt dress style of based on prompt for "
                    "retrieval summary : , . \" given").split()
  prompts.save_word_level_tokenizer(words, out_dir, lowercase=False, chat_template=chat_template,
                                    vocab_size=vocab_size)
  loaded = transformers.AutoTokenizer.from_pretrained(str(out_dir))
  loaded.padding_side = "left"
  return loaded

"""Helpers shared by the BLIP-2 / ViT tests: random HF reference models and error measures."""

from __future__ import annotations

import numpy as np

# SPEC §3: fp32, highest matmul precision; never loosened.
TOL_LAYER = 1e-5
TOL_MODEL = 1e-4


def rel_err(got, want) -> float:
  """max |got - want| / max |want|: the relative error used everywhere in cirjax parity."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def assert_close(got, want, tol, what=""):
  err = rel_err(got, want)
  assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
  return err


def perturb_all(model, seed: int = 0):
  """Adds noise to EVERY parameter of a torch module, in place.

  HF initialises LayerNorms to 1/0, biases and BLIP-2's query tokens to 0: a converter that
  forgot one of them would still match. After this, every tensor matters.
  """
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in sorted(model.named_parameters()):
      scale = 0.2 if p.ndim == 1 else 0.02
      if p.ndim == 3 and p.shape[0] == 1:  # query tokens, class/pos embeddings
        scale = 0.5
      p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
  return model


def to_np(t) -> np.ndarray:
  return t.detach().cpu().float().numpy()


def hf_eva_config(*, hidden=32, heads=4, inter=64, layers=2, image=28, patch=14):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.Blip2VisionConfig(
      hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
      num_hidden_layers=layers, image_size=image, patch_size=patch, attn_implementation="eager")


def hf_clip_config(*, hidden=32, heads=4, inter=64, layers=2, image=28, patch=14):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.CLIPVisionConfig(
      hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
      num_hidden_layers=layers, image_size=image, patch_size=patch, hidden_act="quick_gelu",
      attn_implementation="eager")


def hf_qformer_config(*, hidden=32, heads=4, inter=64, layers=2, freq=2, enc=24, vocab=100,
                      max_pos=40, text=True):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.Blip2QFormerConfig(
      hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter,
      num_hidden_layers=layers, cross_attention_frequency=freq, encoder_hidden_size=enc,
      vocab_size=vocab, max_position_embeddings=max_pos, use_qformer_text_input=text,
      attn_implementation="eager")


def hf_blip2_config(*, vision=None, qformer=None, num_query_tokens=8, proj=16):
  """A Blip2Config for Blip2ForImageTextRetrieval (tiny by default)."""
  import transformers  # pylint: disable=g-import-not-at-top
  vision = vision or hf_eva_config()
  qformer = qformer or hf_qformer_config(enc=vision.hidden_size)
  cfg = transformers.Blip2Config(
      vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
      num_query_tokens=num_query_tokens, image_text_hidden_size=proj)
  cfg._attn_implementation = "eager"  # pylint: disable=protected-access
  return cfg


def random_pixels(batch, image, seed=0, channels=3) -> np.ndarray:
  """NHWC float32 pixels."""
  return np.random.default_rng(seed).standard_normal(
      (batch, image, image, channels)).astype(np.float32)


def random_text(batch, length, vocab, *, pad=True, seed=0):
  """(input_ids, mask) int32 with a CLS-like first token; with `pad`, later rows padded."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  if pad:
    for b in range(1, batch):
      keep = max(1, length - 2 * b)
      mask[b, keep:] = 0
      ids[b, keep:] = 0
  return ids, mask

"""LLaVA embedder parity against HF LlavaForConditionalGeneration (Phi-3 and Llama text models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from cirjax.convert import llava_convert, llava_parity
from cirjax.models import llava
from tests import llava_fixtures as fx


def _hf_outputs(model, config, ids, mask, pix=None):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                pixel_values=pix, output_hidden_states=True)
    hs = [h.numpy() for h in out.hidden_states]
    emb = F.normalize(out.hidden_states[-1][:, -1], dim=-1).numpy()
    img = None if pix is None else llava_parity.hf_image_features(model, config, pix)[1].numpy()
  return hs, emb, img


def _convert(model):
  config = llava_convert.llava_config_from_hf(model.config.to_dict())
  params = llava_convert.convert_state_dict(fx.state_numpy(model), config)
  return config, params


def _compare(model, ids, mask, pix_t=None, pix_np=None):
  config, params = _convert(model)
  want_hs, want_emb, want_img = _hf_outputs(model, config, ids, mask, pix_t)
  pix = None if pix_np is None else jnp.asarray(pix_np)
  out = llava.forward(params, config, ids, mask, pix, output_hidden_states=True)
  if want_img is not None:
    fx.assert_close(np.asarray(out.image_features).reshape(want_img.shape), want_img,
                    fx.TOL_MODEL, "projector output")
  assert len(out.hidden_states) == len(want_hs)
  for i, (g, w) in enumerate(zip(out.hidden_states, want_hs)):
    fx.assert_close(g, w, fx.TOL_MODEL, f"hidden_states[{i}]")
  emb = llava.embed(params, config, ids, mask, pix)
  fx.assert_close(emb, want_emb, fx.TOL_MODEL, "embedding")
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, rtol=1e-6)
  return config, params


@pytest.mark.parametrize("text", ["phi3", "llama"])
def test_image_text_mixed_lengths(text):
  tc = fx.phi3_config(num_key_value_heads=2) if text == "phi3" else fx.llama_config()
  model = fx.llava_model(tc)
  p = 4  # (28 / 14)^2 image tokens per image
  ids, mask = fx.left_padded_ids([12, 8, 6], 12, tc.vocab_size, image_tokens=p)
  pix_t, pix_np = fx.pixels(3, 28)
  config, _ = _compare(model, ids, mask, pix_t, pix_np)
  assert config.num_image_tokens == p
  assert config.text.layout == ("fused" if text == "phi3" else "split")


@pytest.mark.parametrize("text", ["phi3", pytest.param("llama", marks=pytest.mark.slow)])
def test_text_only_left_padding(text):
  tc = fx.phi3_config() if text == "phi3" else fx.llama_config()
  model = fx.llava_model(tc, seed=1)
  ids, mask = fx.left_padded_ids([9, 4, 1], 9, tc.vocab_size, seed=5)
  _compare(model, ids, mask)


def test_images_in_order_of_appearance():
  """Rows without an image between rows with one: images fill tokens in batch order."""
  tc = fx.phi3_config()
  model = fx.llava_model(tc, seed=2)
  ids_a, mask_a = fx.left_padded_ids([10, 10], 10, tc.vocab_size, image_tokens=4, seed=1)
  ids_b, mask_b = fx.left_padded_ids([7], 10, tc.vocab_size, seed=2)
  ids = np.concatenate([ids_a[:1], ids_b, ids_a[1:]])
  mask = np.concatenate([mask_a[:1], mask_b, mask_a[1:]])
  pix_t, pix_np = fx.pixels(2, 28, seed=3)
  _compare(model, ids, mask, pix_t, pix_np)


def test_full_strategy_and_layer_choice():
  tc = fx.phi3_config()
  model = fx.llava_model(tc, seed=3, vision_feature_select_strategy="full",
                         vision_feature_layer=-3)
  ids, mask = fx.left_padded_ids([9, 7], 9, tc.vocab_size, image_tokens=5, seed=4)
  pix_t, pix_np = fx.pixels(2, 28, seed=4)
  config, _ = _compare(model, ids, mask, pix_t, pix_np)
  assert config.num_image_tokens == 5


def test_longrope_in_llava():
  short, long = fx.longrope_factors(4)
  tc = fx.phi3_config(max_position_embeddings=64, original_max_position_embeddings=8,
                      rope_scaling={"type": "longrope", "short_factor": short,
                                    "long_factor": long})
  model = fx.llava_model(tc, seed=4)
  ids, mask = fx.left_padded_ids([14, 9], 14, tc.vocab_size, image_tokens=4, seed=6)
  pix_t, pix_np = fx.pixels(2, 28, seed=6)
  _compare(model, ids, mask, pix_t, pix_np)


def test_jit_matches_eager():
  tc = fx.phi3_config()
  model = fx.llava_model(tc, seed=5)
  config, params = _convert(model)
  ids, mask = fx.left_padded_ids([8, 6], 8, tc.vocab_size, image_tokens=4, seed=7)
  _, pix = fx.pixels(2, 28, seed=7)
  f = jax.jit(llava.embed, static_argnames=("config",))
  a = f(params, config, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pix))
  b = llava.embed(params, config, ids, mask, pix)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # grads w.r.t. LoRA adapters under jit run by default in test_lora
def test_grad_wrt_all_params():
  tc = fx.phi3_config()
  model = fx.llava_model(tc, seed=5)
  config, params = _convert(model)
  ids, mask = fx.left_padded_ids([8, 6], 8, tc.vocab_size, image_tokens=4, seed=7)
  _, pix = fx.pixels(2, 28, seed=7)
  g = jax.jit(jax.grad(lambda p: llava.embed(p, config, ids, mask, pix)[:, 0].sum()))(params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
  # the CLIP layers after the feature layer get no gradient; the ones before it do
  n = config.vision.num_layers
  assert not np.any(np.asarray(g["vision_tower"][f"layers_{n - 1}"]["fc1"]["kernel"]))
  assert np.any(np.asarray(g["vision_tower"]["layers_0"]["fc1"]["kernel"]))


def test_bad_inputs():
  tc = fx.phi3_config(max_position_embeddings=16)
  model = fx.llava_model(tc, seed=6)
  config, params = _convert(model)
  ids, mask = fx.left_padded_ids([8, 6], 8, tc.vocab_size, image_tokens=4)
  text_ids, text_mask = fx.left_padded_ids([8, 6], 8, tc.vocab_size)
  _, pix = fx.pixels(2, 28)
  with pytest.raises(ValueError, match="no image token"):
    llava.embed(params, config, text_ids, text_mask, pix)
  with pytest.raises(ValueError, match="no pixels were given"):
    llava.embed(params, config, ids, mask, None)
  with pytest.raises(ValueError, match="more image tokens than features"):
    llava.embed(params, config, ids, mask, pix[:1])
  with pytest.raises(ValueError, match="exactly 4 tokens"):
    llava.embed(params, config, ids[:1], mask[:1], pix)
  long_ids, long_mask = fx.left_padded_ids([17], 17, tc.vocab_size)
  with pytest.raises(ValueError, match="max_position_embeddings=16"):
    llava.embed(params, config, long_ids, long_mask, None)
  right = np.ascontiguousarray(text_ids[:, ::-1])
  with pytest.raises(ValueError, match="left-padded"):
    llava.embed(params, config, right, np.ascontiguousarray(text_mask[:, ::-1]), None)
  with pytest.raises(ValueError, match="NHWC"):
    llava.embed(params, config, ids, mask, np.transpose(pix, (0, 3, 1, 2)))


@pytest.mark.slow  # load_llava(dtype='bfloat16') in test_llava_convert covers the default run
def test_bf16_compute():
  tc = fx.phi3_config()
  model = fx.llava_model(tc, seed=7)
  config, params = _convert(model)
  ids, mask = fx.left_padded_ids([8, 6], 8, tc.vocab_size, image_tokens=4, seed=8)
  _, pix = fx.pixels(2, 28, seed=8)
  f32 = llava.embed(params, config, ids, mask, pix)
  cfg16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  b16 = llava.embed(llava.cast_params(params, cfg16), cfg16, ids, mask, pix)
  assert b16.dtype == jnp.float32  # embeddings are normalised in fp32
  cos = np.sum(np.asarray(f32) * np.asarray(b16), -1)
  assert np.all(cos > 0.99), cos


@pytest.mark.slow
@pytest.mark.parametrize("text", ["phi3", "llama"])
def test_real_width_one_layer(text):
  """CLIP-L widths (1024/4096/16 heads, 224 px -> 256 tokens, 2 layers) + Phi-3-mini widths
  (3072 hidden, 32 heads, 8192 MLP, 32064 vocab) with one decoder layer."""
  vc = fx.clip_config(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                      num_hidden_layers=2, image_size=224, patch_size=14)
  kw = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=1,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
  tc = fx.phi3_config(**kw) if text == "phi3" else fx.llama_config(**kw)
  model = fx.llava_model(tc, vc, seed=8)
  ids, mask = fx.left_padded_ids([280, 270], 280, 32064, image_tokens=256, seed=9)
  pix_t, pix_np = fx.pixels(2, 224, seed=9)
  _compare(model, ids, mask, pix_t, pix_np)

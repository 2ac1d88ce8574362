"""Parity of cirjax's VisionTransformer against HF Blip2VisionModel and CLIPVisionModel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cirjax.convert import engine
from cirjax.convert.engine import KeyAccountingError, StateDictReader
from cirjax.models import vit
from tests.blip2_fixtures import (TOL_LAYER, TOL_MODEL, assert_close, hf_clip_config,
                                  hf_eva_config, perturb_all, random_pixels, to_np)


def _hf(variant, **kw):
  import transformers
  if variant == "eva":
    cfg = hf_eva_config(**kw)
    model = transformers.Blip2VisionModel(cfg)
  else:
    cfg = hf_clip_config(**kw)
    model = transformers.CLIPVisionModel(cfg)
  return cfg, perturb_all(model.eval(), seed=1)


def _rows(config, prefix=""):
  return engine.prefixed(vit.vit_hf_table(config), (), prefix)


def _from_hf(source, prefix, config):
  return engine.convert(source, _rows(config, prefix), vit.abstract_vit_params(config))


def _own_prefix(model):
  """The prefix of the tower's own state-dict keys: `vision_model.` for CLIPVisionModel with
  transformers 5.0.0 (constraints/oldest.txt), none with 5.24 (constraints/tested.txt)."""
  return "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""


def _convert(cfg, model, variant):
  config = vit.vit_config_from_hf(cfg.to_dict(), variant)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return config, _from_hf(state, _own_prefix(model), config)


def _run_both(variant, batch=2, **kw):
  cfg, model = _hf(variant, **kw)
  config, params = _convert(cfg, model, variant)
  pixels = random_pixels(batch, cfg.image_size, seed=3)
  with torch.no_grad():
    ref = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
  out = jax.jit(lambda p, x: vit.VisionTransformer(config).apply(
      {"params": p}, x, output_hidden_states=True))(params, pixels)
  return config, params, pixels, ref, out


@pytest.mark.parametrize("variant", ["eva", "clip"])
def test_tiny_tower_matches_hf(variant):
  config, params, pixels, ref, out = _run_both(variant, layers=2)
  assert len(out.hidden_states) == len(ref.hidden_states) == 3
  for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    assert_close(h, to_np(r), TOL_LAYER, f"hidden_states[{i}]")
  assert_close(out.last_hidden_state, to_np(ref.last_hidden_state), TOL_MODEL, "last_hidden_state")
  assert_close(out.pooled, to_np(ref.pooler_output), TOL_MODEL, "pooled")


@pytest.mark.parametrize("variant,hidden,inter", [("eva", 1408, 6144), ("clip", 1024, 4096)])
def test_real_width_one_layer_matches_hf(variant, hidden, inter):
  config, params, pixels, ref, out = _run_both(variant, batch=1, hidden=hidden, heads=16,
                                               inter=inter, layers=1, image=224, patch=14)
  assert out.last_hidden_state.shape == (1, 257, hidden)
  for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    assert_close(h, to_np(r), TOL_LAYER, f"hidden_states[{i}]")
  assert_close(out.last_hidden_state, to_np(ref.last_hidden_state), TOL_LAYER, "last")
  assert_close(out.pooled, to_np(ref.pooler_output), TOL_LAYER, "pooled")


def test_first_k_layers_equal_hidden_state():
  config, params, pixels, ref, out = _run_both("clip", layers=3)
  short = vit.VisionTransformer(config).apply({"params": params}, pixels, num_layers=2)
  assert_close(short.last_hidden_state, out.hidden_states[-2], 1e-6, "first 2 of 3 layers")
  assert_close(short.last_hidden_state, to_np(ref.hidden_states[-2]), TOL_LAYER, "layer -2")


@pytest.mark.slow  # compiles a backward pass / a second dtype: >10 s on 2 cores
def test_remat_same_params_and_output():
  config, params, pixels, _, out = _run_both("eva", layers=2)
  plain = vit.abstract_vit_params(config)
  remat = jax.eval_shape(lambda x: vit.VisionTransformer(config, remat=True).init(
      jax.random.PRNGKey(0), x)["params"], pixels)
  assert jax.tree.structure(plain) == jax.tree.structure(remat)
  y = vit.VisionTransformer(config, remat=True).apply({"params": params}, pixels)
  np.testing.assert_allclose(y.last_hidden_state, out.last_hidden_state, rtol=0, atol=1e-6)
  # and gradients flow through the rematerialised blocks
  g = jax.jit(jax.grad(lambda p: vit.VisionTransformer(config, remat=True).apply(
      {"params": p}, pixels).pooled.sum()))(params)
  assert np.isfinite(np.asarray(g["layers_0"]["fc1"]["kernel"])).all()


@pytest.mark.parametrize("variant", ["eva", "clip"])
def test_hf_round_trip_exact(variant):
  cfg, model = _hf(variant)
  config, params = _convert(cfg, model, variant)
  back = engine.export(params, _rows(config, _own_prefix(model)))
  state = model.state_dict()
  assert set(back) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  # and HF loads it strictly
  import transformers
  cls = transformers.Blip2VisionModel if variant == "eva" else transformers.CLIPVisionModel
  fresh = cls(cfg)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_prefix_and_strict_accounting():
  cfg, model = _hf("clip")
  config = vit.vit_config_from_hf(cfg.to_dict(), "clip")
  own = len(_own_prefix(model))
  state = {"vision_tower.vision_model." + k[own:]: v.numpy() for k, v in model.state_dict().items()}
  params = _from_hf(dict(state), "vision_tower.vision_model.", config)
  assert params["layers_1"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
  bad = dict(state)
  del bad["vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"]
  bad["vision_tower.vision_model.extra.weight"] = np.zeros(3, np.float32)
  bad["vision_tower.vision_model.pre_layrnorm.weight"] = np.zeros(5, np.float32)
  with pytest.raises(KeyAccountingError) as e:
    _from_hf(bad, "vision_tower.vision_model.", config)
  msg = str(e.value)
  assert "encoder.layers.0.mlp.fc1.bias" in msg and "extra.weight" in msg
  assert "pre_layrnorm.weight has shape (5,), expected (32,)" in msg
  # a shared reader leaves the final check to the caller
  reader = StateDictReader(state, source="x")
  _from_hf(reader, "vision_tower.vision_model.", config)
  assert not reader.unexpected


@pytest.mark.parametrize("pixels,match", [
    (np.zeros((28, 28, 3), np.float32), "rank 4"),
    (np.zeros((1, 3, 28, 28), np.float32), "channels last"),
    (np.zeros((1, 32, 32, 3), np.float32), "28x28, got 32x32"),
    (np.zeros((1, 28, 28, 3), np.uint8), "floating dtype.*uint8"),
])
def test_bad_pixels(pixels, match):
  config = vit.ViTConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=4)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), vit.abstract_vit_params(config))
  with pytest.raises(ValueError, match=match):
    vit.VisionTransformer(config).apply({"params": params}, pixels)


def test_config_dict_round_trip_and_validation():
  c = vit.ViTConfig(variant="clip", hidden_act="quick_gelu", layer_norm_eps=1e-5,
                    post_layernorm=False)
  assert vit.ViTConfig.from_dict(c.to_dict()) == c
  with pytest.raises(ValueError, match="variant"):
    vit.ViTConfig(variant="siglip")
  with pytest.raises(ValueError, match="bogus"):
    vit.ViTConfig.from_dict({"bogus": 1})
  with pytest.raises(ValueError, match="not a multiple"):
    vit.ViTConfig(image_size=225, patch_size=14)


@pytest.mark.slow  # compiles a backward pass / a second dtype: >10 s on 2 cores
def test_bf16_compute_close_to_fp32():
  config, params, pixels, _, out = _run_both("clip", layers=2)
  y = vit.VisionTransformer(config, dtype=jnp.bfloat16).apply({"params": params}, pixels)
  assert y.last_hidden_state.dtype == jnp.bfloat16
  err = np.abs(np.asarray(y.last_hidden_state, np.float32) - np.asarray(out.last_hidden_state))
  assert err.max() / np.abs(np.asarray(out.last_hidden_state)).max() < 5e-2


def test_decode_variant_sets_the_layout_fields():
  # big_vision style: the name decodes into explicit fields, which the module reads.
  assert vit.decode_variant("eva") == dict(fused_qkv=True, patch_bias=True, pre_norm=False,
                                           softmax_fp32=False, post_norm_sequence=True)
  assert vit.decode_variant("clip") == dict(fused_qkv=False, patch_bias=False, pre_norm=True,
                                            softmax_fp32=True, post_norm_sequence=False)
  with pytest.raises(ValueError, match="variant must be one of"):
    vit.decode_variant("siglip")
  clip = vit.ViTConfig(variant="clip", image_size=28, hidden_size=32, intermediate_size=64,
                       num_layers=1, num_heads=4)
  assert (clip.fused_qkv, clip.pre_norm, clip.softmax_fp32) == (False, True, True)
  # a dict saved with `variant` alone (existing model dirs) decodes to the same config
  old = {k: v for k, v in clip.to_dict().items() if k not in vit.decode_variant("clip")}
  assert vit.ViTConfig.from_dict(old) == clip
  # explicit fields override the variant's, and the parameter tree follows the fields
  hybrid = vit.ViTConfig(variant="clip", image_size=28, hidden_size=32, intermediate_size=64,
                         num_layers=1, num_heads=4, fused_qkv=True, patch_bias=True,
                         pre_norm=False)
  tree = vit.abstract_vit_params(hybrid)
  assert "qkv" in tree["layers_0"]["self_attn"] and "patch_bias" in tree
  assert "pre_layrnorm" not in tree
  rows = {r[0] for r in vit.vit_hf_table(hybrid)}
  assert ("layers_0", "self_attn", "qkv", "kernel") in rows and ("patch_bias",) in rows

"""Whole-model parity of cirjax BLIP-2 against HF Blip2ForImageTextRetrieval and LAVIS layouts.

Every stage QuRe uses is compared: vision features, the query-only Q-Former pass, target
features, the ITC text feature, the joint query+text pass (all positions, HF's ITM path),
the composed query, the scores, and HF's own forward outputs (ITC embeddings, ITM logits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cirjax.convert import blip2_convert
from cirjax.models import blip2
from cirjax.convert.blip2_parity import STAGES, jax_stages
from tests.blip2_fixtures import (TOL_LAYER, TOL_MODEL, assert_close, hf_clip_config,
                                  hf_eva_config, hf_qformer_config, hf_retrieval_model,
                                  lavis_model, random_pixels, random_text, to_np)


def _hf_params(m):
  state = {k: v.detach().numpy() for k, v in m.state_dict().items()}
  cfg = blip2_convert.config_from_hf(m.config.to_dict())
  return cfg, blip2_convert.params_from_hf_state(state, cfg)


def _check_stages(got, want, tol, what=""):
  for name in STAGES:
    assert_close(got[name], want[name], tol, f"{what}{name}")


SLOW = pytest.mark.slow


@pytest.mark.parametrize("freq,pad", [(1, True), pytest.param(2, True, marks=SLOW),
                                      pytest.param(1, False, marks=SLOW),
                                      pytest.param(2, False, marks=SLOW)])
def test_tiny_hf_model_all_stages(freq, pad):
  from cirjax.convert.blip2_parity import TorchReference
  m = hf_retrieval_model(qformer=hf_qformer_config(enc=32, freq=freq, layers=3))
  cfg, params = _hf_params(m)
  # the random-init tree (init_blip2, abstract_params) is exactly a converted checkpoint's
  abstract = blip2.abstract_params(cfg)
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(np.shape, params)
  pixels = random_pixels(3, 28, seed=1)
  ids, mask = random_text(3, 7, 100, pad=pad, seed=2)
  want = TorchReference.from_hf_model(m).stages(pixels, ids, mask)
  got = jax_stages(params, cfg, pixels, ids, mask)
  _check_stages(got, want, TOL_MODEL)
  # ... and HF's own forward passes agree with the reference stages and with cirjax
  px, it, mt = (torch.from_numpy(pixels.transpose(0, 3, 1, 2)), torch.from_numpy(ids).long(),
                torch.from_numpy(mask).long())
  with torch.no_grad():
    itc = m(pixel_values=px, input_ids=it, attention_mask=mt)
    itm = m(pixel_values=px, input_ids=it, attention_mask=mt, use_image_text_matching_head=True)
  assert_close(got["target features"], to_np(itc.image_embeds), TOL_MODEL, "HF image_embeds")
  assert_close(got["text feature"], to_np(itc.text_embeds), TOL_MODEL, "HF text_embeds")
  # HF's ITC logits pair image i with text j: max over queries of target_i . text_j
  assert_close(blip2.score(got["text feature"], got["target features"]).T,
               to_np(itc.logits_per_image), TOL_MODEL, "HF ITC logits")
  feats = blip2.vision_features(params, cfg, pixels)
  assert_close(blip2.itm_logits(params, cfg, feats, ids, mask), to_np(itm.logits_per_image),
               TOL_MODEL, "HF ITM logits")


@SLOW
def test_real_width_eva_hf_model():
  # EVA 1408 / 16 heads, Q-Former 768 / 12 heads (2 layers: with and without cross-attention),
  # 32 queries, 256-d projections, BERT vocab with [DEC].
  from cirjax.convert.blip2_parity import TorchReference
  m = hf_retrieval_model(
      vision=hf_eva_config(hidden=1408, heads=16, inter=6144, layers=1, image=224),
      qformer=hf_qformer_config(hidden=768, heads=12, inter=3072, layers=2, freq=2, enc=1408,
                                vocab=30523, max_pos=512),
      num_query_tokens=32, proj=256)
  cfg, params = _hf_params(m)
  pixels = random_pixels(2, 224, seed=4)
  ids, mask = random_text(2, 32, 30523, seed=5)
  want = TorchReference.from_hf_model(m).stages(pixels, ids, mask)
  got = jax_stages(params, cfg, pixels, ids, mask)
  assert_close(got["vision features"], want["vision features"], TOL_LAYER, "one EVA layer")
  _check_stages(got, want, TOL_MODEL)


@pytest.mark.parametrize("variant,freq", [("clip", 2), pytest.param("eva", 1, marks=SLOW),
                                          pytest.param("clip", 1, marks=SLOW),
                                          pytest.param("eva", 2, marks=SLOW)])
def test_lavis_state_dict_all_stages(variant, freq):
  state, ref = lavis_model(variant, qformer_kw={"freq": freq, "layers": 2})
  with pytest.raises(blip2_convert.ConfigError, match="--vision-heads"):
    blip2_convert.config_from_lavis(state)
  cfg = blip2_convert.config_from_lavis(state, vision_heads=4, qformer_heads=4)
  assert cfg.vision.variant == variant and cfg.qformer.cross_attention_frequency == freq
  assert cfg.ln_vision_eps == 1e-5 and cfg.temperature_init == pytest.approx(0.05)
  params = blip2_convert.params_from_lavis_state(state, cfg)
  pixels = random_pixels(2, 28, seed=6)
  ids, mask = random_text(2, 6, 100, seed=7)
  _check_stages(jax_stages(params, cfg, pixels, ids, mask), ref.stages(pixels, ids, mask),
                TOL_MODEL, f"{variant}: ")
  assert float(params["temp"]) == pytest.approx(0.05)


@SLOW
def test_real_width_clip_l_lavis():
  # CLIP-L 1024 / 16 heads (LAVIS clip_L layout), Q-Former 768 / 12, 32 queries, 256-d.
  state, ref = lavis_model(
      "clip", vision_kw=dict(hidden=1024, heads=16, inter=4096, layers=1, image=224),
      qformer_kw=dict(hidden=768, heads=12, inter=3072, layers=1, vocab=30523, max_pos=512),
      num_query_tokens=32, proj=256)
  cfg = blip2_convert.config_from_lavis(state)
  assert (cfg.vision.hidden_size, cfg.vision.num_heads, cfg.qformer.num_heads) == (1024, 16, 12)
  params = blip2_convert.params_from_lavis_state(state, cfg)
  pixels = random_pixels(1, 224, seed=8)
  ids, mask = random_text(1, 20, 30523, seed=9)
  got = jax_stages(params, cfg, pixels, ids, mask)
  want = ref.stages(pixels, ids, mask)
  assert_close(got["vision features"], want["vision features"], TOL_LAYER, "one CLIP-L layer")
  _check_stages(got, want, TOL_MODEL)


# ------------------------------------------------------------------------ functional API

@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_init_and_train_from_scratch():
  # train a 1-layer model from scratch on cached features with QuRe's pairwise loss
  cfg = blip2.tiny_config(num_layers=1, cross_attention_frequency=1)
  init = blip2.init_blip2(jax.random.PRNGKey(0), cfg)
  assert float(init["temp"]) == pytest.approx(0.07)
  assert jax.tree.map(lambda a: a.shape, blip2.abstract_params(cfg)) == jax.tree.map(
      np.shape, init)
  np.testing.assert_array_equal(init["ln_vision"]["scale"], 1)
  np.testing.assert_array_equal(init["qformer"]["layer_0"]["ffn"]["output"]["bias"], 0)
  np.testing.assert_array_equal(init["vision"]["patch_bias"], 0)
  std = np.asarray(init["qformer"]["layer_0"]["attention"]["query"]["kernel"]).std()
  assert 0.015 < std < 0.025
  pixels = random_pixels(2, 28)
  ids, mask = random_text(2, 5, 100)
  feats = blip2.vision_features(init, cfg, pixels)

  def loss(p):
    q = blip2.compose_from_features(p, cfg, feats, ids, mask)
    t = blip2.encode_target_from_features(p, cfg, feats)
    s = blip2.logits(p, q, t)
    return -jax.nn.log_sigmoid(jnp.diag(s) - s[:, ::-1].diagonal()).mean()

  g = jax.jit(jax.grad(loss))(init)
  for path in (("qformer", "layer_0", "crossattention", "query", "kernel"), ("query_tokens",),
               ("ln_vision", "scale"), ("temp",), ("text_projection", "kernel")):
    leaf = g
    for k in path:
      leaf = leaf[k]
    assert np.abs(np.asarray(leaf)).max() > 0, path
  assert not np.asarray(g["vision"]["patch_embedding"]).any()  # cached features: frozen ViT


def test_from_features_equal_end_to_end():
  cfg = blip2.tiny_config(vision_variant="clip", cross_attention_frequency=1, num_layers=1)
  params = blip2.init_blip2(jax.random.PRNGKey(1), cfg)
  pixels = random_pixels(2, 28)
  ids, mask = random_text(2, 5, 100)
  feats = blip2.vision_features(params, cfg, pixels)
  # separately compiled, so equal up to fusion-order rounding
  np.testing.assert_allclose(blip2.encode_image(params, cfg, pixels),
                             blip2.encode_target_from_features(params, cfg, feats), atol=1e-6)
  np.testing.assert_allclose(blip2.compose(params, cfg, pixels, ids, mask),
                             blip2.compose_from_features(params, cfg, feats, ids, mask),
                             atol=1e-6)
  q = blip2.compose(params, cfg, pixels, ids, mask)
  assert q.shape == (2, 16)
  np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, rtol=1e-6)
  t = blip2.encode_image(params, cfg, pixels)
  assert t.shape == (2, 8, 16)
  np.testing.assert_allclose(np.linalg.norm(t, axis=-1), 1.0, rtol=1e-6)
  s = blip2.score(q, t)
  want = np.einsum("bd,tkd->btk", np.asarray(q, np.float64), np.asarray(t, np.float64)).max(-1)
  np.testing.assert_allclose(s, want, rtol=1e-6)
  assert blip2.score(q[0], t[1]).shape == ()
  np.testing.assert_allclose(blip2.logits(params, q, t), s / 0.07, rtol=1e-6)
  with pytest.raises(ValueError, match="score expects"):
    blip2.score(q, t[..., :4])


@SLOW
def test_bf16_compute_close():
  cfg = blip2.tiny_config()
  params = blip2.init_blip2(jax.random.PRNGKey(2), cfg)
  pixels = random_pixels(2, 28)
  ids, mask = random_text(2, 5, 100)
  a = blip2.compose(params, cfg, pixels, ids, mask)
  b = blip2.compose(params, cfg.replace(dtype="bfloat16"), pixels, ids, mask)
  assert b.dtype == jnp.float32
  assert np.abs(np.asarray(a) - np.asarray(b)).max() < 5e-2


def _dot_dtypes(fn, *args):
  """The operand dtypes of every matmul in fn's program."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  out = set()

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "dot_general":
        out.add(str(eqn.invars[0].aval.dtype))
      for sub in eqn.params.values():  # nested programs (pjit, remat)
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          walk(sub)
  walk(jaxpr.jaxpr)
  return out


def test_config_dtype_is_the_compute_dtype():
  # The config is the one dtype policy: what it names is what the functions compute in.
  cfg = blip2.tiny_config(num_layers=1)
  params = blip2.init_blip2(jax.random.PRNGKey(2), cfg)
  pixels = random_pixels(2, 28)
  ids, mask = random_text(2, 5, 100)
  feats = blip2.vision_features(params, cfg, pixels)
  vit_bf16 = cfg.replace(vision_dtype="bfloat16")
  assert _dot_dtypes(lambda p: blip2.vision_features(p, cfg, pixels), params) == {"float32"}
  assert _dot_dtypes(lambda p: blip2.vision_features(p, vit_bf16, pixels), params) == {"bfloat16"}
  # vision_dtype alone leaves the Q-Former in fp32; dtype alone sets both
  assert "bfloat16" not in _dot_dtypes(
      lambda p: blip2.compose_from_features(p, vit_bf16, feats, ids, mask), params)
  qf_bf16 = cfg.replace(dtype="bfloat16")
  assert "bfloat16" in _dot_dtypes(
      lambda p: blip2.compose_from_features(p, qf_bf16, feats, ids, mask), params)
  assert _dot_dtypes(lambda p: blip2.vision_features(p, qf_bf16, pixels), params) == {"bfloat16"}
  # bf16 ViT features stay close to fp32 ones; outputs are fp32 either way
  f16 = blip2.vision_features(params, vit_bf16, pixels)
  assert f16.dtype == jnp.float32 and not np.array_equal(f16, feats)
  np.testing.assert_allclose(f16, feats, atol=5e-2 * float(np.abs(feats).max()))  # as test_vit
  # fp32 stated explicitly is the default, bit for bit
  explicit = cfg.replace(dtype="float32", vision_dtype="float32")
  np.testing.assert_array_equal(blip2.compose(params, explicit, pixels, ids, mask),
                                blip2.compose(params, cfg, pixels, ids, mask))
  # param_dtype sets the stored dtype of the Q-Former side; ViT, norms and temp stay fp32
  abstract = blip2.abstract_params(cfg.replace(param_dtype="bfloat16"))
  assert abstract["qformer"]["layer_0"]["attention"]["query"]["kernel"].dtype == jnp.bfloat16
  assert abstract["query_tokens"].dtype == jnp.bfloat16
  assert abstract["vision"]["patch_embedding"].dtype == jnp.float32
  assert abstract["ln_vision"]["scale"].dtype == jnp.float32
  assert abstract["temp"].dtype == jnp.float32
  with pytest.raises(ValueError, match="Blip2Config.dtype must be one of"):
    cfg.replace(dtype="float64")


def test_config_round_trip_and_validation():
  cfg = blip2.tiny_config(vision_variant="clip")
  assert blip2.Blip2Config.from_dict(cfg.to_dict()) == cfg
  bf16 = cfg.replace(dtype="bfloat16", vision_dtype="float16", param_dtype="bfloat16",
                     remat=True)
  assert blip2.Blip2Config.from_dict(bf16.to_dict()) == bf16
  # a dict saved before the dtype and ViT layout fields existed still loads, as fp32
  old = cfg.to_dict()
  for k in ("dtype", "vision_dtype", "param_dtype", "remat"):
    del old[k]
  for k in ("fused_qkv", "patch_bias", "pre_norm", "softmax_fp32", "post_norm_sequence"):
    del old["vision"][k]
  assert blip2.Blip2Config.from_dict(old) == cfg
  with pytest.raises(ValueError, match="unknown Blip2Config field"):
    blip2.Blip2Config.from_dict({"bogus": 1})
  with pytest.raises(ValueError, match="encoder_hidden_size"):
    cfg.replace(qformer=cfg.qformer.__class__(encoder_hidden_size=7))
  with pytest.raises(ValueError, match="post_layernorm"):
    cfg.replace(vision=cfg.vision.__class__(post_layernorm=True))


# ------------------------------------------------------------------------ loaded models

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  hf_retrieval_model().save_pretrained(d)
  return d


@pytest.fixture(scope="module")
def loaded(hf_dir):
  import cirjax
  return cirjax.load_blip2(hf_dir)


def test_load_blip2_model(hf_dir, tmp_path):
  import cirjax
  from cirjax.convert import registry
  model = cirjax.load_blip2(hf_dir)
  assert model.family == "blip2" and model.tokenizer is None  # the HF dir holds none
  p, cfg = model.params, model.config
  pixels = random_pixels(2, 28)
  ids, mask = random_text(2, 5, 100)
  t, q, x = (blip2.encode_image(p, cfg, pixels), blip2.compose(p, cfg, pixels, ids, mask),
             blip2.encode_text(p, cfg, ids, mask))
  assert t.shape == (2, 8, 16) and q.shape == (2, 16) and x.shape == (2, 16)
  assert blip2.score(q, t).shape == (2, 2)
  # the same numbers through a cirjax directory
  registry.save(tmp_path / "cj", "blip2", model.config, model.params)
  again = cirjax.load_blip2(tmp_path / "cj")
  assert again.config == model.config
  np.testing.assert_array_equal(blip2.compose(again.params, again.config, pixels, ids, mask), q)
  assert "eva ViT 32x2" in repr(again)
  # the loader's dtype overrides land in the config
  assert cirjax.load_blip2(tmp_path / "cj", vision_dtype=jnp.bfloat16).config.vision_dtype == \
      "bfloat16"


@pytest.mark.parametrize("pixels,match", [
    (np.zeros((28, 28, 3), np.float32), "rank 4"),
    (np.zeros((1, 3, 28, 28), np.float32), "NCHW"),
    (np.zeros((1, 32, 32, 3), np.float32), "28x28, got 32x32"),
    (np.zeros((1, 28, 28, 3), np.uint8), "floating dtype.*uint8"),
])
def test_bad_pixels(loaded, pixels, match):
  p, cfg = loaded.params, loaded.config
  with pytest.raises(ValueError, match=match):
    blip2.encode_image(p, cfg, pixels)
  with pytest.raises(ValueError, match=match):
    blip2.compose(p, cfg, pixels, np.ones((1, 3), np.int32), np.ones((1, 3), np.int32))


def test_bad_text(loaded):
  p, cfg = loaded.params, loaded.config
  px = random_pixels(1, 28)
  with pytest.raises(ValueError, match="text length 41 exceeds the position table"):
    blip2.encode_text(p, cfg, np.ones((1, 41), np.int32))
  with pytest.raises(ValueError, match="token id 100 is outside the vocabulary"):
    blip2.compose(p, cfg, px, np.full((1, 3), 100), np.ones((1, 3)))
  with pytest.raises(ValueError, match="1 images but 2 texts"):
    blip2.compose(p, cfg, px, np.ones((2, 3), np.int32), np.ones((2, 3), np.int32))
  with pytest.raises(ValueError, match="mask shape"):
    blip2.encode_text(p, cfg, np.ones((1, 3), np.int32), np.ones((1, 4), np.int32))
  with pytest.raises(ValueError, match="vision features must be"):
    blip2.encode_target_from_features(p, cfg, px)


def test_load_blip2_wrong_type(tmp_path):
  import cirjax
  from cirjax.convert import io
  io.save_model_dir(tmp_path / "l", {"w": np.zeros(2, np.float32)}, {}, "llava")
  with pytest.raises(ValueError, match="'llava' model, not 'blip2'"):
    cirjax.load_blip2(tmp_path / "l")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="none of the checkpoints cirjax reads"):
    cirjax.load_blip2(tmp_path / "empty")

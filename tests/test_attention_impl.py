"""`attention_impl`: the einsum formulation and `jax.nn.dot_product_attention` agree on CPU.

fp32: to the layer tolerance (the two compute the same numbers up to summation order). bf16:
loosely (5e-2 relative, as test_vit's bf16 bound): dot_product_attention accumulates the logits
in fp32 where the einsum path rounds them to bf16 first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cirjax.models import attention, blip2, llava, phi3
from cirjax.models import qformer as qf
from cirjax.models import vit
from tests.blip2_fixtures import TOL_LAYER, assert_close

TOL_BF16 = 5e-2


def _f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def test_dot_attention_matches_einsum_with_gqa_and_bias():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(k1, (2, 5, 6, 8))
  k = jax.random.normal(k2, (2, 7, 3, 8))  # 6 query heads read 3 key/value heads
  v = jax.random.normal(k3, (2, 7, 3, 8))
  keep = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
  bias = jnp.where(keep[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
  for b in (None, bias):
    want = attention.dot_attention(q, k, v, bias=b, impl="einsum")
    got = attention.dot_attention(q, k, v, bias=b, impl="xla")
    assert_close(got, want, TOL_LAYER, "fp32 GQA attention")
    got16 = attention.dot_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                    v.astype(jnp.bfloat16), bias=b, impl="xla")
    assert got16.dtype == jnp.bfloat16
    assert_close(_f32(got16), want, TOL_BF16, "bf16 GQA attention")


def test_impl_resolution_and_config_errors():
  assert attention.resolve_impl("auto", jnp.bfloat16) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  assert attention.resolve_impl("auto", jnp.float32) == "xla"
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    blip2.tiny_config(attention_impl="flash")
  assert blip2.Blip2Config.from_dict(blip2.tiny_config().to_dict()).attention_impl == "xla"


def _vit_out(cfg, params, px, impl, dtype=jnp.float32):
  out = vit.VisionTransformer(cfg, dtype=dtype, attention_impl=impl).apply(
      {"params": params}, px, output_hidden_states=True)
  return out.hidden_states[-1]


# clip runs with -m slow (default-suite budget; CI runs both)
@pytest.mark.parametrize("variant", ["eva", pytest.param("clip", marks=pytest.mark.slow)])
def test_vit_formulations_agree(variant):
  cfg = vit.ViTConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, variant=variant)
  params = vit.init_vit_params(cfg)
  px = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))
  want = _vit_out(cfg, params, px, "einsum")
  assert_close(_vit_out(cfg, params, px, "xla"), want, TOL_LAYER, f"{variant} fp32")
  got16 = _vit_out(cfg, params, px, "xla", jnp.bfloat16)
  assert_close(_f32(got16), want, TOL_BF16, f"{variant} bf16")
  if variant == "eva":  # bf16 softmax (HF BLIP-2): 'xla' keeps the exact einsum path
    np.testing.assert_array_equal(_f32(got16), _f32(_vit_out(cfg, params, px, "einsum",
                                                              jnp.bfloat16)))


def test_qformer_formulations_agree():
  cfg = qf.QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                         encoder_hidden_size=24, vocab_size=50)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 32))
  enc = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 24))
  mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2])
  params = qf.QFormer(cfg).init(jax.random.PRNGKey(0), x, mask, enc, 3)["params"]
  run = lambda impl, dt=jnp.float32: qf.QFormer(cfg, dt, attention_impl=impl).apply(
      {"params": params}, x, mask, enc, 3)
  want = run("einsum")
  assert_close(run("xla"), want, TOL_LAYER, "Q-Former fp32")
  assert_close(_f32(run("xla", jnp.bfloat16)), want, TOL_BF16, "Q-Former bf16")


@pytest.mark.slow  # default-suite budget: CI runs it with -m slow
def test_phi3_formulations_agree():
  cfg = phi3.Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=64)
  mod = phi3.Phi3Decoder(cfg)
  params = mod.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 32)), jnp.ones((1, 4), jnp.int32),
                    method=lambda m, e, a: (m.embed(jnp.zeros((1, 1), jnp.int32)), m(e, a)))
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 64)
  mask = jnp.array([[1] * 9, [0] * 3 + [1] * 6])  # left padding: fully masked query rows
  run = lambda impl, dt="float32": phi3.decoder_forward(
      params["params"], ids, mask, config=cfg, dtype=dt, attention_impl=impl)[0]
  want = run("einsum")
  assert_close(run("xla"), want, TOL_LAYER, "Phi-3 fp32")
  assert_close(_f32(run("xla", "bfloat16")), want, TOL_BF16, "Phi-3 bf16")


def test_model_configs_carry_the_switch():
  cfg = blip2.tiny_config(attention_impl="einsum")
  params = blip2.init_blip2(jax.random.PRNGKey(0), cfg)
  px = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 3))
  a = blip2.encode_image(params, cfg, px)
  b = blip2.encode_image(params, cfg.replace(attention_impl="xla"), px)
  assert_close(b, a, TOL_LAYER, "BLIP-2 image embedding")
  lcfg = llava.tiny_config(attention_impl="einsum")
  assert llava.LlavaConfig.from_dict(lcfg.to_dict()) == lcfg

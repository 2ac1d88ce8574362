"""Phi-3 / Llama decoder parity against HF Phi3Model / LlamaModel (eager, fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cirjax.models import phi3
from cirjax.convert.llava_convert import decoder_params_from_hf
from tests import llava_fixtures as fx


def _run_both(hf_cfg, ids, mask, seed=0):
  cls = transformers.Phi3Model if hf_cfg.model_type == "phi3" else transformers.LlamaModel
  torch.manual_seed(seed)
  model = fx.perturb_(cls(hf_cfg), seed)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                output_hidden_states=True)
  want = [h.numpy() for h in out.hidden_states]
  cfg = phi3.Phi3Config.from_hf(hf_cfg.to_dict())
  params = decoder_params_from_hf(fx.state_numpy(model), cfg)
  _, got = phi3.decoder_forward(params, jnp.asarray(ids), jnp.asarray(mask), config=cfg)
  return cfg, got, want


def _check(got, want, mask, tol=fx.TOL_MODEL):
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want)):
    fx.assert_close(g, w, tol, f"hidden_states[{i}]")
    valid = mask.astype(bool)
    fx.assert_close(np.asarray(g)[valid], w[valid], tol, f"hidden_states[{i}] (valid)")


@pytest.mark.parametrize("kv_heads", [pytest.param(4, marks=pytest.mark.slow), 2,
                                      pytest.param(1, marks=pytest.mark.slow)])
def test_phi3_fused_gqa_left_padding(kv_heads):
  hf = fx.phi3_config(num_key_value_heads=kv_heads)
  ids, mask = fx.left_padded_ids([9, 5, 1], 9, hf.vocab_size)
  cfg, got, want = _run_both(hf, ids, mask)
  assert cfg.layout == "fused" and cfg.num_kv_heads == kv_heads
  _check(got, want, mask)


def test_single_layer_tolerance():
  hf = fx.phi3_config(num_hidden_layers=1)
  ids, mask = fx.left_padded_ids([7, 4], 7, hf.vocab_size)
  _, got, want = _run_both(hf, ids, mask)
  # [1] is the final-norm output of the single layer: one layer + norm at the layer tolerance.
  _check(got, want, mask, tol=fx.TOL_LAYER)


def test_llama_split_layout_gqa():
  hf = fx.llama_config(num_key_value_heads=2)
  ids, mask = fx.left_padded_ids([8, 3], 8, hf.vocab_size, seed=3)
  cfg, got, want = _run_both(hf, ids, mask)
  assert cfg.layout == "split"
  _check(got, want, mask)


def test_llama_with_biases():
  hf = fx.llama_config(attention_bias=True, mlp_bias=True)
  ids, mask = fx.left_padded_ids([6, 6], 6, hf.vocab_size, seed=4)
  cfg, got, want = _run_both(hf, ids, mask)
  assert cfg.attention_bias and cfg.mlp_bias
  _check(got, want, mask)


@pytest.mark.parametrize("seq_len", [pytest.param(15, marks=pytest.mark.slow), 16, 17,
                                     pytest.param(40, marks=pytest.mark.slow)])
def test_longrope_short_long_switch(seq_len):
  # original_max_position_embeddings=16: the long factors apply once max(pos)+1 > 16.
  short, long = fx.longrope_factors(4)
  hf = fx.phi3_config(max_position_embeddings=64, original_max_position_embeddings=16,
                      rope_scaling={"type": "longrope", "short_factor": short,
                                    "long_factor": long})
  ids, mask = fx.left_padded_ids([seq_len, seq_len - 3], seq_len, hf.vocab_size, seed=seq_len)
  cfg, got, want = _run_both(hf, ids, mask)
  assert cfg.rope_type == "longrope"
  _check(got, want, mask)


def test_longrope_tables():
  short, long = fx.longrope_factors(4)
  cfg = phi3.Phi3Config(hidden_size=32, num_heads=4, num_kv_heads=4, rope_type="longrope",
                        rope_short_factor=tuple(short), rope_long_factor=tuple(long),
                        max_position_embeddings=131072, original_max_position_embeddings=4096)
  s, l, attn = phi3.rope_tables(cfg)
  assert attn == pytest.approx(1.19024, abs=1e-5)  # Phi-3.5-mini's sqrt(1 + ln 32 / ln 4096)
  np.testing.assert_allclose(s * np.asarray(short, np.float32), l * np.asarray(long, np.float32),
                             rtol=1e-6)
  pos = jnp.arange(4096)[None]
  c_short, _ = phi3.rope_cos_sin(cfg, pos, jnp.float32)
  c_long, _ = phi3.rope_cos_sin(cfg, jnp.arange(4097)[None], jnp.float32)
  # 4096 positions use the short table, 4097 switch the whole sequence to the long one.
  assert not np.allclose(c_short[0, 100], c_long[0, 100])
  np.testing.assert_allclose(c_short[0, 0], attn, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [4090, 4100])
def test_longrope_real_4096_switch(seq_len):
  """The real Phi-3.5 switch point (4096) with tiny widths: around and past it."""
  short, long = fx.longrope_factors(4)
  hf = fx.phi3_config(num_hidden_layers=1, max_position_embeddings=131072,
                      original_max_position_embeddings=4096,
                      rope_scaling={"type": "longrope", "short_factor": short,
                                    "long_factor": long})
  ids, mask = fx.left_padded_ids([seq_len, seq_len - 10], seq_len, hf.vocab_size, seed=1)
  _, got, want = _run_both(hf, ids, mask)
  _check(got, want, mask)


def test_sliding_window():
  hf = fx.phi3_config(sliding_window=4)
  ids, mask = fx.left_padded_ids([10, 7], 10, hf.vocab_size, seed=2)
  cfg, got, want = _run_both(hf, ids, mask)
  assert cfg.sliding_window == 4
  _check(got, want, mask)


def test_unsupported_rope_type():
  hf = fx.llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
  with pytest.raises(ValueError, match="unsupported rope_scaling type 'linear'"):
    phi3.Phi3Config.from_hf(hf.to_dict())


def test_position_limit():
  cfg = phi3.Phi3Config(hidden_size=32, num_heads=4, num_kv_heads=4, max_position_embeddings=8)
  with pytest.raises(ValueError, match="max_position_embeddings=8"):
    phi3.check_positions(cfg, 9)
  phi3.check_positions(cfg, 8)


def test_config_roundtrip_hf():
  short, long = fx.longrope_factors(4)
  hf = fx.phi3_config(max_position_embeddings=64, original_max_position_embeddings=16,
                      rope_scaling={"type": "longrope", "short_factor": short,
                                    "long_factor": long})
  cfg = phi3.Phi3Config.from_hf(hf.to_dict())
  again = phi3.Phi3Config.from_hf(transformers.Phi3Config(**cfg.to_hf()).to_dict())
  assert again == cfg
  hash(cfg)  # usable as a jit static argument


@pytest.mark.slow  # bf16 compute runs by default through load_llava in test_llava_convert
def test_bf16_compute_close_to_fp32():
  hf = fx.phi3_config()
  ids, mask = fx.left_padded_ids([6, 4], 6, hf.vocab_size)
  torch.manual_seed(0)
  model = fx.perturb_(transformers.Phi3Model(hf), 0)
  cfg = phi3.Phi3Config.from_hf(hf.to_dict())
  params = decoder_params_from_hf(fx.state_numpy(model), cfg)
  f32, _ = phi3.decoder_forward(params, jnp.asarray(ids), jnp.asarray(mask), config=cfg,
                                output_hidden_states=False)
  b16, _ = phi3.decoder_forward(params, jnp.asarray(ids), jnp.asarray(mask), config=cfg,
                                dtype="bfloat16", output_hidden_states=False)
  assert b16.dtype == jnp.bfloat16
  assert fx.rel_err(np.asarray(b16, np.float32), f32) < 5e-2

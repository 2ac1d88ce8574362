"""Parity of cirjax's QFormer against HF Blip2QFormerModel (queries, text, joint)."""

import jax
import numpy as np
import pytest
import torch

from cirjax.convert import engine
from cirjax.models import qformer as qf
from tests.blip2_fixtures import (TOL_LAYER, TOL_MODEL, assert_close, hf_qformer_config,
                                  perturb_all, random_text, to_np)


def _setup(**kw):
  import transformers
  hf_cfg = hf_qformer_config(**kw)
  model = perturb_all(transformers.Blip2QFormerModel(hf_cfg).eval(), seed=2)
  config = qf.QFormerConfig(
      hidden_size=hf_cfg.hidden_size, num_layers=hf_cfg.num_hidden_layers,
      num_heads=hf_cfg.num_attention_heads, intermediate_size=hf_cfg.intermediate_size,
      cross_attention_frequency=hf_cfg.cross_attention_frequency,
      encoder_hidden_size=hf_cfg.encoder_hidden_size, vocab_size=hf_cfg.vocab_size,
      max_position_embeddings=hf_cfg.max_position_embeddings,
      use_text_input=hf_cfg.use_qformer_text_input)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params = engine.convert(state, qf.qformer_table(config), qf.abstract_qformer_params(config))
  return model, config, params


def _inputs(config, batch=2, queries=4, text=5, image_tokens=7, pad=True, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, queries, config.hidden_size)).astype(np.float32)
  t = rng.standard_normal((batch, text, config.hidden_size)).astype(np.float32)
  enc = rng.standard_normal((batch, image_tokens, config.encoder_hidden_size)).astype(np.float32)
  _, mask = random_text(batch, text, 10, pad=pad, seed=seed)
  return q, t, enc, mask


def _hf(model, embeds, qlen, mask, enc):
  with torch.no_grad():
    return to_np(model(
        query_embeds=torch.from_numpy(embeds), query_length=qlen,
        attention_mask=None if mask is None else torch.from_numpy(mask).long(),
        encoder_hidden_states=None if enc is None else torch.from_numpy(enc),
        encoder_attention_mask=None if enc is None else torch.ones(enc.shape[:2],
                                                                   dtype=torch.long),
    ).last_hidden_state)


def _ours(config, params, embeds, qlen, mask, enc):
  fn = jax.jit(lambda p, e, m, x: qf.QFormer(config).apply({"params": p}, e, m, x, qlen))
  return np.asarray(fn(params, embeds, mask, enc))


@pytest.mark.parametrize("freq", [1, 2])
def test_queries_only_matches_hf(freq):
  model, config, params = _setup(freq=freq, layers=2)
  q, _, enc, _ = _inputs(config)
  want = _hf(model, q, q.shape[1], None, enc)
  assert_close(_ours(config, params, q, q.shape[1], None, enc), want, TOL_MODEL, "queries")


@pytest.mark.parametrize("freq", [1, 2])
@pytest.mark.parametrize("pad", [False, True])
def test_joint_queries_and_text_matches_hf(freq, pad):
  model, config, params = _setup(freq=freq, layers=2)
  q, t, enc, tmask = _inputs(config, pad=pad)
  embeds = np.concatenate([q, t], axis=1)
  mask = np.concatenate([np.ones(q.shape[:2], np.int32), tmask], axis=1)
  want = _hf(model, embeds, q.shape[1], mask, enc)
  got = _ours(config, params, embeds, q.shape[1], mask, enc)
  # all positions, text ones included (padded positions are computed too, as in HF)
  assert_close(got, want, TOL_MODEL, "joint")


@pytest.mark.parametrize("pad", [False, True])
def test_text_only_matches_hf(pad):
  model, config, params = _setup(layers=2)
  _, t, _, tmask = _inputs(config, pad=pad)
  want = _hf(model, t, 0, tmask, None)
  assert_close(_ours(config, params, t, 0, tmask, None), want, TOL_MODEL, "text")


def test_single_layer_real_width():
  # Q-Former 768 / 12 heads, 32 queries, EVA-g width image features.
  model, config, params = _setup(hidden=768, heads=12, inter=3072, layers=1, freq=2, enc=1408,
                                 vocab=30523, max_pos=512)
  q, t, enc, tmask = _inputs(config, batch=2, queries=32, text=12, image_tokens=257)
  embeds = np.concatenate([q, t], axis=1)
  mask = np.concatenate([np.ones(q.shape[:2], np.int32), tmask], axis=1)
  assert_close(_ours(config, params, embeds, 32, mask, enc), _hf(model, embeds, 32, mask, enc),
               TOL_LAYER, "joint, one real-width layer")
  assert_close(_ours(config, params, q, 32, None, enc), _hf(model, q, 32, None, enc),
               TOL_LAYER, "queries, one real-width layer")


def test_without_text_ffn():
  model, config, params = _setup(layers=2, text=False)
  assert "ffn" not in params["layer_0"]
  q, t, enc, _ = _inputs(config)
  assert_close(_ours(config, params, q, q.shape[1], None, enc), _hf(model, q, q.shape[1], None,
                                                                     enc), TOL_MODEL, "queries")
  with pytest.raises(ValueError, match="use_qformer_text_input=False"):
    _ours(config, params, t, 0, None, None)


@pytest.mark.slow  # compiles a backward pass / a second dtype: >10 s on 2 cores
def test_remat_same_output():
  _, config, params = _setup(layers=2)
  q, t, enc, tmask = _inputs(config)
  embeds = np.concatenate([q, t], axis=1)
  mask = np.concatenate([np.ones(q.shape[:2], np.int32), tmask], axis=1)
  a = qf.QFormer(config).apply({"params": params}, embeds, mask, enc, q.shape[1])
  b = jax.jit(lambda p: qf.QFormer(config, remat=True).apply({"params": p}, embeds, mask, enc,
                                                             q.shape[1]))(params)
  assert_close(b, a, 1e-6, "remat")


def test_check_text_errors():
  config = qf.QFormerConfig(vocab_size=100, max_position_embeddings=8)
  ids = np.zeros((2, 4), np.int32)
  qf.check_text(ids, np.ones((2, 4)), config)
  with pytest.raises(ValueError, match="token id 100 is outside the vocabulary"):
    qf.check_text(np.full((1, 3), 100), None, config)
  with pytest.raises(ValueError, match="token id -1"):
    qf.check_text(np.full((1, 3), -1), None, config)
  with pytest.raises(ValueError, match="text length 9 exceeds the position table"):
    qf.check_text(np.zeros((1, 9), np.int32), None, config)
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    qf.check_text(np.zeros((4,), np.int32), None, config)
  with pytest.raises(ValueError, match="integers"):
    qf.check_text(np.zeros((1, 4), np.float32), None, config)
  with pytest.raises(ValueError, match="mask shape"):
    qf.check_text(ids, np.ones((2, 3)), config)

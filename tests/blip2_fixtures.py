"""Helpers shared by the BLIP-2 / ViT tests: random HF reference models and error measures."""

from __future__ import annotations

import numpy as np

# docs/reference_semantics.md#parity: fp32, highest matmul precision; never loosened.
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


def hf_retrieval_model(*, seed=3, **kw):
  """A perturbed (every tensor random) tiny HF Blip2ForImageTextRetrieval in eval mode."""
  import transformers  # pylint: disable=g-import-not-at-top
  return perturb_all(transformers.Blip2ForImageTextRetrieval(hf_blip2_config(**kw)).eval(),
                     seed=seed)


def _np(t):
  return t.detach().cpu().float().numpy().copy()


def lavis_state_from_hf(vision, variant: str, m, ln_vision, temp: float = 0.05,
                        with_lm_head: bool = True) -> dict:
  """A LAVIS `Blip2Qformer`-layout state dict holding the weights of HF modules.

  `vision`: HF Blip2VisionModel ('eva', its k-bias must be zero: LAVIS has none) or
  CLIPVisionModel ('clip'); `m`: a Blip2ForImageTextRetrieval supplying the Q-Former, text
  embeddings, query tokens and heads; `ln_vision`: a torch LayerNorm. Written from
  the LAVIS key layout of docs/reference_semantics.md#checkpoints, independently of
  cirjax's converters.
  """
  out = {}
  vs = {k: _np(v) for k, v in vision.state_dict().items()}
  if any(k.startswith("vision_model.") for k in vs):  # CLIPVisionModel in transformers 4.x
    vs = {k[len("vision_model."):]: v for k, v in vs.items() if k.startswith("vision_model.")}
  d = vs["embeddings.patch_embedding.weight"].shape[0]
  ve = "visual_encoder."
  if variant == "eva":
    out[ve + "cls_token"] = vs["embeddings.class_embedding"]
    out[ve + "pos_embed"] = vs["embeddings.position_embedding"]
    out[ve + "patch_embed.proj.weight"] = vs["embeddings.patch_embedding.weight"]
    out[ve + "patch_embed.proj.bias"] = vs["embeddings.patch_embedding.bias"]
  else:
    out[ve + "class_embedding"] = vs["embeddings.class_embedding"]
    out[ve + "positional_embedding"] = vs["embeddings.position_embedding.weight"]
    out[ve + "conv1.weight"] = vs["embeddings.patch_embedding.weight"]
    out[ve + "ln_pre.weight"] = vs["pre_layrnorm.weight"]
    out[ve + "ln_pre.bias"] = vs["pre_layrnorm.bias"]
  n_layers = len({k.split(".")[2] for k in vs if k.startswith("encoder.layers.")})
  for i in range(n_layers):
    s = f"encoder.layers.{i}."
    if variant == "eva":
      t = f"{ve}blocks.{i}."
      names = {"layer_norm1": "norm1", "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1",
               "mlp.fc2": "mlp.fc2", "self_attn.projection": "attn.proj"}
      out[t + "attn.qkv.weight"] = vs[s + "self_attn.qkv.weight"]
      b = vs[s + "self_attn.qkv.bias"]
      assert not b[d:2 * d].any(), "EVA k bias must be zero for a LAVIS-layout checkpoint"
      out[t + "attn.q_bias"] = b[:d]
      out[t + "attn.v_bias"] = b[2 * d:]
    else:
      t = f"{ve}transformer.resblocks.{i}."
      names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
               "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
      for kind in ("weight", "bias"):
        out[t + f"attn.in_proj_{kind}"] = np.concatenate(
            [vs[s + f"self_attn.{n}_proj.{kind}"] for n in "qkv"], axis=0)
    for src, dst in names.items():
      for kind in ("weight", "bias"):
        out[t + f"{dst}.{kind}"] = vs[s + f"{src}.{kind}"]
  out["ln_vision.weight"] = _np(ln_vision.weight)
  out["ln_vision.bias"] = _np(ln_vision.bias)
  ms = {k: _np(v) for k, v in m.state_dict().items()}
  qb = "Qformer.bert."
  for k, v in ms.items():
    if k.startswith("qformer.layernorm."):
      out[qb + "embeddings.LayerNorm." + k.split(".")[-1]] = v
    elif k.startswith("qformer.encoder."):
      name = k[len("qformer."):].replace(".attention.attention.", ".attention.self.")
      name = name.replace(".crossattention.attention.", ".crossattention.self.")
      out[qb + name] = v
    elif k.startswith("embeddings."):
      out[qb + k] = v
  max_pos = ms["embeddings.position_embeddings.weight"].shape[0]
  out[qb + "embeddings.position_ids"] = np.arange(max_pos, dtype=np.int64)[None]
  for src, dst in (("vision_projection", "vision_proj"), ("text_projection", "text_proj"),
                   ("itm_head", "itm_head")):
    for kind in ("weight", "bias"):
      out[f"{dst}.{kind}"] = ms[f"{src}.{kind}"]
  out["query_tokens"] = ms["query_tokens"]
  out["temp"] = np.asarray(temp, np.float32)
  if with_lm_head:
    vocab, hidden = ms["embeddings.word_embeddings.weight"].shape
    rng = np.random.default_rng(0)
    out["Qformer.cls.predictions.bias"] = rng.standard_normal(vocab).astype(np.float32)
    out["Qformer.cls.predictions.transform.dense.weight"] = rng.standard_normal(
        (hidden, hidden)).astype(np.float32)
    out["Qformer.cls.predictions.decoder.weight"] = ms["embeddings.word_embeddings.weight"]
  return out


def lavis_model(variant: str, *, seed=5, vision_kw=None, qformer_kw=None, num_query_tokens=8,
                proj=16):
  """(LAVIS state dict, torch TorchReference over the original HF modules)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from cirjax.convert.blip2_parity import TorchReference  # pylint: disable=g-import-not-at-top
  vision_kw = vision_kw or {}
  if variant == "clip":
    vcfg = hf_clip_config(**vision_kw)
    vision = perturb_all(transformers.CLIPVisionModel(vcfg).eval(), seed=seed)
  else:
    vcfg = hf_eva_config(**vision_kw)
    vision = perturb_all(transformers.Blip2VisionModel(vcfg).eval(), seed=seed)
    d = vcfg.hidden_size
    with torch.no_grad():
      for layer in vision.encoder.layers:
        layer.self_attn.qkv.bias[d:2 * d] = 0
  qcfg = hf_qformer_config(**{"enc": vcfg.hidden_size, **(qformer_kw or {})})
  m = hf_retrieval_model(seed=seed + 1, vision=hf_eva_config(hidden=vcfg.hidden_size, layers=1),
                         qformer=qcfg, num_query_tokens=num_query_tokens, proj=proj)
  ln = torch.nn.LayerNorm(vcfg.hidden_size, eps=1e-5)
  perturb_all(ln, seed=seed + 2)
  state = lavis_state_from_hf(vision, variant, m, ln)
  ref = TorchReference(vision, ln, m.query_tokens, m.embeddings, m.qformer, m.vision_projection,
                       m.text_projection)
  return state, ref


def save_runner_checkpoint(path, state, frozen=("visual_encoder.",), epoch=3):
  """What LAVIS's `RunnerBase._save_checkpoint` writes: the parameters that required
  gradients (here: all but the frozen ViT) under "model", beside the optimizer state, the
  run's config, the AMP scaler and the epoch."""
  import torch  # pylint: disable=g-import-not-at-top
  trained = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()
             if not k.startswith(frozen)}
  torch.save({"model": trained,
              "optimizer": {"state": {0: {"step": torch.tensor(10.0),
                                          "exp_avg": torch.zeros(3)}},
                            "param_groups": [{"lr": 1e-5, "weight_decay": 0.05,
                                              "params": [0]}]},
              "config": {"run": {"task": "image_text_pretrain", "max_epoch": 10},
                         "model": {"arch": "blip2", "freeze_vit": True}},
              "scaler": None, "epoch": epoch}, path)
  return sorted(trained)

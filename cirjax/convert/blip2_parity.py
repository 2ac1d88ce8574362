"""Stage-by-stage numerical parity of cirjax BLIP-2 against the PyTorch reference.

The reference is built from transformers' own modules (`Blip2VisionModel` or
`CLIPVisionModel`, `Blip2QFormerModel`, the BLIP-2 text embeddings and the projections),
loaded from:
* an HF `Blip2ForImageTextRetrieval` directory (`from_pretrained`), or
* a LAVIS BLIP-2 state dict, whose keys are mapped onto those modules here, by torch-side
  code independent of the JAX converter (a converter bug is not reproduced by the reference).

Both sides get the same random pixels, token ids and padding mask; each stage's max abs and
max relative error (max |a - b| / max |b|) is compared to the whole-model tolerance
(docs/reference_semantics.md#parity: 1e-4, fp32, matmul precision highest).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np

from cirjax.convert import io, registry
from cirjax.convert.parity import TOLERANCE, ParityRow, compare, format_table
from cirjax.convert import blip2_convert
from cirjax.models import blip2


STAGES = ("vision features", "Q-Former query outputs", "target features", "text feature",
          "joint Q-Former outputs", "composed query", "scores")


# ------------------------------------------------------------------------- torch reference

class TorchReference:
  """The PyTorch BLIP-2 retrieval computation, stage by stage, from HF modules."""

  def __init__(self, vision, ln_vision, query_tokens, embeddings, qformer, vision_projection,
               text_projection):
    self.vision = vision.eval()
    self.ln_vision = ln_vision
    self.query_tokens = query_tokens
    self.embeddings = embeddings
    self.qformer = qformer.eval()
    self.vision_projection = vision_projection
    self.text_projection = text_projection

  @classmethod
  def from_hf_model(cls, m) -> "TorchReference":
    """From a `Blip2ForImageTextRetrieval` (its `post_layernorm` plays `ln_vision`)."""
    return cls(m.vision_model, m.vision_model.post_layernorm, m.query_tokens, m.embeddings,
               m.qformer, m.vision_projection, m.text_projection)

  def stages(self, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict:
    # heavy, optional dependencies: only the PyTorch reference needs them
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
    out = {}
    with torch.no_grad():
      px = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
      ids_t = torch.from_numpy(ids).long()
      mask_t = torch.from_numpy(mask).long()
      # The encoder output before any final LayerNorm (HF post-LNs the EVA sequence).
      feats = self.vision(px, output_hidden_states=True).hidden_states[-1]
      out["vision features"] = feats
      img = self.ln_vision(feats)
      b = img.shape[0]
      img_mask = torch.ones(img.shape[:2], dtype=torch.long)
      qt = self.query_tokens.expand(b, -1, -1)
      nq = qt.shape[1]
      qh = self.qformer(query_embeds=qt, query_length=nq, encoder_hidden_states=img,
                        encoder_attention_mask=img_mask).last_hidden_state
      out["Q-Former query outputs"] = qh
      target = F.normalize(self.vision_projection(qh), dim=-1)
      out["target features"] = target
      th = self.qformer(query_embeds=self.embeddings(input_ids=ids_t), query_length=0,
                        attention_mask=mask_t).last_hidden_state
      out["text feature"] = F.normalize(self.text_projection(th[:, 0]), dim=-1)
      joint_mask = torch.cat([torch.ones(b, nq, dtype=torch.long), mask_t], dim=1)
      jh = self.qformer(query_embeds=self.embeddings(input_ids=ids_t, query_embeds=qt),
                        query_length=nq, attention_mask=joint_mask, encoder_hidden_states=img,
                        encoder_attention_mask=img_mask).last_hidden_state
      out["joint Q-Former outputs"] = jh
      composed = F.normalize(self.text_projection(jh[:, :nq]).mean(dim=1), dim=-1)
      out["composed query"] = composed
      out["scores"] = torch.einsum("bd,tkd->btk", composed, target).max(dim=-1).values
    return {k: v.detach().float().numpy() for k, v in out.items()}


def lavis_to_hf_modules_state(state: Mapping[str, np.ndarray], tower: str) -> dict:
  """Renames a LAVIS BLIP-2 state dict onto HF module names (torch side of the parity check).

  Returns {'vision': ..., 'qformer': ..., 'embeddings': ..., 'rest': ...} sub-state dicts.
  """
  vis, qfm, emb, rest = {}, {}, {}, {}
  for k, v in state.items():
    v = np.asarray(v, np.float32)
    if k.startswith("Qformer.cls.") or k == "Qformer.bert.embeddings.position_ids":
      continue
    if k.startswith("visual_encoder."):
      vis[k[len("visual_encoder."):]] = v
    elif k.startswith("Qformer.bert.embeddings."):
      name = k[len("Qformer.bert.embeddings."):]
      if name.startswith("LayerNorm."):
        qfm["layernorm." + name[len("LayerNorm."):]] = v
      else:
        emb[name] = v
    elif k.startswith("Qformer.bert.encoder."):
      name = k[len("Qformer.bert."):]
      name = re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", name)
      qfm[name] = v
    else:
      rest[k] = v
  hf_vis = {}
  if tower == "clip":
    for k, v in vis.items():
      m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", k)
      if m:
        i, r = m.groups()
        p = f"encoder.layers.{i}."
        if r in ("attn.in_proj_weight", "attn.in_proj_bias"):
          kind = "weight" if r.endswith("weight") else "bias"
          for j, part in enumerate(np.split(v, 3, axis=0)):
            hf_vis[p + f"self_attn.{'qkv'[j]}_proj.{kind}"] = part
          continue
        r = (r.replace("attn.out_proj", "self_attn.out_proj").replace("ln_1", "layer_norm1")
             .replace("ln_2", "layer_norm2").replace("mlp.c_fc", "mlp.fc1")
             .replace("mlp.c_proj", "mlp.fc2"))
        hf_vis[p + r] = v
        continue
      name = {"class_embedding": "embeddings.class_embedding",
              "positional_embedding": "embeddings.position_embedding.weight",
              "conv1.weight": "embeddings.patch_embedding.weight",
              "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias"}[k]
      hf_vis[name] = v
  else:
    qb = {}
    for k, v in vis.items():
      m = re.match(r"blocks\.(\d+)\.(.*)", k)
      if m:
        i, r = m.groups()
        p = f"encoder.layers.{i}."
        if r in ("attn.q_bias", "attn.v_bias"):
          qb.setdefault(i, {})[r[5]] = v
          continue
        r = (r.replace("attn.qkv", "self_attn.qkv").replace("attn.proj", "self_attn.projection")
             .replace("norm1", "layer_norm1").replace("norm2", "layer_norm2"))
        hf_vis[p + r] = v
        continue
      name = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
              "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
              "patch_embed.proj.bias": "embeddings.patch_embedding.bias"}[k]
      hf_vis[name] = v
    for i, b in qb.items():
      hf_vis[f"encoder.layers.{i}.self_attn.qkv.bias"] = np.concatenate(
          [b["q"], np.zeros_like(b["q"]), b["v"]])
  return {"vision": hf_vis, "qformer": qfm, "embeddings": emb, "rest": rest}


def reference_from_lavis(state: Mapping[str, np.ndarray], cfg) -> TorchReference:
  """HF torch modules carrying a LAVIS checkpoint's weights (strict `load_state_dict`)."""
  # heavy, optional dependencies: only the PyTorch reference needs them
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.blip_2 import modeling_blip_2 as mb  # pylint: disable=g-import-not-at-top
  v, q = cfg.vision, cfg.qformer
  parts = lavis_to_hf_modules_state(state, v.variant)
  common = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)
  if v.variant == "clip":
    vcfg = transformers.CLIPVisionConfig(**common)
    vcfg._attn_implementation = "eager"  # pylint: disable=protected-access
    vision = transformers.CLIPVisionModel(vcfg)
  else:
    vcfg = transformers.Blip2VisionConfig(**common)
    vcfg._attn_implementation = "eager"  # pylint: disable=protected-access
    vision = transformers.Blip2VisionModel(vcfg)
  # LAVIS towers have no post_layernorm of their own (unused here: the reference reads
  # hidden_states[-1]); keep the module's own so the strict load below checks everything else.
  own = vision.state_dict()
  prefix = "vision_model." if any(k.startswith("vision_model.") for k in own) else ""
  sd = {prefix + k: a for k, a in parts["vision"].items()}
  for n in ("weight", "bias"):
    sd[f"{prefix}post_layernorm.{n}"] = own[f"{prefix}post_layernorm.{n}"].numpy()
  vision.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in sd.items()},
                         strict=True)
  qcfg = transformers.Blip2QFormerConfig(
      hidden_size=q.hidden_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
      intermediate_size=q.intermediate_size, cross_attention_frequency=q.cross_attention_frequency,
      encoder_hidden_size=q.encoder_hidden_size, vocab_size=q.vocab_size,
      max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
      hidden_act=q.hidden_act, use_qformer_text_input=q.use_text_input)
  qcfg._attn_implementation = "eager"  # pylint: disable=protected-access
  qformer = transformers.Blip2QFormerModel(qcfg)
  qformer.load_state_dict({k: torch.from_numpy(a) for k, a in parts["qformer"].items()},
                          strict=True)
  embeddings = mb.Blip2TextEmbeddings(qcfg)
  embeddings.load_state_dict({k: torch.from_numpy(a) for k, a in parts["embeddings"].items()},
                             strict=True)
  rest = parts["rest"]
  ln = torch.nn.LayerNorm(v.hidden_size, eps=cfg.ln_vision_eps)
  ln.load_state_dict({"weight": torch.from_numpy(rest["ln_vision.weight"]),
                      "bias": torch.from_numpy(rest["ln_vision.bias"])})

  def linear(name):
    w = torch.from_numpy(rest[name + ".weight"])
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    lin.load_state_dict({"weight": w, "bias": torch.from_numpy(rest[name + ".bias"])})
    return lin

  return TorchReference(vision, ln, torch.from_numpy(rest["query_tokens"]), embeddings.eval(),
                        qformer, linear("vision_proj"), linear("text_proj"))


# ---------------------------------------------------------------------------- cirjax side

def jax_stages(params: Any, cfg, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict:
  """The same stages computed by cirjax (jitted, fp32)."""
  @jax.jit
  def run(p, px, ids, mask):
    feats = blip2.vision_features(p, cfg, px)
    target = blip2.encode_target_from_features(p, cfg, feats)
    composed = blip2.compose_from_features(p, cfg, feats, ids, mask)
    return {
        "vision features": feats,
        "Q-Former query outputs": blip2.query_hidden_states(p, cfg, feats),
        "target features": target,
        "text feature": blip2.encode_text(p, cfg, ids, mask),
        "joint Q-Former outputs": blip2.joint_hidden_states(p, cfg, feats, ids, mask),
        "composed query": composed,
        "scores": blip2.score(composed, target),
    }

  return {k: np.asarray(v) for k, v in run(params, pixels, ids, mask).items()}


def random_inputs(cfg, batch: int = 2, text_len: int = 12, seed: int = 0):
  """NHWC pixels ~ N(0, 1), token ids in [1, vocab), and a mask padding all but row 0."""
  rng = np.random.default_rng(seed)
  v, q = cfg.vision, cfg.qformer
  text_len = max(1, min(text_len, q.max_position_embeddings))
  pixels = rng.standard_normal((batch, v.image_size, v.image_size, v.num_channels)).astype(
      np.float32)
  ids = rng.integers(1, q.vocab_size, size=(batch, text_len)).astype(np.int32)
  mask = np.ones((batch, text_len), np.int32)
  for b in range(1, batch):
    keep = max(1, text_len - 3 * b)
    mask[b, keep:] = 0
    ids[b, keep:] = q.pad_token_id
  return pixels, ids, mask


def run_parity(path: str | os.PathLike, *, converted: Optional[str | os.PathLike] = None,
               batch: int = 2, text_len: int = 12, seed: int = 0,
               tolerance: float = TOLERANCE, vision_heads: Optional[int] = None,
               qformer_heads: Optional[int] = None) -> list[ParityRow]:
  """Loads the PyTorch checkpoint at `path` (HF BLIP-2 ITM dir or LAVIS state dict) and its
  conversion (`converted`, a cirjax dir; default: converted in memory now), runs the same
  random inputs through both, and returns one ParityRow per stage (see STAGES).

  LAVIS checkpoints do not record head counts: `vision_heads` / `qformer_heads` default to
  those of `converted` when given, else to the released towers' (see `config_from_lavis`).
  """
  jax.config.update("jax_default_matmul_precision", "highest")
  family, kind = registry.sniff(path)
  if kind == "cirjax" or family != "blip2":
    raise io.WeightFileError(f"{path}: parity needs the PyTorch BLIP-2 checkpoint (HF directory or "
                             "LAVIS file); pass the cirjax directory as `converted`")
  conv = None
  if converted is not None:
    loaded = registry.load(converted, family="blip2")
    conv = (loaded.config, loaded.params)
  if kind == "hf":
    # transformers is heavy and optional: only parity needs the PyTorch reference
    import transformers  # pylint: disable=g-import-not-at-top
    kwargs = {"attn_implementation": "eager", "dtype": "float32"}
    model = transformers.Blip2ForImageTextRetrieval.from_pretrained(os.fspath(path), **kwargs)
    ref = TorchReference.from_hf_model(model)
    if converted is None:
      cfg, params = blip2_convert.from_hf(path)
  else:
    state = io.read_state_dict(path)
    if conv is not None:
      vision_heads = vision_heads or conv[0].vision.num_heads
      qformer_heads = qformer_heads or conv[0].qformer.num_heads
    ref_cfg = blip2_convert.config_from_lavis(state, source=str(path), vision_heads=vision_heads,
                                              qformer_heads=qformer_heads)
    ref = reference_from_lavis(state, ref_cfg)
    if converted is None:
      cfg = ref_cfg
      params = blip2_convert.params_from_lavis_state(state, cfg, source=str(path))
  if conv is not None:
    cfg, params = conv
  pixels, ids, mask = random_inputs(cfg, batch, text_len, seed)
  want = ref.stages(pixels, ids, mask)
  got = jax_stages(params, cfg, pixels, ids, mask)
  return [compare(name, got[name], want[name], tolerance) for name in STAGES]

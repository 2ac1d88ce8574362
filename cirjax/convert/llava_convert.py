"""HF LLaVA(-Phi) checkpoints <-> cirjax params.

Conversion is a table (cirjax param path, HF key, transform) per component (decoder,
projector, and the shared ViT table for the vision tower), run by `cirjax.convert.engine` on
arrays or on `jax.ShapeDtypeStruct`s alike, so the full-size Phi-3.5-mini + CLIP-L tree can be
checked without allocating it (`convert_abstract`).

Key layouts accepted (detected per component from the keys present):

  component        | transformers 4.x (hub)        | transformers 5.x
  -----------------|-------------------------------|------------------------------------
  language model   | language_model.model.*        | model.language_model.*
  LM head          | language_model.lm_head.weight | lm_head.weight
  vision tower     | vision_tower.vision_model.*   | model.vision_tower.vision_model.*
  projector        | multi_modal_projector.*       | model.multi_modal_projector.*

plus the variants 5.x itself writes (`vision_tower.*` / `model.vision_tower.*` without
`vision_model.`, since its CLIPVisionModel lost that wrapper). The language model may be
Phi-3 (fused `qkv_proj`, `gate_up_proj`) or Llama layout (separate q/k/v, gate/up).

The LM head is not used by the embedder, but generation needs it: when the source has one
it is kept as `params['lm_head']['kernel']` ([hidden, vocab], beside the components the
model applies, which ignore it) and `to_hf` writes it back, so an export round-trips and
`generate()` works. A source with tied embeddings and no head tensor gets the head as a copy
of the embedding. Without a head (a randomly initialised model) `to_hf` warns: transformers
would initialise one randomly. CLIP's `post_layernorm` (unused by LLaVA, which reads
hidden_states[-2]) is kept so the export round-trips.

Strict key accounting: every other source key must be consumed and every parameter filled;
one error lists all missing, unexpected and mis-shaped keys by name.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cirjax.convert import engine, io
from cirjax.models import vit as vit_lib
from cirjax.models.llava import LlavaConfig, abstract_params
from cirjax.models.phi3 import Phi3Config, Phi3Decoder

KEY_FORMATS = ("hf4", "hf5")
# Where each component lives, by key format (LM prefix, LM head, vision, projector).
PREFIXES = {
    "hf4": dict(lm="language_model.model.", head="language_model.lm_head.weight",
                vision="vision_tower.vision_model.", proj="multi_modal_projector."),
    "hf5": dict(lm="model.language_model.", head="lm_head.weight",
                vision="model.vision_tower.vision_model.", proj="model.multi_modal_projector."),
}
_VISION_PREFIXES = ("vision_tower.vision_model.", "model.vision_tower.vision_model.",
                    "vision_tower.", "model.vision_tower.")
_LM_PREFIXES = ("language_model.model.", "model.language_model.")
_PROJ_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
_HEAD_KEYS = ("language_model.lm_head.weight", "lm_head.weight")
# Buffers some transformers versions saved; not parameters.
_IGNORED = (r"(^|\.)position_ids$", r"rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------- tables


def _linear_rows(dst: tuple, src: str, bias: bool) -> list:
  rows = [(dst + ("kernel",), src + ".weight", "linear")]
  if bias:
    rows.append((dst + ("bias",), src + ".bias", "id"))
  return rows


def decoder_hf_table(c: Phi3Config) -> list[tuple[tuple, str, str]]:
  """Rows (param path under `language_model`, HF key under the LM prefix, transform)."""
  rows = [(("embed_tokens", "embedding"), "embed_tokens.weight", "id")]
  for i in range(c.num_layers):
    d, s = (f"layers_{i}",), f"layers.{i}"
    rows.append((d + ("input_layernorm", "weight"), s + ".input_layernorm.weight", "id"))
    rows.append((d + ("post_attention_layernorm", "weight"),
                 s + ".post_attention_layernorm.weight", "id"))
    if c.layout == "fused":
      rows += _linear_rows(d + ("self_attn", "qkv_proj"), s + ".self_attn.qkv_proj", False)
      rows += _linear_rows(d + ("self_attn", "o_proj"), s + ".self_attn.o_proj", False)
      rows += _linear_rows(d + ("mlp", "gate_up_proj"), s + ".mlp.gate_up_proj", False)
      rows += _linear_rows(d + ("mlp", "down_proj"), s + ".mlp.down_proj", False)
    else:
      for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rows += _linear_rows(d + ("self_attn", n), f"{s}.self_attn.{n}", c.attention_bias)
      for n in ("gate_proj", "up_proj", "down_proj"):
        rows += _linear_rows(d + ("mlp", n), f"{s}.mlp.{n}", c.mlp_bias)
  rows.append((("norm", "weight"), "norm.weight", "id"))
  return rows


def projector_hf_table(config: LlavaConfig) -> list[tuple[tuple, str, str]]:
  rows = []
  for n in ("linear_1", "linear_2"):
    rows += _linear_rows((n,), n, config.projector_bias)
  return rows


LM_HEAD = ("lm_head", "kernel")


def full_table(config: LlavaConfig, prefixes: Mapping[str, str | None],
               lm_head: bool = False) -> list[tuple[tuple, str, str]]:
  """(param path, full HF key, transform) for the whole model under the given prefixes;
  with `lm_head`, the LM head's row too (`prefixes['head']`, its full key)."""
  rows = (engine.prefixed(vit_lib.vit_hf_table(config.vision), ("vision_tower",),
                          prefixes["vision"])
          + engine.prefixed(projector_hf_table(config), ("multi_modal_projector",),
                            prefixes["proj"])
          + engine.prefixed(decoder_hf_table(config.text), ("language_model",), prefixes["lm"]))
  return rows + ([(LM_HEAD, prefixes["head"], "linear")] if lm_head else [])


def abstract_params_with_head(config: LlavaConfig, lm_head: bool) -> dict:
  """`llava.abstract_params`, plus the LM head's [hidden, vocab] kernel when `lm_head`."""
  target = dict(abstract_params(config))
  if lm_head:
    shape = (config.text.hidden_size, config.text.vocab_size)
    target["lm_head"] = {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}
  return target


# ----------------------------------------------------------------------------- key formats


def detect_prefixes(keys: Iterable[str], source: str = "checkpoint") -> dict[str, str]:
  """Finds each component's prefix in a LLaVA state dict (any 4.x/5.x variant)."""
  keys = set(keys)
  def find(cands, probe, what):
    for p in cands:
      if p + probe in keys:
        return p
    sample = sorted(keys)[:6]
    raise io.WeightFileError(f"{source}: cannot find the {what} (looked for "
                             f"{[p + probe for p in cands]}); is this an HF LLaVA checkpoint? "
                             f"first keys: {sample}")
  return dict(lm=find(_LM_PREFIXES, "embed_tokens.weight", "language model"),
              vision=find(_VISION_PREFIXES, "embeddings.patch_embedding.weight", "vision tower"),
              proj=find(_PROJ_PREFIXES, "linear_1.weight", "multi-modal projector"),
              head=next((k for k in _HEAD_KEYS if k in keys), None))


def key_format_of(keys: Iterable[str]) -> str:
  """'hf5' if the language model is under `model.language_model.`, else 'hf4'."""
  return "hf5" if any(k.startswith("model.language_model.") for k in keys) else "hf4"


def hf_module_name(path: tuple[str, ...] | str, key_format: str = "hf5") -> str:
  """HF module name (as PEFT sees it) of a cirjax module path, e.g.
  ('language_model', 'layers_3', 'self_attn', 'qkv_proj') ->
  'model.language_model.layers.3.self_attn.qkv_proj' (hf5) or
  'language_model.model.layers.3.self_attn.qkv_proj' (hf4)."""
  if key_format not in KEY_FORMATS:
    raise ValueError(f"key_format must be one of {KEY_FORMATS}, got {key_format!r}")
  parts = path.split("/") if isinstance(path, str) else list(path)
  comp, rest = parts[0], [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in parts[1:]]
  pre = PREFIXES[key_format]
  if comp == "language_model":
    return pre["lm"] + ".".join(rest)
  if comp == "multi_modal_projector":
    return pre["proj"] + ".".join(rest)
  if comp == "vision_tower":
    rest = [re.sub(r"^layers\.(\d+)$", r"encoder.layers.\1", p) for p in rest]
    return pre["vision"] + ".".join(rest)
  raise ValueError(f"not a LLaVA module path: {'/'.join(parts)}")


def module_path_from_hf(name: str) -> tuple[str, ...]:
  """Inverse of `hf_module_name` for language-model and projector modules (any format)."""
  for comp, cands in (("language_model", _LM_PREFIXES), ("multi_modal_projector", _PROJ_PREFIXES)):
    for p in cands:
      if name.startswith(p):
        rest = name[len(p):].split(".")
        out, i = [], 0
        while i < len(rest):
          if rest[i] == "layers" and i + 1 < len(rest) and rest[i + 1].isdigit():
            out.append(f"layers_{rest[i + 1]}")
            i += 2
          else:
            out.append(rest[i])
            i += 1
        return (comp,) + tuple(out)
  raise ValueError(f"{name!r} is not a language-model or projector module of a LLaVA model "
                   f"(expected a prefix among {_LM_PREFIXES + _PROJ_PREFIXES})")


# ----------------------------------------------------------------------------- configs


def llava_config_from_hf(hf: Any, *, dtype: str = "float32",
                         param_dtype: str = "float32") -> LlavaConfig:
  """LlavaConfig from an HF config (dict, `transformers.LlavaConfig`, or a directory).

  Missing fields take the HF sub-config class defaults (saved configs omit them).
  """
  # transformers is heavy and optional; its config classes hold the defaults saved configs omit
  import transformers  # pylint: disable=g-import-not-at-top
  if isinstance(hf, (str, os.PathLike)):
    f = Path(hf) / "config.json" if Path(hf).is_dir() else Path(hf)
    if not f.exists():
      raise FileNotFoundError(f"{hf}: no config.json")
    hf = json.loads(f.read_text())
  if isinstance(hf, Mapping):
    if hf.get("model_type") != "llava":
      raise io.WeightFileError(f"expected an HF config with model_type 'llava', got "
                               f"{hf.get('model_type')!r}")
    hf = transformers.LlavaConfig.from_dict(dict(hf))
  vc, tc = hf.vision_config, hf.text_config
  if vc.model_type != "clip_vision_model":
    raise io.WeightFileError(f"unsupported LLaVA vision tower {vc.model_type!r}: cirjax implements "
                             "CLIP ('clip_vision_model')")
  vision = vit_lib.vit_config_from_hf(vc.to_dict(), "clip")
  text = Phi3Config.from_hf(tc.to_dict())
  vfl = hf.vision_feature_layer
  return LlavaConfig(
      vision=vision, text=text,
      image_token_id=int(getattr(hf, "image_token_id", None) or hf.image_token_index),
      vision_feature_layer=tuple(vfl) if isinstance(vfl, (list, tuple)) else int(vfl),
      vision_feature_select_strategy=hf.vision_feature_select_strategy,
      projector_hidden_act=hf.projector_hidden_act,
      projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
      dtype=dtype, param_dtype=param_dtype)


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def llava_config_to_hf(config: LlavaConfig, token_ids: Mapping[str, int | None] | None = None
                       ) -> dict:
  """config.json contents for `transformers.LlavaForConditionalGeneration`. `token_ids`:
  bos/eos/pad ids for `text_config` (from the tokenizer, `tokenizer_token_ids`); a pad id in
  the model config wins over the tokenizer's."""
  vision = dict(vit_lib.vit_config_to_hf(config.vision), model_type="clip_vision_model")
  text = config.text.to_hf()
  for name in TOKEN_ID_FIELDS:
    if text.get(name) is None and (token_ids or {}).get(name) is not None:
      text[name] = int(token_ids[name])
  vfl = config.vision_feature_layer
  return dict(
      architectures=["LlavaForConditionalGeneration"], model_type="llava",
      vision_config=vision, text_config=text,
      image_token_index=config.image_token_id,
      image_seq_length=config.num_image_tokens,
      vision_feature_layer=list(vfl) if isinstance(vfl, tuple) else vfl,
      vision_feature_select_strategy=config.vision_feature_select_strategy,
      projector_hidden_act=config.projector_hidden_act,
      multimodal_projector_bias=config.projector_bias, tie_word_embeddings=False,
      torch_dtype="float32")


# ----------------------------------------------------------------------------- conversion


def convert_state_dict(state: Mapping[str, Any], config: LlavaConfig, *,
                       source: str = "state dict", dtype=np.float32,
                       report: dict | None = None) -> dict:
  """HF LLaVA state dict (numpy, or `jax.ShapeDtypeStruct` for the abstract mode) -> params.

  Raises `cirjax.convert.engine.KeyAccountingError` listing every missing/unexpected/
  mis-shaped key. `report`, if given, receives the detected prefixes and the keys skipped on
  purpose.
  """
  prefixes = detect_prefixes(state.keys(), source)
  reader = engine.StateDictReader(state, source=source, ignore=_IGNORED)
  head = prefixes["head"] is not None  # kept for generation and export (module docstring)
  target = abstract_params_with_head(config, head)
  params = engine.convert(reader, full_table(config, prefixes, head), target, dtype=dtype)
  reader.finish()
  engine.check_tree(params, target, source)
  if report is not None:
    report.update(prefixes=prefixes, skipped=[], lm_head=prefixes["head"],
                  ignored=reader.ignored, key_format=key_format_of(state.keys()))
  return params


def convert_abstract(hf_shapes: Mapping[str, tuple], config: LlavaConfig) -> dict:
  """Runs the converter on shapes only: {HF key: shape} -> tree of ShapeDtypeStruct."""
  return convert_state_dict(engine.abstract_state(hf_shapes), config,
                            source="abstract state dict")


def _abstract_decoder(config: Phi3Config) -> dict:
  ids, mask = jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32)
  init = nn.init(lambda m: m(m.embed(ids), mask), Phi3Decoder(config))
  return jax.eval_shape(init, jax.random.PRNGKey(0))["params"]


def decoder_params_from_hf(state: Mapping[str, Any], config: Phi3Config, prefix: str = "",
                           *, dtype=np.float32) -> dict:
  """Just the language model (HF `Phi3Model`/`LlamaModel` keys under `prefix`), strictly."""
  reader = engine.StateDictReader(state, source="decoder state dict", ignore=_IGNORED)
  rows = engine.prefixed(decoder_hf_table(config), (), prefix)
  params = engine.convert(reader, rows, _abstract_decoder(config), dtype=dtype)
  reader.finish()
  return params


def from_hf(src_dir: str | os.PathLike, *, dtype: str = "float32",
            param_dtype: str = "float32", report: dict | None = None) -> tuple[LlavaConfig, dict]:
  """Reads an HF LLaVA directory (config.json + safetensors/.bin, sharded or not).

  fp16/bf16 weights are upcast to fp32 (then `param_dtype` for the LM/projector when the
  model is loaded). Returns (LlavaConfig, params as numpy fp32).
  """
  src = Path(src_dir)
  if not (src / "config.json").exists():
    raise FileNotFoundError(f"{src}: not an HF model directory (no config.json)")
  config = llava_config_from_hf(src, dtype=dtype, param_dtype=param_dtype)
  state = io.read_state_dict(src)
  params = convert_state_dict(state, config, source=str(src), report=report)
  if "lm_head" not in params and _tied(json.loads((src / "config.json").read_text())):
    # transformers ties the head to the embedding on load: keep that head explicitly
    emb = params["language_model"]["embed_tokens"]["embedding"]
    params["lm_head"] = {"kernel": np.ascontiguousarray(np.asarray(emb, np.float32).T)}
  return config, params


def _tied(hf: Mapping) -> bool:
  text = hf.get("text_config") or {}
  return bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def params_to_hf(config: LlavaConfig, params: Any,
                 key_format: str = "hf4") -> dict[str, np.ndarray]:
  """cirjax params -> HF state dict (fp32 numpy) in the given key format (with the LM head
  when the params have one)."""
  if key_format not in KEY_FORMATS:
    raise ValueError(f"key_format must be one of {KEY_FORMATS}, got {key_format!r}")
  return engine.export(params, full_table(config, PREFIXES[key_format], "lm_head" in params))


NO_LM_HEAD_WARNING = (
    "warning: {src}: the model has no LM head (lm_head.weight): the export holds every "
    "weight the embedder uses, but transformers will initialise lm_head randomly, so "
    "generate() and logits are meaningless. Export a model converted from a checkpoint that "
    "has one (cirjax keeps the head from HF sources and through InstructCIR training).")


def to_hf(params: Any, config: LlavaConfig, dst_dir: str | os.PathLike, *,
          key_format: str = "hf4", max_shard_bytes: int = 5 * 1024 ** 3,
          token_ids: Mapping[str, int | None] | None = None, warn=None) -> Path:
  """Writes an HF LLaVA directory loadable by `LlavaForConditionalGeneration.from_pretrained`.

  `key_format='hf4'` (default) is the hub layout that transformers 4.x and 5.x both load.
  `token_ids`: bos/eos/pad ids for `text_config` (see `llava_config_to_hf`). A model without
  an LM head is written with a warning (`warn`, default stderr). Tokenizer files travel with
  `cirjax.convert.registry.export_hf`.
  """
  dst = Path(dst_dir)
  if "lm_head" not in params:
    (warn or _stderr)(NO_LM_HEAD_WARNING.format(src=dst))
  dst.mkdir(parents=True, exist_ok=True)
  io.write_safetensors_sharded(params_to_hf(config, params, key_format), dst,
                               max_shard_bytes=max_shard_bytes)
  hf = llava_config_to_hf(config, token_ids)
  (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  return dst


def _stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def tokenizer_token_ids(tokenizer: Any) -> dict[str, int | None]:
  """{bos,eos,pad}_token_id of an HF tokenizer (None where it has no such token)."""
  return {name: getattr(tokenizer, name, None) for name in TOKEN_ID_FIELDS}


def read_lm_head(path: str | os.PathLike) -> np.ndarray | None:
  """The LM head's [hidden, vocab] kernel (fp32) of an HF LLaVA directory (only that tensor
  is read from safetensors), or None when it has none."""
  keys = _HEAD_KEYS
  state = io.read_state_dict(path, keys=keys)
  for key in keys:
    if key in state:
      return np.ascontiguousarray(np.asarray(state[key], np.float32).T)
  return None

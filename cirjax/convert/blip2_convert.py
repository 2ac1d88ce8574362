"""BLIP-2 weights in and out: HF `Blip2ForImageTextRetrieval` and LAVIS state dicts.

* `from_hf(dir)`: an HF directory (config.json + safetensors or `.bin`, sharded or not) of
  `Blip2ForImageTextRetrieval` (EVA tower, e.g. `Salesforce/blip2-itm-vit-g`).
* `from_lavis(file, base=None)`: a LAVIS `Blip2Qformer`-layout state dict (`model.pth` of
  QuRe, SPRC, `blip2_feature_extractor`), EVA (`eva_clip_g`) or CLIP-L (`clip_L`,
  `pretrain_vitL`) tower; a LAVIS training-runner checkpoint (trained parameters only) with
  the pretrained state dict it started from as `base`.
  Widths, depths, patch size, cross-attention frequency and the number of kept ViT blocks
  are read from the tensors (LAVIS versions kept 21-23 CLIP-L blocks, 39 EVA blocks).
* `to_hf(params, cfg, dir)`: safetensors + config.json that
  `Blip2ForImageTextRetrieval.from_pretrained` loads (EVA towers only: HF has no CLIP-tower
  BLIP-2). HF has no learned temperature; it travels in config.json as `cirjax_temp` (the
  learned value) beside `cirjax_temperature_init` (the config's initial value).
* `write_hf_preprocessing(dir, cfg, tokenizer_dir)`: what `AutoTokenizer`,
  `AutoImageProcessor` and `AutoProcessor` (`Blip2Processor`) need beside the weights: the
  BERT tokenizer cirjax uses (with `[DEC]`) and a `BlipImageProcessor` config.

The tensors move by two tables, `hf_table(cfg)` and `lavis_table(cfg)`, run by
`cirjax.convert.engine` (so shape-only sources convert too). Key accounting is strict: every
source tensor is used exactly once (or skipped by an explicit rule: LAVIS's `Qformer.cls.*`
LM head and its `position_ids` buffer), every parameter is filled, and one
`KeyAccountingError` lists every missing, unexpected and mis-shaped key by name. Telling
sources apart and loading any of them is `cirjax.convert.registry`'s job.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from cirjax.convert import engine, io
from cirjax.data import images as images_lib
from cirjax.data import text as text_lib
from cirjax.data import tokenizer as tokenizer_lib
from cirjax.errors import CirjaxError
from cirjax.models import qformer as qf
from cirjax.models import vit as vit_lib
from cirjax.models.blip2 import Blip2Config, abstract_params

HF_ARCH = "Blip2ForImageTextRetrieval"
DEFAULT_TEMP = 0.07


class ConfigError(CirjaxError, ValueError):
  """A config file or value cannot describe a BLIP-2 retrieval model (names file and key)."""


# --------------------------------------------------------------------------------- configs

def _text_input_flag(qcfg: Mapping[str, Any], source: str) -> bool:
  """`use_qformer_text_input`, or the older `qformer_text_input` spelling (which transformers
  5 silently ignores). Retrieval checkpoints always have text FFNs, so absent means True
  when the weights have them: the caller re-checks against the tensors."""
  new, old = qcfg.get("use_qformer_text_input"), qcfg.get("qformer_text_input")
  if new is not None and old is not None and bool(new) != bool(old):
    raise ConfigError(f"{source}: qformer_config sets use_qformer_text_input={new} but the old "
                      f"spelling qformer_text_input={old}; remove one")
  val = new if new is not None else old
  return True if val is None else bool(val)


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> Blip2Config:
  """Blip2Config from an HF `Blip2Config` dict (config.json of a BLIP-2 ITM checkpoint)."""
  mt = hf.get("model_type")
  if mt not in ("blip-2", "blip_2"):
    raise ConfigError(f"{source}: model_type is {mt!r}, expected 'blip-2' "
                      f"({HF_ARCH}); for LLaVA use the llava converter")
  for key in ("vision_config", "qformer_config"):
    if not isinstance(hf.get(key), Mapping):
      raise ConfigError(f"{source}: missing {key!r}")
  vc, qc = hf["vision_config"], hf["qformer_config"]
  try:
    vision = vit_lib.vit_config_from_hf(vc, "eva")
  except (KeyError, ValueError) as e:
    raise ConfigError(f"{source}: vision_config: {e}") from None
  vision = vision.__class__(**{**vision.to_dict(), "post_layernorm": False})
  try:
    qformer = qf.QFormerConfig(
        hidden_size=int(qc.get("hidden_size", 768)),
        num_layers=int(qc.get("num_hidden_layers", 12)),
        num_heads=int(qc.get("num_attention_heads", 12)),
        intermediate_size=int(qc.get("intermediate_size", 3072)),
        cross_attention_frequency=int(qc.get("cross_attention_frequency", 2)),
        encoder_hidden_size=int(qc.get("encoder_hidden_size", vision.hidden_size)),
        vocab_size=int(qc.get("vocab_size", 30522)),
        max_position_embeddings=int(qc.get("max_position_embeddings", 512)),
        layer_norm_eps=float(qc.get("layer_norm_eps", 1e-12)),
        hidden_act=str(qc.get("hidden_act", "gelu")),
        use_text_input=_text_input_flag(qc, source),
        pad_token_id=int(qc.get("pad_token_id", 0) or 0),
        # Training-only (cirjax.models.qformer); HF's Blip2QFormerConfig defaults are 0.1.
        hidden_dropout_prob=float(qc.get("hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(qc.get("attention_probs_dropout_prob", 0.1)))
    if qformer.hidden_act not in vit_lib.ACTIVATIONS:
      raise io.WeightFileError(f"qformer hidden_act {qformer.hidden_act!r} is not supported")
    return Blip2Config(vision=vision, qformer=qformer,
                       num_query_tokens=int(hf.get("num_query_tokens", 32)),
                       embed_dim=int(hf.get("image_text_hidden_size", 256)),
                       ln_vision_eps=vision.layer_norm_eps,
                       temperature_init=float(hf.get("cirjax_temperature_init",
                                                     hf.get("cirjax_temp", DEFAULT_TEMP))))
  except ValueError as e:
    raise ConfigError(f"{source}: {e}") from None


def config_to_hf(cfg: Blip2Config) -> dict:
  """config.json for `Blip2ForImageTextRetrieval` (no transformers import needed)."""
  v, q = cfg.vision, cfg.qformer
  if v.variant != "eva":
    raise ConfigError("HF BLIP-2 has only the EVA vision tower (Blip2VisionModel); a model "
                      f"with a {v.variant!r} tower cannot be exported to {HF_ARCH}. Keep it as "
                      "a cirjax directory")
  if abs(cfg.ln_vision_eps - v.layer_norm_eps) > 0:
    raise ConfigError(f"HF BLIP-2 uses the vision layer_norm_eps ({v.layer_norm_eps}) for its "
                      f"final LayerNorm but this model's ln_vision eps is {cfg.ln_vision_eps} "
                      "(a LAVIS checkpoint): exporting would change its outputs")
  if not cfg.itm_head:
    raise ConfigError(f"{HF_ARCH} needs an itm_head; this model has none")
  vision = vit_lib.vit_config_to_hf(v)
  vision.update(model_type="blip_2_vision_model", qkv_bias=True)
  qformer = dict(model_type="blip_2_qformer", hidden_size=q.hidden_size,
                 num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                 intermediate_size=q.intermediate_size, hidden_act=q.hidden_act,
                 max_position_embeddings=q.max_position_embeddings,
                 layer_norm_eps=q.layer_norm_eps, pad_token_id=q.pad_token_id,
                 cross_attention_frequency=q.cross_attention_frequency,
                 encoder_hidden_size=q.encoder_hidden_size, vocab_size=q.vocab_size,
                 use_qformer_text_input=q.use_text_input,
                 hidden_dropout_prob=q.hidden_dropout_prob,
                 attention_probs_dropout_prob=q.attention_probs_dropout_prob)
  return {"architectures": [HF_ARCH], "model_type": "blip-2", "vision_config": vision,
          "qformer_config": qformer, "num_query_tokens": cfg.num_query_tokens,
          "image_text_hidden_size": cfg.embed_dim, "image_token_index": None,
          "cirjax_temp": cfg.temperature_init, "cirjax_temperature_init": cfg.temperature_init}


# ----------------------------------------------------------------------------- HF tensors

def _lin(dst, src, bias=True):
  rows = [(dst + ("kernel",), src + ".weight", "linear")]
  return rows + ([(dst + ("bias",), src + ".bias", "id")] if bias else [])


def _ln(dst, src):
  return [(dst + ("scale",), src + ".weight", "id"), (dst + ("bias",), src + ".bias", "id")]


def hf_table(cfg: Blip2Config) -> list:
  """Rows (cirjax path, HF key, transform) of every parameter but the temperature."""
  rows = engine.prefixed(vit_lib.vit_hf_table(cfg.vision), ("vision",), "vision_model.")
  rows += _ln(("ln_vision",), "vision_model.post_layernorm")
  rows += [(("query_tokens",), "query_tokens", "id"),
           (("embeddings", "word_embeddings"), "embeddings.word_embeddings.weight", "id"),
           (("embeddings", "position_embeddings"), "embeddings.position_embeddings.weight", "id")]
  rows += engine.prefixed(qf.qformer_table(cfg.qformer), ("qformer",), "qformer.")
  rows += _lin(("vision_projection",), "vision_projection")
  rows += _lin(("text_projection",), "text_projection")
  if cfg.itm_head:
    rows += _lin(("itm_head",), "itm_head")
  return rows


def params_from_hf_state(state: Mapping[str, np.ndarray], cfg: Blip2Config, *,
                         source: str = "state dict", temp: float | None = None) -> dict:
  """HF `Blip2ForImageTextRetrieval` state dict -> cirjax params (fp32 numpy). `temp`: the
  learned temperature (HF has no tensor for it; default: the config's initial value)."""
  reader = engine.StateDictReader(state, source=source)
  target = abstract_params(cfg)
  params = engine.convert(reader, hf_table(cfg), target)
  params["temp"] = np.asarray(cfg.temperature_init if temp is None else temp, np.float32)
  reader.finish()
  engine.check_tree(params, target, source)
  return params


def params_to_hf_state(params: Any, cfg: Blip2Config) -> dict[str, np.ndarray]:
  """cirjax params -> HF `Blip2ForImageTextRetrieval` state dict (fp32 numpy)."""
  return engine.export(params, hf_table(cfg))


def _check_text_ffn_flag(cfg: Blip2Config, keys, source: str) -> Blip2Config:
  """Trusts the tensors over a config that omits or misstates the text-input flag."""
  has = any(re.search(r"encoder\.layer\.\d+\.intermediate\.dense\.weight$", k) for k in keys)
  if has != cfg.qformer.use_text_input:
    print(f"note: {source}: the weights {'have' if has else 'lack'} Q-Former text "
          f"feed-forward blocks; using use_qformer_text_input={has}", file=sys.stderr)
    q = qf.QFormerConfig(**{**cfg.qformer.to_dict(), "use_text_input": has})
    cfg = cfg.replace(qformer=q)
  return cfg


def read_hf_config(src: str | os.PathLike) -> dict:
  f = Path(src) / "config.json"
  if not f.is_file():
    raise FileNotFoundError(f"{src}: no config.json (not an HF model directory)")
  try:
    return json.loads(f.read_text())
  except ValueError as e:
    raise ConfigError(f"{f}: not valid JSON ({e})") from None


def from_hf(src: str | os.PathLike) -> tuple[Blip2Config, dict]:
  """Reads an HF BLIP-2 ITM directory: returns (Blip2Config, params as fp32 numpy)."""
  src = Path(src)
  hf = read_hf_config(src)
  cfg = config_from_hf(hf, source=str(src / "config.json"))
  state = io.read_state_dict(src)
  cfg = _check_text_ffn_flag(cfg, state.keys(), str(src))
  if "itm_head.weight" not in state:
    cfg = cfg.replace(itm_head=False)
  temp = hf.get("cirjax_temp")
  return cfg, params_from_hf_state(state, cfg, source=str(src),
                                   temp=None if temp is None else float(temp))


def to_hf(params: Any, cfg: Blip2Config, dst: str | os.PathLike, *,
          max_shard_bytes: int = 5 * 1024 ** 3) -> Path:
  """Writes config.json + safetensors into `dst` (an existing, empty directory or a new one)."""
  hf = config_to_hf(cfg)
  # The learned temperature, not the config's initial value: every score is divided by it.
  hf["cirjax_temp"] = float(np.asarray(params["temp"], np.float32))
  state = params_to_hf_state(params, cfg)
  dst = Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  io.write_safetensors_sharded(state, dst, max_shard_bytes=max_shard_bytes)
  (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  return dst


# ------------------------------------------------------------- tokenizer and preprocessing

PREPROCESSOR_CONFIG = "preprocessor_config.json"
_PIL_BICUBIC = 3  # PIL.Image.BICUBIC, the resampling of cirjax's pipelines


def preprocessor_config(cfg: Blip2Config) -> dict:
  """`BlipImageProcessor` settings doing cirjax's BLIP-2 preprocessing (bicubic resize to
  the tower's size, x/255, OpenAI CLIP mean/std, RGB). On a square image they give cirjax's
  pixels exactly; cirjax's TargetPad and centre crop of elongated images are not expressible
  in `BlipImageProcessor`, which stretches them (docs/convert.md)."""
  s = cfg.vision.image_size
  return {"image_processor_type": "BlipImageProcessor", "do_convert_rgb": True,
          "do_resize": True, "size": {"height": s, "width": s}, "resample": _PIL_BICUBIC,
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": list(images_lib.CLIP_MEAN), "image_std": list(images_lib.CLIP_STD)}


def has_tokenizer(directory: str | os.PathLike | None) -> bool:
  """Whether `directory` holds a BERT vocab.txt or an HF tokenizer."""
  if directory is None or not Path(directory).is_dir():
    return False
  d = Path(directory)
  if tokenizer_lib.has_hf_tokenizer(d):
    return True
  try:
    tokenizer_lib.find_vocab(d)
    return True
  except FileNotFoundError:
    return False


NO_TOKENIZER_WARNING = (
    "warning: {src} holds no tokenizer (vocab.txt / tokenizer.json), so the BLIP-2 export at "
    "{dst} has none: AutoTokenizer.from_pretrained on it returns transformers' default for "
    "blip-2 (GPT-2, whose ids mean nothing to the Q-Former) and AutoProcessor fails. Put "
    "bert-base-uncased's vocab.txt (the one the model was trained with) next to the model and "
    "export again.")


def write_hf_preprocessing(dst: str | os.PathLike, cfg: Blip2Config,
                           tokenizer_dir: str | os.PathLike | None, warn=None) -> list[str]:
  """Writes `preprocessor_config.json` and, from `tokenizer_dir`'s vocab.txt or HF tokenizer,
  the tokenizer exactly as cirjax loads it (`cirjax.data.tokenizer.load_tokenizer`: uncased
  BERT + `[DEC]`, `model_max_length` 32), saved by transformers so `AutoTokenizer` gives
  cirjax's ids. Without a usable tokenizer, warns (`warn`, default stderr) naming the reason
  and writes no tokenizer files. Returns the file names written."""
  dst = Path(dst)
  warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
  (dst / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor_config(cfg), indent=2) + "\n")
  written = [PREPROCESSOR_CONFIG]
  if not has_tokenizer(tokenizer_dir):
    warn(NO_TOKENIZER_WARNING.format(src=tokenizer_dir, dst=dst))
    return written
  try:
    tok = tokenizer_lib.load_tokenizer(tokenizer_dir, "blip2")
    if len(tok) > cfg.qformer.vocab_size:
      raise io.WeightFileError(f"{tokenizer_dir}: the tokenizer has {len(tok)} tokens, the "
                               f"Q-Former's vocabulary only {cfg.qformer.vocab_size}: not this "
                               "model's tokenizer")
  except ValueError as e:  # the weights are still worth exporting; the tokenizer is not
    warn(f"warning: {e}; the BLIP-2 export at {dst} gets no tokenizer.json / "
         "tokenizer_config.json (AutoTokenizer and AutoProcessor will not give cirjax's ids)")
    return written
  # cirjax's text length: `padding="max_length", truncation=True` then gives cirjax's ids, also
  # through Blip2Processor, which cannot take max_length= for a retrieval model (transformers
  # 5 subtracts num_query_tokens, None here: no query placeholders precede the text).
  tok.model_max_length = min(text_lib.BLIP2_MAX_LENGTH, cfg.qformer.max_position_embeddings)
  before = set(os.listdir(dst))
  tok.save_pretrained(str(dst))
  return written + sorted(set(os.listdir(dst)) - before)


# -------------------------------------------------------------------------------- LAVIS

LAVIS_IGNORE = (r"^Qformer\.cls\.",)  # the BERT LM head: unused for retrieval
_VE = "visual_encoder."
_QB = "Qformer.bert."


def lavis_tower(keys) -> str:
  """'eva' or 'clip' from the visual_encoder keys of a LAVIS state dict."""
  keys = list(keys)
  if any(k.startswith(_VE + "blocks.") for k in keys):
    return "eva"
  if any(k.startswith(_VE + "transformer.resblocks.") for k in keys):
    return "clip"
  raise ConfigError("not a LAVIS BLIP-2 state dict: no visual_encoder.blocks.* (EVA) or "
                    "visual_encoder.transformer.resblocks.* (CLIP-L) keys; first keys: "
                    f"{sorted(keys)[:8]}")


def _layer_count(keys, pattern: str) -> int:
  idx = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
  if not idx:
    return 0
  if idx != set(range(max(idx) + 1)):
    raise ConfigError(f"layer indices matching {pattern!r} are not contiguous: {sorted(idx)}")
  return max(idx) + 1


def _shape(state, key, source):
  if key not in state:
    raise ConfigError(f"{source}: key {key!r} is missing (needed to infer the model shape)")
  return tuple(np.shape(state[key]))


# Head counts of the towers LAVIS ships (EVA-g: 1408 = 16 x 88; CLIP-L: 16 x 64; BERT-base).
_KNOWN_HEADS = {1408: 16, 1024: 16, 768: 12}


def _default_heads(width: int, what: str, source: str) -> int:
  if width in _KNOWN_HEADS:
    return _KNOWN_HEADS[width]
  if width % 64 == 0:
    return width // 64
  raise ConfigError(f"{source}: cannot infer the number of {what} attention heads of a "
                    f"{width}-wide layer from the weights; pass {what}_heads (CLI: "
                    f"--{what}-heads)")


def config_from_lavis(state: Mapping[str, np.ndarray], *, source: str = "state dict",
                      vision_heads: Optional[int] = None, qformer_heads: Optional[int] = None,
                      temperature: Optional[float] = None) -> Blip2Config:
  """Infers the Blip2Config of a LAVIS state dict from its tensors.

  Head counts are not visible in the weights: they default to those of the released towers
  (EVA-g 1408 and CLIP-L 1024: 16; BERT-base 768: 12), else width/64; pass `vision_heads` /
  `qformer_heads` for anything else.
  """
  keys = list(state)
  tower = lavis_tower(keys)
  if tower == "eva":
    d, c, p, _ = _shape(state, _VE + "patch_embed.proj.weight", source)
    n = _shape(state, _VE + "pos_embed", source)[1]
    inter = _shape(state, _VE + "blocks.0.mlp.fc1.weight", source)[0]
    layers = _layer_count(keys, re.escape(_VE) + r"blocks\.(\d+)\.")
    eps, act = 1e-6, "gelu"
  else:
    d, c, p, _ = _shape(state, _VE + "conv1.weight", source)
    n = _shape(state, _VE + "positional_embedding", source)[0]
    inter = _shape(state, _VE + "transformer.resblocks.0.mlp.c_fc.weight", source)[0]
    layers = _layer_count(keys, re.escape(_VE) + r"transformer\.resblocks\.(\d+)\.")
    eps, act = 1e-5, "quick_gelu"
  grid = int(round((n - 1) ** 0.5))
  if grid * grid != n - 1:
    raise ConfigError(f"{source}: {n} vision positions is not a square grid plus a class token")
  vheads = vision_heads or _default_heads(d, "vision", source)
  vision = vit_lib.ViTConfig(image_size=grid * p, patch_size=p, num_channels=c, hidden_size=d,
                             intermediate_size=inter, num_layers=layers, num_heads=vheads,
                             layer_norm_eps=eps, hidden_act=act, variant=tower,
                             post_layernorm=False)
  vocab, hidden = _shape(state, _QB + "embeddings.word_embeddings.weight", source)
  max_pos = _shape(state, _QB + "embeddings.position_embeddings.weight", source)[0]
  q_layers = _layer_count(keys, re.escape(_QB) + r"encoder\.layer\.(\d+)\.")
  cross = [i for i in range(q_layers)
           if _QB + f"encoder.layer.{i}.crossattention.self.query.weight" in state]
  if not cross or cross[0] != 0:
    raise ConfigError(f"{source}: Q-Former layer 0 has no cross-attention (layers with it: "
                      f"{cross})")
  freq = cross[1] - cross[0] if len(cross) > 1 else q_layers
  if cross != list(range(0, q_layers, freq)):
    raise ConfigError(f"{source}: Q-Former cross-attention layers {cross} are not every "
                      f"k-th layer")
  enc = _shape(state, _QB + "encoder.layer.0.crossattention.self.key.weight", source)[1]
  q_inter = _shape(state, _QB + "encoder.layer.0.intermediate_query.dense.weight", source)[0]
  has_text = _QB + "encoder.layer.0.intermediate.dense.weight" in state
  # Dropout rates are not in the weights: QFormerConfig's defaults are bert-base-uncased's
  # 0.1, the config LAVIS (and QuRe) build the Q-Former from.
  qformer = qf.QFormerConfig(hidden_size=hidden, num_layers=q_layers,
                             num_heads=qformer_heads or _default_heads(hidden, "qformer",
                                                                       source),
                             intermediate_size=q_inter, cross_attention_frequency=freq,
                             encoder_hidden_size=enc, vocab_size=vocab,
                             max_position_embeddings=max_pos, use_text_input=has_text)
  nq = _shape(state, "query_tokens", source)[1]
  embed = _shape(state, "vision_proj.weight", source)[0]
  if temperature is None:
    temperature = float(np.asarray(state["temp"], np.float32)) if "temp" in state else DEFAULT_TEMP
  return Blip2Config(vision=vision, qformer=qformer, num_query_tokens=nq, embed_dim=embed,
                     ln_vision_eps=1e-5, temperature_init=temperature,
                     itm_head="itm_head.weight" in state)


def _lavis_vit_table(v: vit_lib.ViTConfig) -> list:
  """Rows of LAVIS's `visual_encoder` (EVA `VisionTransformer` or CLIP-L `VisualTransformer`)."""
  if v.variant == "eva":
    rows = [(("class_embedding",), "cls_token", "lead2"),
            (("position_embedding",), "pos_embed", "lead1"),
            (("patch_embedding",), "patch_embed.proj.weight", "conv"),
            (("patch_bias",), "patch_embed.proj.bias", "id")]
  else:
    rows = [(("class_embedding",), "class_embedding", "id"),
            (("position_embedding",), "positional_embedding", "id"),
            (("patch_embedding",), "conv1.weight", "conv")]
    rows += _ln(("pre_layrnorm",), "ln_pre")
  for i in range(v.num_layers):
    d = (f"layers_{i}",)
    if v.variant == "eva":
      s = f"blocks.{i}"
      rows += [(d + ("self_attn", "qkv", "kernel"), s + ".attn.qkv.weight", "linear"),
               (d + ("self_attn", "qkv", "bias"), (s + ".attn.q_bias", s + ".attn.v_bias"),
                "qv_bias")]
      rows += _lin(d + ("self_attn", "projection"), s + ".attn.proj")
      names = dict(ln1=".norm1", ln2=".norm2", fc1=".mlp.fc1", fc2=".mlp.fc2")
    else:
      s = f"transformer.resblocks.{i}"
      qkv = tuple(d + ("self_attn", n) for n in ("q_proj", "k_proj", "v_proj"))
      rows += [(tuple(p + ("kernel",) for p in qkv), s + ".attn.in_proj_weight", "split3_linear"),
               (tuple(p + ("bias",) for p in qkv), s + ".attn.in_proj_bias", "split3")]
      rows += _lin(d + ("self_attn", "out_proj"), s + ".attn.out_proj")
      names = dict(ln1=".ln_1", ln2=".ln_2", fc1=".mlp.c_fc", fc2=".mlp.c_proj")
    rows += _ln(d + ("layer_norm1",), s + names["ln1"])
    rows += _ln(d + ("layer_norm2",), s + names["ln2"])
    rows += _lin(d + ("fc1",), s + names["fc1"]) + _lin(d + ("fc2",), s + names["fc2"])
  return rows


def lavis_table(cfg: Blip2Config) -> list:
  """Rows (cirjax path, LAVIS `Blip2Qformer` key, transform) of every parameter but the
  temperature (which LAVIS checkpoints may lack)."""
  rows = engine.prefixed(_lavis_vit_table(cfg.vision), ("vision",), _VE)
  rows += _ln(("ln_vision",), "ln_vision")
  rows += [(("query_tokens",), "query_tokens", "id"),
           (("embeddings", "word_embeddings"), _QB + "embeddings.word_embeddings.weight", "id"),
           (("embeddings", "position_embeddings"), _QB + "embeddings.position_embeddings.weight",
            "id")]
  rows += engine.prefixed(qf.qformer_table(cfg.qformer, style="lavis"), ("qformer",), _QB)
  rows += _lin(("vision_projection",), "vision_proj") + _lin(("text_projection",), "text_proj")
  if cfg.itm_head:
    rows += _lin(("itm_head",), "itm_head")
  return rows


def params_from_lavis_state(state: Mapping[str, np.ndarray], cfg: Blip2Config, *,
                            source: str = "state dict") -> dict:
  """LAVIS BLIP-2 state dict -> cirjax params (fp32 numpy), strictly accounted."""
  reader = engine.StateDictReader(state, source=source, ignore=LAVIS_IGNORE)
  pos_ids = _QB + "embeddings.position_ids"
  if pos_ids in reader:  # a persistent buffer in LAVIS's BERT: must be arange, else refuse
    ids = np.asarray(reader.take(pos_ids)).reshape(-1)
    if not np.array_equal(ids, np.arange(ids.size)):
      raise ConfigError(f"{source}: {pos_ids} is not 0..N-1; custom position ids are not "
                        "supported")
  target = abstract_params(cfg)
  params = engine.convert(reader, lavis_table(cfg), target)
  temp = np.asarray(reader.take("temp"), np.float32) if "temp" in reader else cfg.temperature_init
  params["temp"] = np.asarray(temp, np.float32).reshape(())
  reader.finish()
  if reader.ignored:
    print(f"note: {source}: skipped {len(reader.ignored)} tensor(s) unused for retrieval "
          f"(Qformer.cls.* language-model head)", file=sys.stderr)
  engine.check_tree(params, target, source)
  return params


# The parameter groups (top-level names) every LAVIS `Blip2Qformer` state dict holds, and
# what each is; `itm_head` and `temp` are optional.
LAVIS_GROUPS = {"visual_encoder": "the ViT", "ln_vision": "the LayerNorm after the ViT",
                "Qformer": "the Q-Former", "query_tokens": "the query tokens",
                "vision_proj": "the image projection", "text_proj": "the text projection"}


def missing_lavis_groups(keys) -> list[str]:
  """The `LAVIS_GROUPS` of which a state dict holds no tensor."""
  present = {k.split(".", 1)[0] for k in keys}
  return [g for g in LAVIS_GROUPS if g not in present]


def _refuse_partial(state: Mapping[str, Any], source: str) -> None:
  """A LAVIS training runner (`RunnerBase._save_checkpoint`) saves only the parameters that
  required gradients, under {"model": ..., "optimizer": ..., "config": ..., "epoch": ...}:
  with a frozen ViT there is no `visual_encoder.*` at all. Say so, and what to pass."""
  missing = missing_lavis_groups(state)
  if not missing or not any(k.startswith(("Qformer.", "query_tokens")) for k in state):
    return
  groups = ", ".join(f"{g}.* ({LAVIS_GROUPS[g]})" for g in missing)
  raise ConfigError(
      f"{source}: a partial LAVIS BLIP-2 state dict ({len(state)} tensors), as LAVIS's "
      f"training runner saves it: it keeps only the trained parameters, and these parameter "
      f"groups are missing: {groups}. Pass the pretrained checkpoint the run started from, "
      f"which holds the frozen ones: cirjax convert {source} DST --base PRETRAINED.pth (e.g. "
      "LAVIS's blip2_pretrained.pth, or blip2_pretrained_vitL.pth for QuRe / SPRC; see "
      "docs/weights.md)")


def from_lavis(path: str | os.PathLike, *, base: str | os.PathLike | None = None,
               **kw) -> tuple[Blip2Config, dict]:
  """Reads a LAVIS BLIP-2 checkpoint (`model.pth` / `.pt` / `.bin` / `.safetensors`).

  `base`: the full pretrained state dict a training-runner checkpoint (trained parameters
  only) started from; every tensor the checkpoint lacks is taken from it, every tensor it has
  wins. Key accounting then runs on the union, as on a full state dict."""
  state = io.read_state_dict(path)
  source = str(path)
  if base is not None:
    base_state = io.read_state_dict(base)
    if missing_lavis_groups(base_state):
      raise ConfigError(f"--base {base}: not a full LAVIS BLIP-2 state dict (no "
                        f"{', '.join(g + '.*' for g in missing_lavis_groups(base_state))})")
    filled = sorted(set(base_state) - set(state))
    groups = sorted({k.split(".", 1)[0] for k in filled})
    print(f"note: {path}: {len(filled)} tensor(s) taken from --base {base} "
          f"({', '.join(groups) or 'none'})", file=sys.stderr)
    state = {**base_state, **state}
    source = f"{path} + --base {base}"
  else:
    _refuse_partial(state, source)
  cfg = config_from_lavis(state, source=source, **kw)
  try:
    return cfg, params_from_lavis_state(state, cfg, source=source)
  except engine.KeyAccountingError as e:
    if base is None and e.missing and not (e.unexpected or e.mismatched or e.mistyped):
      e.args = (f"{e}\n  (a LAVIS training-runner checkpoint keeps only the trained "
                "parameters: pass the pretrained checkpoint as --base PRETRAINED.pth)",)
    raise

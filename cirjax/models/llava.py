"""LLaVA-Phi as an embedder (InstructCIR's backbone), pure-functional Flax.

    image --CLIP ViT (cirjax.models.vit)--> hidden_states[vision_feature_layer] (CLS dropped)
          --projector: linear -> exact GELU -> linear--> image features [n_img, P, H]
    ids   --embed_tokens--> [B, T, H], image features scattered into the `<image>` positions
          --Phi-3 / Llama decoder (cirjax.models.phi3)--> final-norm hidden states
    embedding = L2-normalised final hidden state of the last token (prompts are left-padded)

This reproduces `transformers.LlavaForConditionalGeneration(...)(input_ids, pixel_values,
attention_mask, output_hidden_states=True)`: images are consumed in order of appearance over
the flattened batch (HF `masked_scatter`), the number of `<image>` tokens must equal the
number of image features, and positions are `arange(T)` as HF's forward uses them.

Public API:
  * `LlavaConfig`, `LlavaModel` (the linen module), `init_params`, `abstract_params`;
  * pure functions `forward`, `hidden_states`, `embed`, `image_features`,
    `vision_features`, all `(params, config, ...)` (jit-able with `config` static:
    `jax.jit(embed, static_argnames="config")`) and the host-side `check_inputs` they run
    first on concrete inputs; the compute dtype, param dtype and remat are the config's.
A loaded LLaVA (`cirjax.load_llava(path)`) is a `cirjax.eval.model.Model`, the type every
family loads into, with its prompt-level verbs (`image`, `text`, `query`, `score`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cirjax.models.phi3 import Linear, Phi3Config, Phi3Decoder, check_positions
from cirjax.models import layer_stack
from cirjax.models.remat import DEFAULT_POLICY, check_remat_policy
from cirjax.models.attention import check_attention_impl
from cirjax.models.phi3 import layer_stacks as phi3_layer_stacks
from cirjax.models.vit import ViTConfig, VisionTransformer, check_dtype, check_pixels
from cirjax.models.vit import layer_stacks as vit_layer_stacks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """Static description of a LLaVA model; hashable (a `jax.jit` static argument).

  Attributes:
    vision: the CLIP tower (`ViTConfig`, variant 'clip').
    text: the language model (`Phi3Config`, fused Phi-3 or split Llama layout).
    image_token_id: id of the `<image>` placeholder token.
    vision_feature_layer: CLIP hidden state(s) to use (HF indexing, -2 = second to last);
      an int or a tuple of ints (concatenated along features).
    vision_feature_select_strategy: 'default' drops the CLS token, 'full' keeps it.
    projector_hidden_act: 'gelu' (exact erf) as every LLaVA-Phi checkpoint uses.
    projector_bias: whether the projector linears have biases.
    dtype: compute dtype ('float32' | 'bfloat16' | 'float16'); norms and softmax stay fp32.
    param_dtype: dtype the language model and projector params are stored in (the CLIP
      tower keeps fp32 params).
    remat: rematerialise the CLIP and decoder layers in the backward pass.
    remat_policy: what a rematerialised layer keeps (`cirjax.models.remat`).
    attention_impl: attention kernel of CLIP and the decoder ('xla' | 'cudnn' | 'auto' |
      'einsum', see `cirjax.models.attention`); parity runs use 'xla' in fp32.
    scan_layers: run the CLIP blocks and the decoder layers as `nn.scan`s with params (and
      LoRA adapters) stacked on a leading layer axis; the functions here take params in either
      layout (`stack_layers` / `unstack_layers` convert).
  """
  vision: ViTConfig
  text: Phi3Config
  image_token_id: int = 32000
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "xla"
  scan_layers: bool = False
  remat_policy: str = DEFAULT_POLICY

  def __post_init__(self):
    check_attention_impl("LlavaConfig", self.attention_impl)
    check_remat_policy("LlavaConfig", self.remat_policy)
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError("vision_feature_select_strategy must be 'default' or 'full', got "
                       f"{self.vision_feature_select_strategy!r}")
    if self.projector_hidden_act not in ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu"):
      raise ValueError(f"unsupported projector_hidden_act {self.projector_hidden_act!r}")
    for name in ("dtype", "param_dtype"):
      check_dtype("LlavaConfig", name, getattr(self, name))
    n = self.vision.num_layers
    for layer in self.feature_layers:
      if not -(n + 1) <= layer <= n:
        raise ValueError(f"vision_feature_layer {layer} is out of range for a vision tower "
                         f"with {n} layers (hidden_states has {n + 1} entries)")

  @property
  def feature_layers(self) -> tuple[int, ...]:
    v = self.vision_feature_layer
    return (v,) if isinstance(v, int) else tuple(v)

  @property
  def num_image_tokens(self) -> int:
    """`<image>` tokens per image: (image_size / patch_size)^2 (+1 under 'full')."""
    return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "LlavaConfig":
    return dataclasses.replace(self, **kw)

  def summary(self) -> str:
    return (f"{self.text.model_type}/{self.text.layout} {self.text.num_layers} layers, "
            f"{self.vision.image_size}px CLIP, {self.dtype}")

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["vision"] = self.vision.to_dict()
    d["text"] = dataclasses.asdict(self.text)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LlavaConfig":
    d = dict(d)
    text = dict(d.pop("text"))
    for k in ("rope_short_factor", "rope_long_factor"):
      if text.get(k) is not None:
        text[k] = tuple(text[k])
    vfl = d.get("vision_feature_layer", -2)
    if isinstance(vfl, list):
      d["vision_feature_layer"] = tuple(vfl)
    return cls(vision=ViTConfig.from_dict(d.pop("vision")), text=Phi3Config(**text), **d)


class Projector(nn.Module):
  """LlavaMultiModalProjector: linear_1 -> act -> linear_2."""
  hidden_size: int
  act: str = "gelu"
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
              lora_scale=self.lora_scale, lora_dropout=self.lora_dropout)
    x = Linear(self.hidden_size, name="linear_1", **kw)(x, deterministic)
    if self.act == "gelu":
      x = jax.nn.gelu(x, approximate=False)  # HF "gelu" is the exact erf form
    elif self.act == "gelu_pytorch_tanh":
      x = jax.nn.gelu(x, approximate=True)
    elif self.act == "quick_gelu":
      x = x * jax.nn.sigmoid(1.702 * x)
    else:
      x = jax.nn.silu(x)
    return Linear(self.hidden_size, name="linear_2", **kw)(x, deterministic)


class LlavaOutput(NamedTuple):
  last_hidden_state: Array              # [B, T, H] after the final norm
  hidden_states: tuple | None           # HF convention, num_layers + 1 entries
  image_features: Array | None          # [n_images, P, H] projector output


def merge_image_features(inputs_embeds: Array, input_ids: Array, image_token_id: int,
                         features: Array) -> Array:
  """Writes `features` ([n_img, P, H]) into the `<image>` positions of `inputs_embeds`.

  Static shapes: the k-th image token of the flattened batch takes the k-th feature row
  (a cumsum-indexed gather), exactly HF's `masked_scatter`. Counts are checked on host by
  `check_inputs`; here surplus tokens would clamp to the last feature.
  """
  b, t, h = inputs_embeds.shape
  flat_mask = (input_ids == image_token_id).reshape(-1)
  rows = features.reshape(-1, h).astype(inputs_embeds.dtype)
  idx = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, rows.shape[0] - 1)
  merged = jnp.where(flat_mask[:, None], rows[idx], inputs_embeds.reshape(-1, h))
  return merged.reshape(b, t, h)


class LlavaModel(nn.Module):
  """The full model; `lora_scale`/`lora_dropout` apply to adapters in the `lora` collection."""
  config: LlavaConfig
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  def setup(self):
    c = self.config
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    self.vision_tower = VisionTransformer(c.vision, dtype=dt, remat=c.remat,
                                          attention_impl=c.attention_impl,
                                          scan_layers=c.scan_layers,
                                          remat_policy=c.remat_policy)
    self.multi_modal_projector = Projector(
        c.text.hidden_size, c.projector_hidden_act, c.projector_bias, dtype=dt,
        param_dtype=pdt, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout)
    self.language_model = Phi3Decoder(c.text, dtype=dt, param_dtype=pdt,
                                      lora_scale=self.lora_scale,
                                      lora_dropout=self.lora_dropout, remat=c.remat,
                                      attention_impl=c.attention_impl,
                                      scan_layers=c.scan_layers,
                                      remat_policy=c.remat_policy)

  def vision_features(self, pixels: Array) -> Array:
    """The selected CLIP hidden state(s) before the projector, [n_images, P, D]."""
    c = self.config
    n = c.vision.num_layers
    idx = [l % (n + 1) for l in c.feature_layers]
    # Run the tower only as deep as the deepest layer read (LLaVA skips the last one).
    out = self.vision_tower(pixels, output_hidden_states=True, num_layers=max(idx))
    feats = [out.hidden_states[i] for i in idx]
    if c.vision_feature_select_strategy == "default":
      feats = [f[:, 1:] for f in feats]
    return feats[0] if len(feats) == 1 else jnp.concatenate(feats, axis=-1)

  def image_features(self, pixels: Array, deterministic: bool = True) -> Array:
    return self.multi_modal_projector(self.vision_features(pixels), deterministic)

  def __call__(self, input_ids: Array, attention_mask: Array, pixels: Array | None = None,
               position_ids: Array | None = None, deterministic: bool = True,
               output_hidden_states: bool = False) -> LlavaOutput:
    embeds = self.language_model.embed(input_ids)
    feats = None
    if pixels is not None:
      feats = self.image_features(pixels, deterministic)
      embeds = merge_image_features(embeds, input_ids, self.config.image_token_id, feats)
    last, states = self.language_model(embeds, attention_mask, position_ids, deterministic,
                                       output_hidden_states)
    return LlavaOutput(last, states, feats)

  def init_all(self, input_ids, attention_mask, pixels):
    """Init entry point touching every parameter (incl. the CLIP layers LLaVA never reads)."""
    out = self(input_ids, attention_mask, pixels)
    self.vision_tower(pixels)
    return out


# ----------------------------------------------------------------------------- params


def tiny_config(*, num_layers: int = 2, **kw) -> LlavaConfig:
  """A few-kilobyte LLaVA (CLIP ViT + GQA Phi-3) for tests and smoke runs; 4 image tokens,
  image token id 63. `kw`: further LlavaConfig fields (e.g. dtype='bfloat16')."""
  vision = ViTConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                     num_layers=num_layers, num_heads=4, variant="clip", post_layernorm=False)
  text = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_layers=num_layers, num_heads=4, num_kv_heads=2)
  return LlavaConfig(vision=vision, text=text, image_token_id=63, **kw)


def _dummy_inputs(config: LlavaConfig):
  v = config.vision
  ids = jnp.zeros((1, 4), jnp.int32)
  pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
  return ids, jnp.ones((1, 4), jnp.int32), pixels


def init_params(config: LlavaConfig, rng: jax.Array | None = None) -> dict:
  """Random params (tests, shape checks); real weights come from `cirjax.convert.registry.load`."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  return LlavaModel(config).init(rng, *_dummy_inputs(config), method=LlavaModel.init_all)["params"]


def abstract_params(config: LlavaConfig) -> dict:
  """The param tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
  ids, mask, pixels = _dummy_inputs(config)
  return jax.eval_shape(
      lambda r: LlavaModel(config).init(r, ids, mask, pixels, method=LlavaModel.init_all),
      jax.random.PRNGKey(0))["params"]


# ----------------------------------------------------------------------------- pure functions


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def check_inputs(input_ids: Any, attention_mask: Any, pixels: Any, config: LlavaConfig, *,
                 require_left_padding: bool = False) -> None:
  """Host-side validation with errors naming the cause (skipped by callers under tracing)."""
  ids = np.asarray(input_ids)
  mask = np.asarray(attention_mask)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq_len], got shape {ids.shape}")
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
  if ids.size and (ids.min() < 0 or ids.max() >= config.text.vocab_size):
    raise ValueError(f"input_ids contain ids outside the vocabulary [0, "
                     f"{config.text.vocab_size}): min {ids.min()}, max {ids.max()}")
  check_positions(config.text, ids.shape[1])
  if require_left_padding and ids.size and not np.all(mask[:, -1] > 0):
    rows = np.nonzero(mask[:, -1] == 0)[0].tolist()
    raise ValueError(f"embed() takes the last position as the embedding, so prompts must be "
                     f"left-padded; rows {rows[:8]} end in padding (tokenizer padding_side="
                     f"'left', see cirjax.prompts)")
  n_tokens = int((ids == config.image_token_id).sum())
  if pixels is None:
    if n_tokens:
      raise ValueError(f"input_ids contain {n_tokens} image tokens (id "
                       f"{config.image_token_id}) but no pixels were given")
    return
  check_pixels(pixels, config.vision)
  n_images = int(np.shape(pixels)[0])
  n_feats = n_images * config.num_image_tokens
  if n_tokens == 0:
    raise ValueError(f"pixels for {n_images} image(s) were given but input_ids contain no "
                     f"image token (id {config.image_token_id}); render prompts with "
                     f"cirjax.prompts so each image expands to {config.num_image_tokens} tokens")
  if n_tokens > n_feats:
    raise ValueError(f"input_ids contain {n_tokens} image tokens but {n_images} image(s) give "
                     f"only {n_feats} features ({config.num_image_tokens} per image); more "
                     f"image tokens than features")
  if n_tokens < n_feats:
    raise ValueError(f"input_ids contain {n_tokens} image tokens but {n_images} image(s) give "
                     f"{n_feats} features ({config.num_image_tokens} per image); each image "
                     f"needs exactly {config.num_image_tokens} tokens")


def layer_stacks(config: LlavaConfig) -> list[layer_stack.Stack]:
  """The runs of repeated layers (CLIP blocks, decoder layers) in the param tree."""
  return (layer_stack.prefixed(vit_layer_stacks(config.vision), ("vision_tower",))
          + layer_stack.prefixed(phi3_layer_stacks(config.text), ("language_model",)))


def stack_layers(params: Any, config: LlavaConfig) -> dict:
  """Per-layer params or LoRA adapter params (the converters' and PEFT's layout) -> the
  `scan_layers` layout."""
  return layer_stack.stack(params, layer_stacks(config))


def unstack_layers(params: Any, config: LlavaConfig) -> dict:
  """`scan_layers` (stacked) params or adapter params -> the per-layer layout."""
  return layer_stack.unstack(params, layer_stacks(config))


def _variables(params, lora, config: LlavaConfig):
  # Either layout runs: one the config does not use is converted inside the program.
  stacks = layer_stacks(config)
  variables = {"params": layer_stack.to_layout(params, stacks, config.scan_layers)}
  if lora is not None:
    variables["lora"] = layer_stack.to_layout(lora.params, stacks, config.scan_layers)
  return variables


def _module(config: LlavaConfig, lora) -> LlavaModel:
  if lora is None:
    return LlavaModel(config)
  return LlavaModel(config, lora_scale=lora.config.scale, lora_dropout=lora.config.dropout)


def forward(params: Any, config: LlavaConfig, input_ids: Array, attention_mask: Array,
            pixels: Array | None = None, *, lora: Any = None, rng: jax.Array | None = None,
            deterministic: bool = True, output_hidden_states: bool = False,
            position_ids: Array | None = None) -> LlavaOutput:
  """Full forward. `lora`: a `cirjax.lora.Adapter` or None. `rng` feeds LoRA dropout when
  `deterministic=False`."""
  if _is_concrete(input_ids, attention_mask, pixels):
    check_inputs(input_ids, attention_mask, pixels, config)
  if (not deterministic and rng is None and lora is not None
      and getattr(lora.config, "dropout", 0.0) > 0.0):
    raise ValueError("deterministic=False with a LoRA adapter that has dropout "
                     f"{lora.config.dropout} needs rng= (a jax.random key for the dropout masks)")
  rngs = {"dropout": rng} if (rng is not None and not deterministic) else {}
  return _module(config, lora).apply(
      _variables(params, lora, config), input_ids, attention_mask, pixels, position_ids,
      deterministic, output_hidden_states, rngs=rngs)


def hidden_states(params: Any, config: LlavaConfig, input_ids: Array, attention_mask: Array,
                  pixels: Array | None = None, *, lora: Any = None,
                  **kw) -> tuple[Array, ...]:
  """HF-convention hidden states: [0] = merged input embeddings, [i] = layer i output,
  [-1] = final-norm output (num_layers + 1 entries, each [B, T, H])."""
  return forward(params, config, input_ids, attention_mask, pixels, lora=lora,
                 output_hidden_states=True, **kw).hidden_states


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """torch.nn.functional.normalize in fp32: x / max(||x||, eps)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def embed(params: Any, config: LlavaConfig, input_ids: Array, attention_mask: Array,
          pixels: Array | None = None, *, lora: Any = None, rng: jax.Array | None = None,
          deterministic: bool = True) -> Array:
  """[B, H] fp32 L2-normalised final hidden state at the last position (left padding)."""
  if _is_concrete(input_ids, attention_mask, pixels):
    check_inputs(input_ids, attention_mask, pixels, config, require_left_padding=True)
  out = forward(params, config, input_ids, attention_mask, pixels, lora=lora, rng=rng,
                deterministic=deterministic)
  return l2_normalize(out.last_hidden_state[:, -1])


def image_features(params: Any, config: LlavaConfig, pixels: Array) -> Array:
  """Projector output [n_images, P, H] (the features merged at `<image>` tokens)."""
  return LlavaModel(config).apply(_variables(params, None, config), pixels,
                                  method=LlavaModel.image_features)


def vision_features(params: Any, config: LlavaConfig, pixels: Array) -> Array:
  """The selected CLIP hidden state(s) before the projector, [n_images, P, D]."""
  return LlavaModel(config).apply(_variables(params, None, config), pixels,
                                  method=LlavaModel.vision_features)


def cast_params(params: Any, config: LlavaConfig) -> Any:
  """Casts language-model/projector params to `config.param_dtype` (CLIP stays fp32)."""
  pdt = jnp.dtype(config.param_dtype)
  out = dict(params)
  for k in ("language_model", "multi_modal_projector"):
    out[k] = jax.tree.map(lambda x: jnp.asarray(x, pdt), params[k])
  out["vision_tower"] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params["vision_tower"])
  return out


# ----------------------------------------------------------------------------- loading


def load_tokenizer(path: str | os.PathLike):
  """The HF tokenizer saved in `path` (tokenizer.json / tokenizer_config.json), or None."""
  p = Path(path)
  if not ((p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists()):
    return None
  # transformers is heavy and optional: only models saved with a tokenizer need it
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  tok = AutoTokenizer.from_pretrained(str(p))
  tok.padding_side = "left"
  return tok

"""BLIP-2 for composed image retrieval (QuRe): the vision tower, the Q-Former and the heads.

The numerics are those of HF `Blip2ForImageTextRetrieval` (EVA tower) and of LAVIS
`Blip2Qformer` / `blip2_qure` (EVA or CLIP-L tower); see docs/reference_semantics.md
(QuRe model, Numerics).

The one call surface: pure functions of `(params, cfg, inputs)`, used by training,
evaluation, search, parity and the benchmarks alike:

    vision_features(params, cfg, pixels)              -> [B, S, E] raw ViT output (frozen part)
    encode_target_from_features(params, cfg, feats)   -> [B, Q, D] target features
    encode_image(params, cfg, pixels)                 -> [B, Q, D] target features
    encode_text(params, cfg, ids, mask)               -> [B, D]    ITC text feature (CLS)
    compose_from_features(params, cfg, feats, ids, mask) -> [B, D] composed query
    compose(params, cfg, pixels, ids, mask)           -> [B, D]    composed query
    query_hidden_states(params, cfg, feats)           -> [B, Q, H] the query-only Q-Former pass
    joint_hidden_states(params, cfg, feats, ids, mask) -> [B, Q+L, H] the joint Q-Former pass
    itm_logits(params, cfg, feats, ids, mask)         -> [B, 2]    HF's image-text matching head
    score(query, targets)                             -> [Bq, Bt]  max over the Q tokens
    logits(params, query, targets)                    -> score / temp (QuRe's training logits)
    init_blip2(rng, cfg)                              -> random params of the full tree

The dtype policy is the config's: `cfg.dtype` (Q-Former compute), `cfg.vision_dtype` (ViT
compute, default `cfg.dtype`), `cfg.param_dtype` (stored Q-Former/projection params; the ViT,
LayerNorms and `temp` stay fp32) and `cfg.remat`. Each function checks its inputs' shapes
(and, outside a trace, token ids) with errors naming the bad value, then runs one program
compiled per (cfg, shapes): eager calls are jitted, and calls inside a caller's `jax.jit`
inline. All outputs of the encoders are fp32 and L2-normalised. `vision_features` stops
*before* the final vision LayerNorm (`ln_vision`, HF's `post_layernorm`), which QuRe trains:
a trainer caches the frozen ViT output once and runs `*_from_features` in its step.

Dropout: `encode_target_from_features`, `compose_from_features`, `encode_image`, `compose`
and `encode_text` take a keyword `dropout_rng`; given one (a training step), the Q-Former
drops at its config's rates (`QFormerConfig.hidden_dropout_prob`,
`attention_probs_dropout_prob`), as the reference trains in `model.train()` mode. Without one
(the default: encoding, mining, evaluation, export, the feature cache) the model is
deterministic and the rates change nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cirjax.errors import ConfigError
from cirjax.models import layer_stack
from cirjax.models.scoring import max_over_tokens
from cirjax.models.remat import DEFAULT_POLICY, check_remat_policy
from cirjax.models import qformer as qf
from cirjax.models import vit as vit_lib
from cirjax.models.attention import check_attention_impl
from cirjax.models.vit import LayerNorm

# L2 normalisation floor, as torch.nn.functional.normalize (eps=1e-12 on the norm).
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Blip2Config:
  """A BLIP-2 retrieval model; hashable (the static argument of every function here).

  Attributes:
    vision: the ViT (its own `post_layernorm` must be off: the final full-sequence LayerNorm
      is `ln_vision` here, so that frozen ViT features can be cached before it).
    qformer: the Q-Former; `encoder_hidden_size` must equal the ViT width.
    num_query_tokens: learned query tokens (32).
    embed_dim: width of the projected features (HF `image_text_hidden_size`, 256).
    ln_vision_eps: eps of `ln_vision` (HF: the vision `layer_norm_eps`, 1e-6; LAVIS: 1e-5).
    temperature_init: initial value of the learned temperature `temp` (0.07).
    itm_head: whether the image-text matching head exists (kept for round trips).
    dtype: compute dtype of the Q-Former ('float32' | 'bfloat16' | 'float16'); softmax,
      norms, projections and outputs stay fp32.
    vision_dtype: compute dtype of the ViT; None means `dtype` (QuRe runs its frozen ViT in
      fp16; parity needs fp32).
    param_dtype: dtype of the Q-Former, query-token and projection params (ViT, LayerNorms
      and `temp` stay fp32).
    remat: rematerialise ViT and Q-Former layers in the backward pass.
    remat_policy: what a rematerialised layer keeps ('full' | 'dots_saveable' |
      'dots_with_no_batch_dims_saveable', see `cirjax.models.remat`).
    attention_impl: attention kernel of the ViT and Q-Former ('xla' | 'cudnn' | 'auto' |
      'einsum', see `cirjax.models.attention`); parity runs use 'xla' in fp32.
    scan_layers: run the ViT blocks and the Q-Former's layer pairs as `nn.scan`s (one compiled
      block each) with params stacked on a leading layer axis; the functions here take params
      in either layout (`stack_layers` / `unstack_layers` convert).
  """
  vision: vit_lib.ViTConfig = dataclasses.field(
      default_factory=lambda: vit_lib.ViTConfig(post_layernorm=False))
  qformer: qf.QFormerConfig = dataclasses.field(default_factory=qf.QFormerConfig)
  num_query_tokens: int = 32
  embed_dim: int = 256
  ln_vision_eps: float = 1e-6
  temperature_init: float = 0.07
  itm_head: bool = True
  dtype: str = "float32"
  vision_dtype: Optional[str] = None
  param_dtype: str = "float32"
  remat: bool = False
  attention_impl: str = "xla"
  scan_layers: bool = False
  remat_policy: str = DEFAULT_POLICY

  def __post_init__(self):
    check_attention_impl("Blip2Config", self.attention_impl)
    check_remat_policy("Blip2Config", self.remat_policy)
    if self.scan_layers:
      qf.check_scannable(self.qformer)
    if self.vision.post_layernorm:
      raise ValueError("Blip2Config.vision.post_layernorm must be False: BLIP-2's final vision "
                       "LayerNorm is Blip2Config's ln_vision")
    if self.qformer.encoder_hidden_size != self.vision.hidden_size:
      raise ValueError(f"Q-Former encoder_hidden_size {self.qformer.encoder_hidden_size} != "
                       f"vision hidden_size {self.vision.hidden_size}")
    if self.num_query_tokens < 1:
      raise ValueError(f"num_query_tokens must be >= 1, got {self.num_query_tokens}")
    for name in ("dtype", "param_dtype") + (("vision_dtype",) if self.vision_dtype else ()):
      vit_lib.check_dtype("Blip2Config", name, getattr(self, name))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def vision_compute_dtype(self):
    return jnp.dtype(self.vision_dtype or self.dtype)

  def summary(self) -> str:
    v, q = self.vision, self.qformer
    return (f"{v.variant} ViT {v.hidden_size}x{v.num_layers}, Q-Former {q.hidden_size}x"
            f"{q.num_layers}, {self.num_query_tokens} queries, {self.embed_dim}-d, "
            f"{self.vision_compute_dtype.name}/{self.dtype}")

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["vision"] = self.vision.to_dict()
    d["qformer"] = self.qformer.to_dict()
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Blip2Config":
    """Also reads dicts saved before the dtype fields existed (they take their defaults)."""
    d = dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown Blip2Config field(s): {unknown}")
    if "vision" in d and not isinstance(d["vision"], vit_lib.ViTConfig):
      d["vision"] = vit_lib.ViTConfig.from_dict(d["vision"])
    if "qformer" in d and not isinstance(d["qformer"], qf.QFormerConfig):
      d["qformer"] = qf.QFormerConfig.from_dict(d["qformer"])
    return cls(**d)

  def replace(self, **kw) -> "Blip2Config":
    return dataclasses.replace(self, **kw)


def tiny_config(*, vision_variant: str = "eva", cross_attention_frequency: int = 2,
                num_layers: int = 2, **kw) -> Blip2Config:
  """A few-kilobyte BLIP-2 with every component (tests, smoke runs, synthetic training).
  `kw`: further Blip2Config fields (e.g. dtype='bfloat16')."""
  clip = vision_variant == "clip"
  vision = vit_lib.ViTConfig(
      image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=num_layers,
      num_heads=4, layer_norm_eps=1e-5 if clip else 1e-6,
      hidden_act="quick_gelu" if clip else "gelu", variant=vision_variant, post_layernorm=False)
  qformer = qf.QFormerConfig(
      hidden_size=32, num_layers=num_layers, num_heads=4, intermediate_size=64,
      cross_attention_frequency=cross_attention_frequency, encoder_hidden_size=32,
      vocab_size=100, max_position_embeddings=40)
  return Blip2Config(vision=vision, qformer=qformer, num_query_tokens=8, embed_dim=16,
                     ln_vision_eps=1e-5 if clip else 1e-6, **kw)


def model_config(mc, vocab_size: int) -> Blip2Config:
  """The Blip2Config a run config's `model` section describes (`vision`, `qformer`,
  `num_query_tokens`, `embed_dim`; random init shapes: a pretrained model brings its own).
  `vocab_size` is the tokenizer's; `qformer.vocab_size` 0 takes it."""
  v, q = mc.vision, mc.qformer
  clip = v.variant == "clip"
  vision = vit_lib.ViTConfig(
      image_size=int(v.image_size), patch_size=int(v.patch_size), hidden_size=int(v.hidden_size),
      intermediate_size=int(v.intermediate_size), num_layers=int(v.num_layers),
      num_heads=int(v.num_heads), layer_norm_eps=1e-5 if clip else 1e-6,
      hidden_act="quick_gelu" if clip else "gelu", variant=v.variant, post_layernorm=False)
  vs = int(q.get("vocab_size", 0) or 0) or vocab_size  # 0: the tokenizer's size
  if vocab_size > vs:
    raise ConfigError(f"config.model.qformer.vocab_size={vs} is smaller than the "
                      f"tokenizer's {vocab_size} tokens")
  qformer = qf.QFormerConfig(
      hidden_size=int(q.hidden_size), num_layers=int(q.num_layers), num_heads=int(q.num_heads),
      intermediate_size=int(q.intermediate_size),
      cross_attention_frequency=int(q.cross_attention_frequency),
      encoder_hidden_size=int(v.hidden_size), vocab_size=vs,
      max_position_embeddings=int(q.get("max_position_embeddings", 512)),
      **dropout_rates(q))
  return Blip2Config(vision=vision, qformer=qformer, num_query_tokens=int(mc.num_query_tokens),
                     embed_dim=int(mc.embed_dim), ln_vision_eps=1e-5 if clip else 1e-6)


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def dropout_rates(q) -> dict:
  """The Q-Former dropout rates `config.model.qformer` sets (absent: the model's own)."""
  return {k: float(q[k]) for k in DROPOUT_KEYS if q.get(k) is not None}


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, 1e-12), in fp32 (torch.nn.functional.normalize)."""
  x = x.astype(jnp.float32)
  n = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(n, _NORM_EPS)


def _proj(features, name, param_dtype):
  return nn.Dense(features, dtype=jnp.float32, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(0.02), name=name)


class Blip2(nn.Module):
  """The BLIP-2 retrieval model as one linen module; its methods are what the functions
  below apply. Compute dtypes and remat come from the config."""
  config: Blip2Config

  def setup(self):
    cfg = self.config
    dt, pdt = cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
    self.vision = vit_lib.VisionTransformer(cfg.vision, cfg.vision_compute_dtype, cfg.remat,
                                            cfg.attention_impl, cfg.scan_layers,
                                            cfg.remat_policy)
    self.ln_vision = LayerNorm(cfg.ln_vision_eps, jnp.float32)
    self.query_tokens = self.param(
        "query_tokens", nn.initializers.normal(0.02),
        (1, cfg.num_query_tokens, cfg.qformer.hidden_size), pdt)
    self.embeddings = qf.TextEmbeddings(cfg.qformer, dt, pdt)
    self.qformer = qf.QFormer(cfg.qformer, dt, cfg.remat, pdt, cfg.attention_impl,
                              cfg.scan_layers, cfg.remat_policy)
    self.vision_projection = _proj(cfg.embed_dim, "vision_projection", pdt)
    self.text_projection = _proj(cfg.embed_dim, "text_projection", pdt)
    if cfg.itm_head:
      self.itm_head = _proj(2, "itm_head", pdt)
    self.temp = self.param("temp", lambda _: jnp.asarray(cfg.temperature_init, jnp.float32))

  # -- pieces ------------------------------------------------------------------------------

  def vision_features(self, pixels):
    """[B, S, E]: the ViT output before `ln_vision` (fp32)."""
    return self.vision(pixels).last_hidden_state.astype(jnp.float32)

  def _image_context(self, feats):
    return self.ln_vision(feats.astype(jnp.float32)).astype(self.config.compute_dtype)

  def _queries(self, batch):
    q = jnp.broadcast_to(self.query_tokens, (batch,) + self.query_tokens.shape[1:])
    return q.astype(self.config.compute_dtype)

  def query_hidden_states(self, feats, dropout_rng=None):
    """[B, Q, H]: Q-Former over the query tokens alone, cross-attending to the image."""
    ctx = self._image_context(feats)
    return self.qformer(self._queries(feats.shape[0]), None, ctx, self.config.num_query_tokens,
                        dropout_rng)

  def text_hidden_states(self, input_ids, attention_mask, dropout_rng=None):
    """[B, L, H]: Q-Former over the text alone (no image, text FFNs)."""
    return self.qformer(self.embeddings(input_ids), attention_mask, None, 0, dropout_rng)

  def joint_hidden_states(self, feats, input_ids, attention_mask, dropout_rng=None):
    """[B, Q+L, H]: queries and text jointly, queries cross-attending (HF's ITM pass)."""
    b = feats.shape[0]
    nq = self.config.num_query_tokens
    ctx = self._image_context(feats)
    embeds = jnp.concatenate([self._queries(b), self.embeddings(input_ids)], axis=1)
    mask = jnp.concatenate([jnp.ones((b, nq), attention_mask.dtype), attention_mask], axis=1)
    return self.qformer(embeds, mask, ctx, nq, dropout_rng)

  # -- heads -------------------------------------------------------------------------------

  def target_from_features(self, feats, dropout_rng=None):
    h = self.query_hidden_states(feats, dropout_rng).astype(jnp.float32)
    return l2_normalize(self.vision_projection(h))

  def text_feature(self, input_ids, attention_mask, dropout_rng=None):
    h = self.text_hidden_states(input_ids, attention_mask, dropout_rng).astype(jnp.float32)
    return l2_normalize(self.text_projection(h[:, 0]))

  def compose_from_features(self, feats, input_ids, attention_mask, dropout_rng=None):
    h = self.joint_hidden_states(feats, input_ids, attention_mask,
                                 dropout_rng).astype(jnp.float32)
    q = self.text_projection(h[:, :self.config.num_query_tokens])
    return l2_normalize(q.mean(axis=1))

  def itm_logits(self, feats, input_ids, attention_mask):
    """[B, 2]: HF's ITM logits (itm_head on the query positions, averaged)."""
    h = self.joint_hidden_states(feats, input_ids, attention_mask).astype(jnp.float32)
    return self.itm_head(h[:, :self.config.num_query_tokens]).mean(axis=1)

  def __call__(self, pixels, input_ids, attention_mask):
    """Touches every parameter (used by init): (target feats, text feat, composed query)."""
    feats = self.vision_features(pixels)
    out = (self.target_from_features(feats), self.text_feature(input_ids, attention_mask),
           self.compose_from_features(feats, input_ids, attention_mask))
    if self.config.itm_head:
      out = out + (self.itm_logits(feats, input_ids, attention_mask),)
    return out


# ---------------------------------------------------------------------------------------------
# Params.

def _dummy_inputs(cfg: Blip2Config):
  v = cfg.vision
  pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
  ids = jnp.zeros((1, 2), jnp.int32)
  return pixels, ids, jnp.ones((1, 2), jnp.int32)


def _init_kind(path) -> str:
  name = str(getattr(path[-1], "key", path[-1]))
  if name == "scale":
    return "ones"
  if name.endswith("bias"):
    return "zeros"
  if name == "temp":
    return "temp"
  return "normal"


def init_blip2(rng: jax.Array, cfg: Blip2Config) -> dict:
  """Randomly initialised params of the full model (every tensor a checkpoint has).

  The same scheme as the modules' own initialisers (weights, embeddings and query tokens
  N(0, 0.02); LayerNorm scales 1; biases 0; temp = temperature_init), drawn as one normal
  vector and sliced: compiling flax's per-parameter init is ~10x slower on CPU. Good for
  training from scratch on synthetic data, not a pretrained model.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
  sizes = [int(np.prod(leaf.shape)) for _, leaf in flat]
  kinds = [_init_kind(path) for path, _ in flat]

  @jax.jit
  def init(rng):
    n = sum(s for s, k in zip(sizes, kinds) if k == "normal")
    z = jax.random.normal(rng, (n,), jnp.float32) * 0.02
    out, off = [], 0
    for (_, leaf), size, kind in zip(flat, sizes, kinds):
      if kind == "normal":
        out.append(z[off:off + size].reshape(leaf.shape).astype(leaf.dtype))
        off += size
      elif kind == "ones":
        out.append(jnp.ones(leaf.shape, leaf.dtype))
      elif kind == "zeros":
        out.append(jnp.zeros(leaf.shape, leaf.dtype))
      else:
        out.append(jnp.full(leaf.shape, cfg.temperature_init, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)

  return init(rng)


def abstract_params(cfg: Blip2Config) -> dict:
  """Shapes and dtypes of the param tree, without allocating it."""
  return jax.eval_shape(lambda r: Blip2(cfg).init(r, *_dummy_inputs(cfg))["params"],
                        jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# The functional API. `cfg` is hashable (frozen dataclasses), so it is the static argument.

def layer_stacks(cfg: Blip2Config) -> list[layer_stack.Stack]:
  """The runs of repeated layers (ViT blocks, Q-Former layers) in the param tree."""
  return (layer_stack.prefixed(vit_lib.layer_stacks(cfg.vision), ("vision",))
          + layer_stack.prefixed(qf.layer_stacks(cfg.qformer), ("qformer",)))


def stack_layers(params: Mapping, cfg: Blip2Config) -> dict:
  """Per-layer params (what the converters read and write) -> the `scan_layers` layout."""
  return layer_stack.stack(params, layer_stacks(cfg))


def unstack_layers(params: Mapping, cfg: Blip2Config) -> dict:
  """`scan_layers` (stacked) params -> the per-layer layout."""
  return layer_stack.unstack(params, layer_stacks(cfg))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _apply(params: Mapping, cfg: Blip2Config, method: str, *args) -> jax.Array:
  # Either layout runs: one the config does not use is converted inside the program.
  params = layer_stack.to_layout(params, layer_stacks(cfg), cfg.scan_layers)
  return Blip2(cfg).apply({"params": params}, *args, method=method)


def _check_feats(feats: Any, cfg: Blip2Config) -> None:
  shape = tuple(getattr(feats, "shape", ()))
  want = (cfg.vision.num_positions, cfg.vision.hidden_size)
  if len(shape) != 3 or shape[1:] != want:
    raise ValueError(f"vision features must be [batch, {want[0]}, {want[1]}] (vision_features "
                     f"output), got shape {shape}")


def _text(input_ids: Any, attention_mask: Any, cfg: Blip2Config, batch: Optional[int] = None):
  """Checked int32 (ids, mask); a missing mask attends everywhere."""
  qf.check_text(input_ids, attention_mask, cfg.qformer)
  if batch is not None and input_ids.shape[0] != batch:
    raise ValueError(f"{batch} images but {input_ids.shape[0]} texts")
  mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
  return jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def vision_features(params: Mapping, cfg: Blip2Config, pixels: jax.Array) -> jax.Array:
  """[B, S, E] fp32 ViT output before `ln_vision` (what a trainer caches for a frozen ViT).
  `pixels`: [B, S, S, 3] float NHWC, already normalised."""
  vit_lib.check_pixels(pixels, cfg.vision)
  return _apply(params, cfg, "vision_features", pixels)


def _rng(dropout_rng) -> tuple:
  # Eval calls pass no key at all: their jitted programs are the ones they always were.
  return () if dropout_rng is None else (dropout_rng,)


def encode_target_from_features(params: Mapping, cfg: Blip2Config, feats: jax.Array, *,
                                dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """[B, Q, D] L2-normalised target features from cached `vision_features` (dropout only
  with a `dropout_rng`, see the module docstring)."""
  _check_feats(feats, cfg)
  return _apply(params, cfg, "target_from_features", feats, *_rng(dropout_rng))


def encode_image(params: Mapping, cfg: Blip2Config, pixels: jax.Array, *,
                 dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """[B, Q, D] L2-normalised target features: vision_projection of the query outputs."""
  return encode_target_from_features(params, cfg, vision_features(params, cfg, pixels),
                                     dropout_rng=dropout_rng)


def encode_text(params: Mapping, cfg: Blip2Config, input_ids: jax.Array,
                attention_mask: Optional[jax.Array] = None, *,
                dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """[B, D] L2-normalised ITC text feature: text_projection of the CLS output."""
  return _apply(params, cfg, "text_feature", *_text(input_ids, attention_mask, cfg),
                *_rng(dropout_rng))


def compose_from_features(params: Mapping, cfg: Blip2Config, feats: jax.Array,
                          input_ids: jax.Array,
                          attention_mask: Optional[jax.Array] = None, *,
                          dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """[B, D] QuRe composed query from cached reference-image `vision_features`."""
  _check_feats(feats, cfg)
  return _apply(params, cfg, "compose_from_features", feats,
                *_text(input_ids, attention_mask, cfg, feats.shape[0]), *_rng(dropout_rng))


def compose(params: Mapping, cfg: Blip2Config, pixels: jax.Array, input_ids: jax.Array,
            attention_mask: Optional[jax.Array] = None, *,
            dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """[B, D] QuRe composed query: text_projection of the joint pass's query outputs, mean,
  L2-normalised."""
  vit_lib.check_pixels(pixels, cfg.vision)
  _text(input_ids, attention_mask, cfg, pixels.shape[0])
  return compose_from_features(params, cfg, vision_features(params, cfg, pixels), input_ids,
                               attention_mask, dropout_rng=dropout_rng)


def query_hidden_states(params: Mapping, cfg: Blip2Config, feats: jax.Array) -> jax.Array:
  """[B, Q, H] last hidden state of the query-only Q-Former pass."""
  _check_feats(feats, cfg)
  return _apply(params, cfg, "query_hidden_states", feats)


def joint_hidden_states(params: Mapping, cfg: Blip2Config, feats: jax.Array,
                        input_ids: jax.Array,
                        attention_mask: Optional[jax.Array] = None) -> jax.Array:
  """[B, Q+L, H] last hidden state of the joint query+text Q-Former pass (all positions)."""
  _check_feats(feats, cfg)
  return _apply(params, cfg, "joint_hidden_states", feats,
                *_text(input_ids, attention_mask, cfg, feats.shape[0]))


def itm_logits(params: Mapping, cfg: Blip2Config, feats: jax.Array, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> jax.Array:
  """[B, 2] image-text matching logits (HF `use_image_text_matching_head=True`)."""
  _check_feats(feats, cfg)
  return _apply(params, cfg, "itm_logits", feats,
                *_text(input_ids, attention_mask, cfg, feats.shape[0]))


@jax.jit
def score(query: jax.Array, targets: jax.Array) -> jax.Array:
  """[Bq, Bt]: for each query [D] and target [Q, D], max over the Q tokens of the dot product.

  A single query `[D]` or target `[Q, D]` is accepted too (the batch dim is then dropped).
  """
  q = jnp.asarray(query, jnp.float32)
  t = jnp.asarray(targets, jnp.float32)
  squeeze_q, squeeze_t = q.ndim == 1, t.ndim == 2
  q = q[None] if squeeze_q else q
  t = t[None] if squeeze_t else t
  if q.ndim != 2 or t.ndim != 3 or q.shape[-1] != t.shape[-1]:
    raise ValueError(f"score expects query [Bq, D] and targets [Bt, Q, D], got "
                     f"{tuple(jnp.shape(query))} and {tuple(jnp.shape(targets))}")
  s = max_over_tokens(q, t, precision=jax.lax.Precision.HIGHEST)
  if squeeze_t:
    s = s[:, 0]
  if squeeze_q:
    s = s[0]
  return s


@jax.jit
def logits(params: Mapping, query: jax.Array, targets: jax.Array) -> jax.Array:
  """QuRe's training logits: `score / temp` (the learned temperature, unclamped as in QuRe)."""
  return score(query, targets) / params["temp"]

"""The BLIP-2 Q-Former (HF `Blip2QFormerModel` numerics) and its text embeddings.

A BERT-base encoder with post-LN layers that runs learned query tokens, optionally followed
by text tokens, through shared self-attention. On layers with
`idx % cross_attention_frequency == 0`, the first `query_length` positions (the queries)
also cross-attend to the image features. Query positions and text positions have separate
feed-forward blocks (`intermediate_query`/`output_query` vs `intermediate`/`output`).

The input LayerNorm (HF `qformer.layernorm`, LAVIS `Qformer.bert.embeddings.LayerNorm`) is
part of `QFormer`; `TextEmbeddings` is word + absolute position only, as in HF.

`dtype` (compute) and `param_dtype` (dense and embedding params) are module attributes set
from the model config (`Blip2Config`); LayerNorms and the softmax always run in fp32.

Dropout (BERT's, where HF / LAVIS have it): after the input LayerNorm (`hidden_dropout_prob`),
on the attention probabilities (`attention_probs_dropout_prob`), after each attention output
dense (self and cross) and after each FFN output dense (text and query FFN), before the
residual LayerNorm. It runs only when `QFormer.__call__` gets a `dropout_rng` (a training
step); without one the Q-Former is deterministic and computes exactly what it did before
dropout existed. Each site's mask comes from `fold_in(dropout_rng, ...)` by the layer's index
in the whole stack and the site (`_SITES`), so a `scan_layers` run and a looped run drop the
same units, and remat recomputes the same masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cirjax.models.attention import dropout
from cirjax.models.layer_stack import Stack
from cirjax.models.remat import DEFAULT_POLICY, remat_layer
from cirjax.models.vit import LayerNorm, activation, attention, scanned_blocks

# Added to the attention logits of padded keys. Finite (no -inf in anything gradients touch)
# and large enough that exp() underflows to exactly 0 in fp32 and bf16, as HF's finfo.min does.
MASK_VALUE = -1e9

# fold_in indices of a layer's dropout sites (the embeddings' mask is fold_in(rng, 0); layer i's
# key is fold_in(rng, 1 + i)); inside an attention block 0 = probabilities, 1 = output.
_SITES = {"attention": 0, "crossattention": 1, "ffn_query": 2, "ffn": 3}


def _key(rng: Optional[jax.Array], index) -> Optional[jax.Array]:
  return None if rng is None else jax.random.fold_in(rng, index)


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Shape and numerics of the Q-Former (defaults: BLIP-2's BERT-base Q-Former).

  Attributes:
    use_text_input: whether text FFNs (`intermediate`/`output`) exist; required for text
      features and the composed query. HF's `use_qformer_text_input` (old spelling
      `qformer_text_input`).
    encoder_hidden_size: width of the image features cross-attended to (ViT width).
    hidden_dropout_prob: dropout after the input LayerNorm and after each attention output
      and FFN output dense (BERT's; 0.1 in bert-base-uncased and HF's Blip2QFormerConfig).
    attention_probs_dropout_prob: dropout on the attention probabilities (0.1 likewise).
      Both act only in training steps (a `dropout_rng`; see the module docstring).
  """
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  cross_attention_frequency: int = 2
  encoder_hidden_size: int = 1408
  vocab_size: int = 30523
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  use_text_input: bool = True
  pad_token_id: int = 0
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1

  def __post_init__(self):
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"QFormerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"QFormerConfig.hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}")
    if self.cross_attention_frequency < 1:
      raise ValueError("QFormerConfig.cross_attention_frequency must be >= 1, got "
                       f"{self.cross_attention_frequency}")

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_frequency == 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "QFormerConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown QFormerConfig field(s): {unknown}")
    return cls(**dict(d))


def _dense(features, name, dtype, param_dtype):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(0.02), name=name)


def additive_mask(mask: Optional[jax.Array], dtype=jnp.float32) -> Optional[jax.Array]:
  """[B, T] 1/0 key mask -> [B, 1, 1, T] additive mask (0 keep, MASK_VALUE drop)."""
  if mask is None:
    return None
  return jnp.where(mask[:, None, None, :] > 0, 0.0, MASK_VALUE).astype(dtype)


class QFormerAttention(nn.Module):
  """(Cross-)attention + output dense + post-LN residual (BERT `attention` block)."""
  config: QFormerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, context=None, mask=None, rng=None):
    cfg = self.config
    kv = x if context is None else context.astype(self.dtype)
    dense = lambda name: _dense(cfg.hidden_size, name, self.dtype, self.param_dtype)
    q, k, v = dense("query")(x), dense("key")(kv), dense("value")(kv)
    # The Q-Former is fp16-unstable: softmax always in fp32 (identical in fp32).
    out = attention(q, k, v, num_heads=cfg.num_heads, mask=mask, softmax_fp32=True,
                    impl=self.attention_impl, dropout_rate=cfg.attention_probs_dropout_prob,
                    dropout_rng=_key(rng, 0))
    out = dropout(dense("dense")(out), cfg.hidden_dropout_prob, _key(rng, 1))
    return LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(out + x)


class FeedForward(nn.Module):
  """BERT intermediate + output: LN(x + W2 act(W1 x))."""
  config: QFormerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rng=None):
    cfg = self.config
    h = _dense(cfg.intermediate_size, "intermediate", self.dtype, self.param_dtype)(x)
    h = activation(cfg.hidden_act, h)
    h = dropout(_dense(cfg.hidden_size, "output", self.dtype, self.param_dtype)(h),
                cfg.hidden_dropout_prob, rng)
    return LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(h + x)


class QFormerLayer(nn.Module):
  """One BERT layer; `rng` (this layer's dropout key, None in eval) is its last argument."""
  config: QFormerConfig
  layer_idx: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, mask, encoder_hidden_states, query_length: int, rng=None):
    cfg = self.config
    dt = (self.dtype, self.param_dtype)
    site = lambda name: _key(rng, _SITES[name])
    x = QFormerAttention(cfg, *dt, self.attention_impl, name="attention")(
        x, mask=mask, rng=site("attention"))
    cross = (QFormerAttention(cfg, *dt, self.attention_impl, name="crossattention")
             if cfg.has_cross_attention(self.layer_idx) else None)
    ffn_query = FeedForward(cfg, *dt, name="ffn_query")
    ffn_text = FeedForward(cfg, *dt, name="ffn") if cfg.use_text_input else None
    if self.is_initializing():
      # Create every parameter the checkpoint has, whichever path init takes.
      if cross is not None and encoder_hidden_states is not None:
        cross(x[:, :1], context=encoder_hidden_states)
      ffn_query(x[:, :1])
      if ffn_text is not None:
        ffn_text(x[:, :1])
    no_text = ("this Q-Former has no text feed-forward blocks (use_qformer_text_input=False): "
               "it cannot run text tokens")
    if query_length == 0:
      if ffn_text is None:
        raise ValueError(no_text)
      return ffn_text(x, site("ffn"))
    q = x[:, :query_length]
    if cross is not None:
      if encoder_hidden_states is None:
        raise ValueError(f"Q-Former layer {self.layer_idx} cross-attends: image features "
                         "(encoder_hidden_states) are required when queries are present")
      q = cross(q, context=encoder_hidden_states, rng=site("crossattention"))
    out = ffn_query(q, site("ffn_query"))
    if x.shape[1] > query_length:
      if ffn_text is None:
        raise ValueError(no_text)
      out = jnp.concatenate([out, ffn_text(x[:, query_length:], site("ffn"))], axis=1)
    return out


class QFormerLayerGroup(nn.Module):
  """One scan step: `cross_attention_frequency` consecutive layers (`layer_{j}`), the first
  with cross-attention; every step has the same parameter tree, so the steps stack. `group`
  (the scanned step index) gives each layer its index in the whole stack for its dropout
  key."""
  config: QFormerConfig
  query_length: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"
  remat: bool = False
  remat_policy: str = DEFAULT_POLICY

  @nn.compact
  def __call__(self, x, mask, encoder_hidden_states, rng, group):
    layer_cls = QFormerLayer
    if self.remat:
      layer_cls = remat_layer(QFormerLayer, self.remat_policy, static_argnums=(4,),
                              prevent_cse=False)
    freq = self.config.cross_attention_frequency
    for j in range(freq):
      x = layer_cls(self.config, j, self.dtype, self.param_dtype, self.attention_impl,
                    name=f"layer_{j}")(x, mask, encoder_hidden_states, self.query_length,
                                       _key(rng, 1 + group * freq + j))
    return x, None


class QFormer(nn.Module):
  """HF `Blip2QFormerModel`: input LayerNorm, then the layers.

  `__call__(embeds, attention_mask, encoder_hidden_states, query_length, dropout_rng)`:
    embeds: `[B, T, D]` (query tokens, optionally followed by text embeddings).
    attention_mask: `[B, T]` 1 = attend, 0 = padding; None = all ones.
    encoder_hidden_states: `[B, S, E]` image features (needed when query_length > 0).
    query_length: how many leading positions are queries (0 = text only). Static.
    dropout_rng: a PRNG key in training steps (dropout at the config's rates); None (eval,
      default) = deterministic.
  Returns the last hidden state `[B, T, D]`.

  With `scan_layers` the layers run as one `nn.scan` over groups of
  `cross_attention_frequency` layers (params stacked under `layer_groups`, see
  `layer_stacks`); `attention_impl` as `cirjax.models.attention`.
  """
  config: QFormerConfig
  dtype: Any = jnp.float32
  remat: bool = False
  param_dtype: Any = jnp.float32
  attention_impl: str = "xla"
  scan_layers: bool = False
  remat_policy: str = DEFAULT_POLICY

  @nn.compact
  def __call__(self, embeds, attention_mask=None, encoder_hidden_states=None,
               query_length: int = 0, dropout_rng=None):
    cfg = self.config
    x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layernorm")(embeds)
    x = dropout(x, cfg.hidden_dropout_prob, _key(dropout_rng, 0))
    mask = additive_mask(attention_mask)
    if self.scan_layers:
      check_scannable(cfg)
      n_groups = cfg.num_layers // cfg.cross_attention_frequency
      groups = scanned_blocks(QFormerLayerGroup, remat=False, in_axes=(nn.broadcast,) * 3 + (0,),
                              length=n_groups)
      x, _ = groups(cfg, query_length, self.dtype, self.param_dtype, self.attention_impl,
                    self.remat, self.remat_policy, name="layer_groups")(
                        x, mask, encoder_hidden_states, dropout_rng,
                        jnp.arange(n_groups, dtype=jnp.int32))
      return x
    layer_cls = (remat_layer(QFormerLayer, self.remat_policy, static_argnums=(4,))
                 if self.remat else QFormerLayer)
    # One named module per layer (`layer_{i}`, the converters' tree).
    for i in range(cfg.num_layers):
      x = layer_cls(cfg, i, self.dtype, self.param_dtype, self.attention_impl,
                    name=f"layer_{i}")(x, mask, encoder_hidden_states, query_length,
                                       _key(dropout_rng, 1 + i))
    return x


def check_scannable(config: QFormerConfig) -> None:
  """ValueError unless the layers form whole scan steps (groups of the cross-attention
  frequency)."""
  if config.num_layers % config.cross_attention_frequency:
    raise ValueError(f"scan_layers needs the Q-Former's num_layers ({config.num_layers}) to "
                     f"be a multiple of cross_attention_frequency "
                     f"({config.cross_attention_frequency})")


def layer_stacks(config: QFormerConfig) -> list[Stack]:
  """The Q-Former's run of layers (`layer_{i}` per layer, `layer_groups` stacked in steps of
  `cross_attention_frequency`)."""
  return [Stack((), "layer_{}", "layer_groups", config.num_layers,
                config.cross_attention_frequency, "layer_{}")]


class TextEmbeddings(nn.Module):
  """Word + absolute position embeddings (no LayerNorm: that is `QFormer.layernorm`)."""
  config: QFormerConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.config
    words = self.param("word_embeddings", nn.initializers.normal(0.02),
                       (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
    pos = self.param("position_embeddings", nn.initializers.normal(0.02),
                     (cfg.max_position_embeddings, cfg.hidden_size), self.param_dtype)
    t = input_ids.shape[1]
    return (jnp.take(words, input_ids, axis=0) + pos[None, :t]).astype(self.dtype)


def check_text(input_ids, mask, config: QFormerConfig) -> None:
  """Shape checks always; value checks when the ids are concrete (outside jit).

  Raises ValueError naming the offending value.
  """
  shape = tuple(getattr(input_ids, "shape", ()))
  if len(shape) != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {shape}")
  if shape[1] < 1:
    raise ValueError("input_ids must hold at least one token (the CLS position)")
  if shape[1] > config.max_position_embeddings:
    raise ValueError(f"text length {shape[1]} exceeds the position table "
                     f"(max_position_embeddings={config.max_position_embeddings})")
  dtype = getattr(input_ids, "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"input_ids must be integers, got dtype {dtype}")
  if mask is not None and tuple(getattr(mask, "shape", ())) != shape:
    raise ValueError(f"attention mask shape {tuple(getattr(mask, 'shape', ()))} does not "
                     f"match input_ids shape {shape}")
  if not isinstance(input_ids, jax.core.Tracer):
    ids = np.asarray(input_ids)
    if ids.size and (ids.max() >= config.vocab_size or ids.min() < 0):
      bad = int(ids.max()) if ids.max() >= config.vocab_size else int(ids.min())
      raise ValueError(f"token id {bad} is outside the vocabulary [0, {config.vocab_size})")


# ---------------------------------------------------------------------------------------------
# Weight tables. Rows are (cirjax path inside the QFormer params, source key, transform) with
# transforms named in `cirjax.convert.engine` ('linear' = torch [out, in] -> flax [in, out]).
# HF (`Blip2QFormerModel`, prefix 'qformer.') and LAVIS (`Qformer.bert.`) differ only in the
# attention sub-module name ('attention' vs 'self') and where the input LayerNorm lives.

def _ln(dst, src):
  return [(dst + ("scale",), src + ".weight", "id"), (dst + ("bias",), src + ".bias", "id")]


def _lin(dst, src):
  return [(dst + ("kernel",), src + ".weight", "linear"), (dst + ("bias",), src + ".bias", "id")]


def qformer_table(config: QFormerConfig, *, style: str = "hf") -> list[tuple[tuple, str, str]]:
  """Rows for the Q-Former encoder. style 'hf': keys relative to HF's `qformer.`; 'lavis':
  relative to LAVIS's `Qformer.bert.`."""
  if style not in ("hf", "lavis"):
    raise ValueError(f"unknown Q-Former key style {style!r}")
  att = "attention" if style == "hf" else "self"
  rows = _ln(("layernorm",), "layernorm" if style == "hf" else "embeddings.LayerNorm")
  for i in range(config.num_layers):
    dst, src = (f"layer_{i}",), f"encoder.layer.{i}"
    blocks = ["attention"] + (["crossattention"] if config.has_cross_attention(i) else [])
    for blk in blocks:
      for n in ("query", "key", "value"):
        rows += _lin(dst + (blk, n), f"{src}.{blk}.{att}.{n}")
      rows += _lin(dst + (blk, "dense"), f"{src}.{blk}.output.dense")
      rows += _ln(dst + (blk, "LayerNorm"), f"{src}.{blk}.output.LayerNorm")
    ffns = [("ffn_query", "_query")] + ([("ffn", "")] if config.use_text_input else [])
    for name, suffix in ffns:
      rows += _lin(dst + (name, "intermediate"), f"{src}.intermediate{suffix}.dense")
      rows += _lin(dst + (name, "output"), f"{src}.output{suffix}.dense")
      rows += _ln(dst + (name, "LayerNorm"), f"{src}.output{suffix}.LayerNorm")
  return rows


def abstract_qformer_params(config: QFormerConfig) -> dict:
  """Shapes of the QFormer param tree (with every cross-attention and FFN block)."""
  def init(rng):
    # One query position only: init still creates the text FFNs (see QFormerLayer), and a
    # Q-Former without them must not be asked to run a text position.
    x = jnp.zeros((1, 1, config.hidden_size), jnp.float32)
    enc = jnp.zeros((1, 1, config.encoder_hidden_size), jnp.float32)
    return QFormer(config).init(rng, x, None, enc, 1)["params"]
  return jax.eval_shape(init, jax.random.PRNGKey(0))

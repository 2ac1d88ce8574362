"""Phi-3 / Llama decoder (the language model of LLaVA-Phi) as a pure-functional Flax module.

Matches HF `Phi3Model` and `LlamaModel` (transformers 5.x) numerically:

* RMSNorm normalises in fp32, casts back to the compute dtype, then multiplies by the weight.
* Two weight layouts: `fused` (Phi-3: `qkv_proj` rows = q, k, v; `gate_up_proj` = gate then up)
  and `split` (Llama: `q_proj`/`k_proj`/`v_proj`, `gate_proj`/`up_proj`). The layout is kept
  as loaded so LoRA adapters keep PEFT's module names.
* Grouped-query attention: query head i reads key/value head i // (num_heads / num_kv_heads).
* RoPE rotates the two halves (`rotate_half`), optionally on the first
  `partial_rotary_factor` of each head. LongRoPE divides the inverse frequencies by
  `short_factor` while max(position)+1 <= original_max_position_embeddings and by
  `long_factor` beyond; cos and sin are multiplied by the attention factor in both regimes.
* Causal + padding (+ optional sliding window) mask, filled with the fp32 minimum (finite),
  softmax in fp32. Fully masked rows (queries on left padding) then average all values
  exactly as HF's eager attention does, so even padded positions match.

Dense kernels are stored `[in, out]` (Flax convention); the converter transposes HF weights.
Every linear layer can carry a LoRA adapter read from the separate `lora` variable collection
(see `cirjax.lora`), so base parameters stay frozen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cirjax.models.attention import dot_attention
from cirjax.models import layer_stack
from cirjax.models.layer_stack import Stack
from cirjax.models.remat import DEFAULT_POLICY, remat_layer
from cirjax.models.vit import scanned_blocks

Array = jax.Array

SUPPORTED_ROPE_TYPES = ("default", "longrope")
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _dtype(name: Any) -> jnp.dtype:
  return jnp.dtype(name) if name is not None else jnp.float32


@dataclasses.dataclass(frozen=True)
class Phi3Config:
  """Decoder hyper-parameters; hashable, so it can be a static argument of `jax.jit`.

  `layout` is `fused` for Phi-3 checkpoints and `split` for Llama-layout ones
  (xtuner/llava-phi-3-mini-hf). `model_type` is the HF text model type to export to.
  """
  vocab_size: int = 32064
  hidden_size: int = 3072
  intermediate_size: int = 8192
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int | None = None
  rms_norm_eps: float = 1e-5
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  partial_rotary_factor: float = 1.0
  rope_type: str = "default"
  rope_short_factor: tuple[float, ...] | None = None
  rope_long_factor: tuple[float, ...] | None = None
  rope_factor: float | None = None
  rope_attention_factor: float | None = None
  max_position_embeddings: int = 4096
  original_max_position_embeddings: int | None = None
  sliding_window: int | None = None
  layout: str = "fused"
  attention_bias: bool = False
  mlp_bias: bool = False
  pad_token_id: int | None = None
  model_type: str = "phi3"

  def __post_init__(self):
    if self.layout not in ("fused", "split"):
      raise ValueError(f"Phi3Config.layout must be 'fused' or 'split', got {self.layout!r}")
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(
          f"unsupported rope_scaling type {self.rope_type!r}: cirjax implements "
          f"{', '.join(SUPPORTED_ROPE_TYPES)} (Phi-3/Phi-3.5 and Llama-layout LLaVA-Phi)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; "
                       f"supported: {sorted(_ACTIVATIONS)}")
    if self.rope_type == "longrope":
      half = self.rotary_dim // 2
      for name in ("rope_short_factor", "rope_long_factor"):
        f = getattr(self, name)
        if f is None or len(f) != half:
          raise ValueError(f"longrope needs {name[5:]} with {half} entries (rotary_dim/2), "
                           f"got {None if f is None else len(f)}")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.dim_per_head * self.partial_rotary_factor)

  @property
  def original_max_positions(self) -> int:
    return self.original_max_position_embeddings or self.max_position_embeddings

  @classmethod
  def from_hf(cls, cfg: dict) -> "Phi3Config":
    """Builds the config from an HF `text_config` dict (phi3 or llama, 4.x or 5.x spelling)."""
    model_type = cfg.get("model_type", "phi3")
    if model_type not in ("phi3", "llama"):
      raise ValueError(f"unsupported text model_type {model_type!r}: expected 'phi3' or 'llama'")
    heads = cfg.get("num_attention_heads", 32)
    hidden = cfg.get("hidden_size", 3072)
    # transformers 5 spells it rope_parameters (incl. rope_theta); 4.x uses rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if model_type == "phi3" and rope_type in ("su", "yarn"):
      rope_type = "longrope"  # HF Phi3Config's backward-compatible alias
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"unsupported rope_scaling type {rope_type!r} in text_config "
                       f"(model_type {model_type}); supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    orig = rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    tup = lambda v: None if v is None else tuple(float(x) for x in v)
    return cls(
        vocab_size=cfg.get("vocab_size", 32064), hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size", 8192),
        num_layers=cfg.get("num_hidden_layers", 32), num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") if cfg.get("head_dim") not in (None, hidden // heads) else None,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), hidden_act=cfg.get("hidden_act", "silu"),
        rope_theta=float(theta),
        partial_rotary_factor=float(rope.get("partial_rotary_factor",
                                             cfg.get("partial_rotary_factor", 1.0))),
        rope_type=rope_type, rope_short_factor=tup(rope.get("short_factor")),
        rope_long_factor=tup(rope.get("long_factor")), rope_factor=rope.get("factor"),
        rope_attention_factor=rope.get("attention_factor"),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        original_max_position_embeddings=orig, sliding_window=cfg.get("sliding_window"),
        layout="fused" if model_type == "phi3" else "split",
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)), pad_token_id=cfg.get("pad_token_id"),
        model_type=model_type)

  def to_hf(self) -> dict:
    """HF `text_config` dict (transformers 5 spelling, readable by 4.x through rope_scaling)."""
    rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.partial_rotary_factor != 1.0:
      rope["partial_rotary_factor"] = self.partial_rotary_factor
    if self.rope_type == "longrope":
      rope.update(short_factor=list(self.rope_short_factor), long_factor=list(self.rope_long_factor))
      if self.rope_factor is not None:
        rope["factor"] = self.rope_factor
      if self.rope_attention_factor is not None:
        rope["attention_factor"] = self.rope_attention_factor
      if self.original_max_position_embeddings is not None:
        rope["original_max_position_embeddings"] = self.original_max_position_embeddings
    out = dict(
        model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        rms_norm_eps=self.rms_norm_eps, hidden_act=self.hidden_act,
        max_position_embeddings=self.max_position_embeddings, rope_parameters=rope,
        pad_token_id=self.pad_token_id, tie_word_embeddings=False)
    if self.head_dim is not None:
      out["head_dim"] = self.head_dim
    if self.model_type == "phi3":
      out["original_max_position_embeddings"] = self.original_max_positions
      out["sliding_window"] = self.sliding_window
    else:
      out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
    return out


# ----------------------------------------------------------------------------- RoPE


def rope_tables(config: Phi3Config) -> tuple[np.ndarray, np.ndarray, float]:
  """(short inverse frequencies, long inverse frequencies, attention factor), fp32 as HF.

  For plain RoPE both tables are equal and the factor is 1.
  """
  dim = config.rotary_dim
  shape = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
  powers = np.float32(config.rope_theta) ** shape
  if config.rope_type == "default":
    inv = (np.float32(1.0) / powers).astype(np.float32)
    return inv, inv, 1.0
  orig = config.original_max_positions
  factor = config.rope_factor
  if factor is None:
    factor = config.max_position_embeddings / orig
  attn = config.rope_attention_factor
  if attn is None:
    attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
  short = np.float32(1.0) / (np.asarray(config.rope_short_factor, np.float32) * powers)
  long = np.float32(1.0) / (np.asarray(config.rope_long_factor, np.float32) * powers)
  return short.astype(np.float32), long.astype(np.float32), float(attn)


def rope_cos_sin(config: Phi3Config, position_ids: Array, dtype) -> tuple[Array, Array]:
  """cos, sin of shape [B, T, rotary_dim] for integer positions [B, T] (or [1, T]).

  LongRoPE picks the long table for the whole batch when max(position)+1 exceeds
  original_max_position_embeddings, exactly as HF's `longrope_frequency_update`.
  """
  short, long, attn = rope_tables(config)
  pos = position_ids.astype(jnp.float32)[..., None]
  inv = jnp.asarray(short)
  if config.rope_type == "longrope":
    use_long = jnp.max(position_ids) + 1 > config.original_max_positions
    inv = jnp.where(use_long, jnp.asarray(long), inv)
  freqs = pos * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos = jnp.cos(emb) * attn
  sin = jnp.sin(emb) * attn
  return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x: Array) -> Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: [B, T, heads, head_dim]; cos/sin: [B, T, rotary_dim]; rotates the first rotary_dim."""
  rot = cos.shape[-1]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  out = x_rot * cos + _rotate_half(x_rot) * sin
  return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# ----------------------------------------------------------------------------- masks


def default_position_ids(attention_mask: Array) -> Array:
  """Positions HF's LLaVA/Phi-3/Llama forward uses when none are passed: arange(T) per row.

  transformers' model forward ignores left padding here (only `generate` derives positions
  from the mask), so padded rows see their real tokens at positions shifted by the pad count.
  """
  b, t = attention_mask.shape
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))


def attention_bias(attention_mask: Array, sliding_window: int | None = None) -> Array:
  """[B, 1, T, T] fp32 additive bias: 0 where allowed, the fp32 minimum (finite) elsewhere."""
  t = attention_mask.shape[-1]
  q = jnp.arange(t)[:, None]
  k = jnp.arange(t)[None, :]
  allowed = k <= q
  if sliding_window is not None:
    allowed = allowed & (k > q - sliding_window)
  allowed = allowed[None] & (attention_mask[:, None, :] > 0)
  return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[:, None]


# ----------------------------------------------------------------------------- layers


class Linear(nn.Module):
  """`y = x @ kernel (+ bias)`, kernel `[in, out]`, plus an optional LoRA branch.

  The adapter lives in the `lora` collection at this module's path as `lora_a` `[in, r]` and
  `lora_b` `[r, out]`: `y += dropout(x) @ lora_a @ lora_b * lora_scale` (PEFT's order).
  """
  features: int
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        self.param_dtype)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.has_variable("lora", "lora_a"):
      a = self.get_variable("lora", "lora_a")
      b = self.get_variable("lora", "lora_b")
      h = x
      if self.lora_dropout > 0.0 and not deterministic:
        h = nn.Dropout(self.lora_dropout)(h, deterministic=False)
      h = jnp.einsum("...i,ir->...r", h.astype(self.dtype), a.astype(self.dtype))
      h = jnp.einsum("...r,ro->...o", h, b.astype(self.dtype))
      y = y + h * self.lora_scale
    return y


class RMSNorm(nn.Module):
  """HF Phi3RMSNorm / LlamaRMSNorm: fp32 normalise, cast to the input dtype, times weight."""
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return weight.astype(self.dtype) * h.astype(self.dtype)


class Attention(nn.Module):
  config: Phi3Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  attention_impl: str = "xla"

  def _linear(self, features: int, name: str, bias: bool = False) -> Linear:
    return Linear(features, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  lora_scale=self.lora_scale, lora_dropout=self.lora_dropout, name=name)

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, bias: Array,
               deterministic: bool = True) -> Array:
    c = self.config
    hd, nq, nkv = c.dim_per_head, c.num_heads, c.num_kv_heads
    b, t, _ = x.shape
    if c.layout == "fused":
      qkv = self._linear((nq + 2 * nkv) * hd, "qkv_proj")(x, deterministic)
      q, k, v = jnp.split(qkv, [nq * hd, (nq + nkv) * hd], axis=-1)
    else:
      q = self._linear(nq * hd, "q_proj", c.attention_bias)(x, deterministic)
      k = self._linear(nkv * hd, "k_proj", c.attention_bias)(x, deterministic)
      v = self._linear(nkv * hd, "v_proj", c.attention_bias)(x, deterministic)
    q = apply_rope(q.reshape(b, t, nq, hd), cos, sin)
    k = apply_rope(k.reshape(b, t, nkv, hd), cos, sin)
    v = v.reshape(b, t, nkv, hd)
    out = dot_attention(q, k, v, bias=bias, softmax_fp32=True, impl=self.attention_impl)
    out = out.astype(self.dtype).reshape(b, t, nq * hd)
    return self._linear(c.hidden_size, "o_proj", c.layout == "split" and c.attention_bias)(
        out, deterministic)


class MLP(nn.Module):
  config: Phi3Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: float = 1.0
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    c = self.config
    lin = lambda f, name, bias=False: Linear(
        f, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
        lora_scale=self.lora_scale, lora_dropout=self.lora_dropout, name=name)
    act = _ACTIVATIONS[c.hidden_act]
    if c.layout == "fused":
      gate, up = jnp.split(lin(2 * c.intermediate_size, "gate_up_proj")(x, deterministic), 2, -1)
    else:
      gate = lin(c.intermediate_size, "gate_proj", c.mlp_bias)(x, deterministic)
      up = lin(c.intermediate_size, "up_proj", c.mlp_bias)(x, deterministic)
    return lin(c.hidden_size, "down_proj", c.layout == "split" and c.mlp_bias)(
        up * act(gate), deterministic)


class DecoderLayer(nn.Module):
  """Pre-norm decoder block. As an `nn.scan` body (`scanned`) it returns `(x, x if collect
  else None)`: `collect` (static) gathers every layer's output for `hidden_states`."""
  config: Phi3Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  attention_impl: str = "xla"
  scanned: bool = False

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, bias: Array,
               deterministic: bool = True, collect: bool = False) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lkw = dict(lora_scale=self.lora_scale, lora_dropout=self.lora_dropout, **kw)
    eps = self.config.rms_norm_eps
    h = RMSNorm(eps, name="input_layernorm", **kw)(x)
    x = x + Attention(self.config, name="self_attn", attention_impl=self.attention_impl,
                      **lkw)(h, cos, sin, bias, deterministic)
    h = RMSNorm(eps, name="post_attention_layernorm", **kw)(x)
    x = x + MLP(self.config, name="mlp", **lkw)(h, deterministic)
    return (x, x if collect else None) if self.scanned else x


class Phi3Decoder(nn.Module):
  """Token embedding + decoder layers + final norm (HF `Phi3Model` / `LlamaModel`).

  `__call__(inputs_embeds, attention_mask, position_ids=None)` returns
  `(last_hidden_state, hidden_states)` where `hidden_states` follows HF's convention:
  `num_layers + 1` entries, [0] = the input embeddings, [i] = output of layer i, and the last
  entry replaced by the final-norm output (HF ties it to `last_hidden_state`).

  With `scan_layers` the layers run as one `nn.scan` (params and LoRA adapters stacked under
  `layers`, see `layer_stacks`); `attention_impl` as `cirjax.models.attention`.
  """
  config: Phi3Config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora_scale: float = 1.0
  lora_dropout: float = 0.0
  remat: bool = False
  attention_impl: str = "xla"
  scan_layers: bool = False
  remat_policy: str = DEFAULT_POLICY

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                 param_dtype=self.param_dtype,
                                 embedding_init=nn.initializers.normal(0.02))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora_scale=self.lora_scale,
              lora_dropout=self.lora_dropout, attention_impl=self.attention_impl)
    if self.scan_layers:
      # Broadcast arguments reach the body unchanged: `deterministic`/`collect` stay static.
      blocks = scanned_blocks(DecoderLayer, length=c.num_layers, remat=self.remat,
                              in_axes=(nn.broadcast,) * 5, static_argnums=(5, 6),
                              collections=("params", "lora"), remat_policy=self.remat_policy)
      self.layers = blocks(c, scanned=True, **kw)
    else:
      layer_cls = (remat_layer(DecoderLayer, self.remat_policy, static_argnums=(5,))
                   if self.remat else DecoderLayer)
      self.layers = [layer_cls(c, name=f"layers_{i}", **kw) for i in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

  def embed(self, input_ids: Array) -> Array:
    return self.embed_tokens(input_ids)

  def __call__(self, inputs_embeds: Array, attention_mask: Array,
               position_ids: Array | None = None, deterministic: bool = True,
               output_hidden_states: bool = False) -> tuple[Array, tuple[Array, ...] | None]:
    if position_ids is None:
      position_ids = default_position_ids(attention_mask)
    x = inputs_embeds.astype(self.dtype)
    cos, sin = rope_cos_sin(self.config, position_ids, self.dtype)
    bias = attention_bias(attention_mask, self.config.sliding_window)
    if self.scan_layers:
      return self._scan(x, cos, sin, bias, deterministic, output_hidden_states)
    states = [x]
    for layer in self.layers:
      x = layer(x, cos, sin, bias, deterministic)
      states.append(x)
    x = self.norm(x)
    if not output_hidden_states:
      return x, None
    states[-1] = x
    return x, tuple(states)

  def _scan(self, x, cos, sin, bias, deterministic, output_hidden_states):
    x0 = x
    x, ys = self.layers(x, cos, sin, bias, deterministic, output_hidden_states)
    x = self.norm(x)
    if not output_hidden_states:
      return x, None
    return x, (x0,) + tuple(ys[i] for i in range(self.config.num_layers - 1)) + (x,)


def layer_stacks(config: Phi3Config) -> list[Stack]:
  """The decoder's run of layers (`layers_{i}` per layer, `layers` stacked)."""
  return [Stack((), "layers_{}", "layers", config.num_layers)]


def check_positions(config: Phi3Config, seq_len: int, position_ids: Any = None) -> None:
  """Host-side check that the sequence fits the model's position limit (clear error if not)."""
  longest = seq_len if position_ids is None else int(np.max(np.asarray(position_ids))) + 1
  if longest > config.max_position_embeddings:
    raise ValueError(
        f"sequence needs {longest} positions but the language model supports "
        f"max_position_embeddings={config.max_position_embeddings}; shorten the prompt "
        f"(or left-truncate it)")


def decoder_forward(params: Any, input_ids: Array, attention_mask: Array, *,
                    config: Phi3Config, position_ids: Array | None = None,
                    dtype: Any = jnp.float32, output_hidden_states: bool = True,
                    lora: Any = None, lora_scale: float = 1.0, scan_layers: bool = False,
                    attention_impl: str = "xla") -> tuple[Array, Any]:
  """Pure text-only forward of the decoder (`params` = the decoder's own param tree, in either
  layer layout)."""
  mod = Phi3Decoder(config, dtype=_dtype(dtype), lora_scale=lora_scale,
                    scan_layers=scan_layers, attention_impl=attention_impl)
  stacks = layer_stacks(config)
  variables = {"params": layer_stack.to_layout(params, stacks, scan_layers)}
  if lora is not None:
    variables["lora"] = layer_stack.to_layout(lora, stacks, scan_layers)

  def run(m):
    return m(m.embed(input_ids), attention_mask, position_ids,
             output_hidden_states=output_hidden_states)
  return nn.apply(run, mod)(variables)

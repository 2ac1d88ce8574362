"""One vision transformer for both towers BLIP-2 and LLaVA checkpoints use.

The module reads explicit layout fields of `ViTConfig`; a named `variant` decodes into them
(`decode_variant`, as big_vision's `decode_variant` turns a name into widths):

* 'eva' reproduces HF `Blip2VisionModel` (the EVA ViT-g of BLIP-2): patch conv with bias
  (`patch_bias`), no pre-LN, pre-LN blocks with a fused `qkv` projection (`fused_qkv`), the
  softmax in the compute dtype, exact GELU, and `post_layernorm` over the whole sequence
  (`post_norm_sequence`).
* 'clip' reproduces HF `CLIPVisionModel` (CLIP ViT-L, also LAVIS `clip_L` and LLaVA's
  tower): patch conv without bias, `pre_layrnorm` (`pre_norm`), separate q/k/v/out
  projections, fp32 softmax (`softmax_fp32`), quick_gelu MLP, and `post_layernorm` which HF
  applies to the pooled CLS token only.

The compute dtype and `remat` are the caller's model config's (`Blip2Config`,
`LlavaConfig`), passed as module attributes; params are fp32. Pixels are NHWC
(`[B, H, W, 3]`), float, already normalised. The parameter tree is independent of `remat`
and of `attention_impl`; with `scan_layers` the blocks' params are stacked (see
`cirjax.models.layer_stack`, which converts between the two layouts).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from cirjax.models.attention import dot_attention
from cirjax.models.layer_stack import Stack
from cirjax.models.remat import DEFAULT_POLICY, remat_layer

ACTIVATIONS = ("gelu", "quick_gelu")
# Compute / storage dtypes a model config may name (strings: hashable, JSON round-trips).
DTYPES = ("float32", "bfloat16", "float16")

# The layout fields each named tower decodes into (see `decode_variant`).
_VARIANT_FIELDS = {
    "eva": dict(fused_qkv=True, patch_bias=True, pre_norm=False, softmax_fp32=False,
                post_norm_sequence=True),
    "clip": dict(fused_qkv=False, patch_bias=False, pre_norm=True, softmax_fp32=True,
                 post_norm_sequence=False),
}
VARIANTS = tuple(_VARIANT_FIELDS)


def decode_variant(variant: str) -> dict[str, bool]:
  """The explicit layout fields of a named tower ('eva' or 'clip'), e.g. `fused_qkv`."""
  if variant not in _VARIANT_FIELDS:
    raise ValueError(f"ViTConfig.variant must be one of {VARIANTS}, got {variant!r}")
  return dict(_VARIANT_FIELDS[variant])


def check_dtype(owner: str, name: str, value: Any) -> None:
  """ValueError unless a config's dtype field names one of `DTYPES`."""
  if value not in DTYPES:
    raise ValueError(f"{owner}.{name} must be one of {DTYPES}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape and numerics of a vision transformer.

  Attributes:
    image_size: input height = width in pixels.
    patch_size: square patch side; image_size must be a multiple of it.
    num_channels: input channels (3).
    hidden_size: model width (EVA-g 1408, CLIP-L 1024).
    intermediate_size: MLP width (EVA-g 6144, CLIP-L 4096).
    num_layers: number of transformer blocks in the checkpoint.
    num_heads: attention heads (16 for both).
    layer_norm_eps: eps of every LayerNorm inside the tower (EVA 1e-6, CLIP 1e-5).
    hidden_act: 'gelu' (exact erf form) or 'quick_gelu' (x * sigmoid(1.702 x)).
    variant: 'eva' (HF Blip2VisionModel) or 'clip' (HF CLIPVisionModel): the checkpoint
      layout the converters read, and the defaults of the layout fields below.
    post_layernorm: whether the tower has a final LayerNorm (`post_layernorm`). LAVIS towers
      have none of their own: BLIP-2's `ln_vision` lives outside the ViT.
    post_layernorm_eps: eps of that final LayerNorm; None means `layer_norm_eps`.
    fused_qkv: one `qkv` projection (EVA) instead of q/k/v/out_proj (CLIP).
    patch_bias: the patch embedding has a bias.
    pre_norm: a LayerNorm (`pre_layrnorm`) over the embeddings before the blocks.
    softmax_fp32: attention softmax in fp32 (CLIP) or in the compute dtype (HF BLIP-2).
    post_norm_sequence: `post_layernorm` normalises the whole sequence, and the pooled CLS
      again (EVA), or only the pooled CLS token (CLIP).
    The layout fields default (None) to `decode_variant(variant)`.
  """
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_layers: int = 39
  num_heads: int = 16
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  variant: str = "eva"
  post_layernorm: bool = True
  post_layernorm_eps: Optional[float] = None
  fused_qkv: Optional[bool] = None
  patch_bias: Optional[bool] = None
  pre_norm: Optional[bool] = None
  softmax_fp32: Optional[bool] = None
  post_norm_sequence: Optional[bool] = None

  def __post_init__(self):
    for name, value in decode_variant(self.variant).items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)  # frozen: fill the defaults once
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"ViTConfig.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"ViTConfig.image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"ViTConfig.hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    """Sequence length: patches plus the class token."""
    return self.num_patches + 1

  @property
  def final_eps(self) -> float:
    return self.layer_norm_eps if self.post_layernorm_eps is None else self.post_layernorm_eps

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ViTConfig":
    """Also reads dicts saved before the layout fields existed (`variant` alone)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown ViTConfig field(s): {unknown}")
    return cls(**dict(d))


class ViTOutput(NamedTuple):
  """What `VisionTransformer` returns.

  last_hidden_state: `[B, T, D]` output of the last layer run. For 'eva' with
    `post_layernorm`, post-normed (as HF Blip2VisionModel's `last_hidden_state`); for 'clip'
    not post-normed (as HF CLIPVisionModel's `last_hidden_state`).
  pooled: `[B, D]` post-normed CLS token (HF `pooler_output`); for 'eva' it is the CLS of the
    already post-normed sequence normed a second time, exactly as HF does. Without a
    `post_layernorm`, the raw CLS token.
  hidden_states: None unless requested; else HF's `hidden_states` tuple: [0] = the encoder
    input (embeddings, after `pre_layrnorm` for 'clip'), [i] = output of layer i, never
    post-normed. LLaVA takes `hidden_states[-2]`.
  """
  last_hidden_state: jax.Array
  pooled: jax.Array
  hidden_states: Optional[tuple]


def activation(name: str, x: jax.Array) -> jax.Array:
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)  # HF "gelu" is the exact erf form
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f"unknown activation {name!r}")


class LayerNorm(nn.Module):
  """LayerNorm computed in fp32 (params `scale`, `bias`), output cast to `dtype`."""
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(self.dtype)


def _dense(features, name, dtype, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(0.02), name=name)


def attention(q, k, v, *, num_heads, mask=None, softmax_fp32=True, impl="xla",
              dropout_rate=0.0, dropout_rng=None):
  """Multi-head attention on `[B, T, D]` projections. `mask` is additive, `[B, 1|H, Tq, Tk]`;
  `impl` as `cirjax.models.attention` ('xla', 'cudnn', 'auto', 'einsum'); attention-probability
  dropout only with a `dropout_rng`."""
  b, tq, d = q.shape
  tk = k.shape[1]
  hd = d // num_heads
  out = dot_attention(q.reshape(b, tq, num_heads, hd), k.reshape(b, tk, num_heads, hd),
                      v.reshape(b, tk, num_heads, hd), bias=mask, softmax_fp32=softmax_fp32,
                      impl=impl, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  return out.reshape(b, tq, d)


class ViTAttention(nn.Module):
  config: ViTConfig
  dtype: Any = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d = cfg.hidden_size
    if cfg.fused_qkv:
      # One fused projection; its bias is a full [3D] vector (HF trains the k part too).
      q, k, v = jnp.split(_dense(3 * d, "qkv", self.dtype)(x), 3, axis=-1)
      out_name = "projection"
    else:
      q, k, v = (_dense(d, n, self.dtype)(x) for n in ("q_proj", "k_proj", "v_proj"))
      out_name = "out_proj"
    out = attention(q, k, v, num_heads=cfg.num_heads, softmax_fp32=cfg.softmax_fp32,
                    impl=self.attention_impl)
    return _dense(d, out_name, self.dtype)(out)


class ViTLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x)).

  `scanned` is the block's role as an `nn.scan` body: 0 plain (returns x), 1 (x, None),
  2 (x, x) to collect every layer's output.
  """
  config: ViTConfig
  dtype: Any = jnp.float32
  attention_impl: str = "xla"
  scanned: int = 0

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layer_norm1")(x)
    x = x + ViTAttention(cfg, self.dtype, self.attention_impl, name="self_attn")(h)
    h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layer_norm2")(x)
    h = _dense(cfg.intermediate_size, "fc1", self.dtype)(h)
    h = activation(cfg.hidden_act, h)
    h = _dense(cfg.hidden_size, "fc2", self.dtype)(h)
    return scan_result(x + h, self.scanned)


def scan_result(x, scanned: int):
  """A block's return value in its `scanned` role (see `ViTLayer`)."""
  return x if scanned == 0 else (x, x if scanned == 2 else None)


def scanned_blocks(block_cls, *, length: int, remat: bool, in_axes=(), static_argnums=(),
                   collections=("params",), remat_policy: str = DEFAULT_POLICY):
  """`block_cls` as an `nn.scan` over `length` steps, params stacked on a leading axis.

  Under remat each step is rematerialised with `remat_policy` (`cirjax.models.remat`;
  `prevent_cse=False`: the scan already keeps XLA from merging the recomputation with the
  forward)."""
  if remat:
    block_cls = remat_layer(block_cls, remat_policy, prevent_cse=False,
                            static_argnums=static_argnums)
  return nn.scan(block_cls, variable_axes={c: 0 for c in collections},
                 split_rngs={"params": True, "dropout": True}, in_axes=in_axes, length=length)


def check_pixels(pixels: Any, config: ViTConfig) -> None:
  """Raises a ValueError naming the offending value unless pixels are [B, S, S, C] float."""
  shape = tuple(getattr(pixels, "shape", ()))
  dtype = getattr(pixels, "dtype", None)
  if len(shape) != 4:
    raise ValueError(f"pixels must be rank 4 NHWC [batch, {config.image_size}, "
                     f"{config.image_size}, {config.num_channels}], got shape {shape}")
  _, h, w, c = shape
  if c != config.num_channels:
    hint = " (channels-first NCHW? cirjax takes NHWC)" if h == config.num_channels else ""
    raise ValueError(f"pixels must have {config.num_channels} channels last (NHWC), got shape "
                     f"{shape}{hint}")
  if (h, w) != (config.image_size, config.image_size):
    raise ValueError(f"pixels must be {config.image_size}x{config.image_size}, got {h}x{w} "
                     f"(shape {shape})")
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"pixels must be a floating dtype (normalised images), got dtype {dtype}")


class VisionTransformer(nn.Module):
  """EVA / CLIP vision transformer (see module docstring).

  Attributes:
    config: the ViTConfig.
    dtype: compute dtype (params stay fp32; LayerNorms and CLIP's softmax run in fp32).
    remat: rematerialise each block in the backward pass (saves activation memory).
    remat_policy: what a rematerialised block keeps (`cirjax.models.remat`).
    attention_impl: see `cirjax.models.attention` ('xla', 'cudnn', 'auto', 'einsum').
    scan_layers: run the blocks as one `nn.scan` (params stacked under `layers`, see
      `layer_stacks`) instead of a Python loop (`layers_{i}`): one compiled block.
  """
  config: ViTConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str = "xla"
  scan_layers: bool = False
  remat_policy: str = DEFAULT_POLICY

  @nn.compact
  def __call__(self, pixels, *, output_hidden_states: bool = False,
               num_layers: Optional[int] = None) -> ViTOutput:
    """Runs the tower.

    Args:
      pixels: `[B, S, S, C]` float, normalised.
      output_hidden_states: also return HF's `hidden_states` tuple.
      num_layers: run only the first `num_layers` blocks (e.g. LLaVA, which reads the
        second-to-last layer, need not compute the last). Default: all. With fewer layers,
        `last_hidden_state`/`pooled` are taken after the last block run.
    """
    cfg = self.config
    check_pixels(pixels, cfg)
    n = cfg.num_layers if num_layers is None else num_layers
    if not 0 <= n <= cfg.num_layers:
      raise ValueError(f"num_layers must be in [0, {cfg.num_layers}], got {num_layers}")
    b = pixels.shape[0]
    p = cfg.patch_size
    g = cfg.image_size // p
    d = cfg.hidden_size

    # Patch embedding as a matmul over flattened (p, p, C) patches: the same numbers as a
    # stride-p conv, row-major patch order as HF's flatten(2).
    kernel = self.param("patch_embedding", nn.initializers.normal(0.02),
                        (p, p, cfg.num_channels, d), jnp.float32)
    x = pixels.astype(self.dtype).reshape(b, g, p, g, p, cfg.num_channels)
    x = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel.astype(self.dtype)).reshape(b, g * g, d)
    if cfg.patch_bias:
      x = x + self.param("patch_bias", nn.initializers.zeros, (d,), jnp.float32).astype(self.dtype)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (d,), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
    pos = self.param("position_embedding", nn.initializers.normal(0.02),
                     (cfg.num_positions, d), jnp.float32)
    x = x + pos.astype(self.dtype)[None]
    if cfg.pre_norm:
      x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="pre_layrnorm")(x)

    if self.scan_layers:
      x, hidden = self._scan(x, n, output_hidden_states)
    else:  # one named module per block (`layers_{i}`, the converters' tree)
      layer_cls = remat_layer(ViTLayer, self.remat_policy) if self.remat else ViTLayer
      hidden = [x] if output_hidden_states else None
      for i in range(n):
        x = layer_cls(cfg, self.dtype, self.attention_impl, name=f"layers_{i}")(x)
        if hidden is not None:
          hidden.append(x)

    if cfg.post_layernorm:
      post = LayerNorm(cfg.final_eps, self.dtype, name="post_layernorm")
      if cfg.post_norm_sequence:
        last = post(x)
        pooled = post(last[:, 0])
      else:
        last = x
        pooled = post(x[:, 0])
    else:
      last, pooled = x, x[:, 0]
    return ViTOutput(last, pooled, tuple(hidden) if hidden is not None else None)

  def _scan(self, x, n: int, output_hidden_states: bool):
    """All blocks as one scan; a shallower `n` reads layer n's output from the collected ones
    (the scan runs every block: its params have one leading length)."""
    cfg = self.config
    collect = output_hidden_states or n < cfg.num_layers
    blocks = scanned_blocks(ViTLayer, length=cfg.num_layers, remat=self.remat,
                            remat_policy=self.remat_policy)
    last, ys = blocks(cfg, self.dtype, self.attention_impl, 2 if collect else 1,
                      name="layers")(x)
    if not collect:
      return last, None
    hidden = [x] + [ys[i] for i in range(n)]
    return hidden[-1], (hidden if output_hidden_states else None)


def layer_stacks(config: ViTConfig) -> list[Stack]:
  """The tower's run of blocks (`layers_{i}` per layer, `layers` stacked)."""
  return [Stack((), "layers_{}", "layers", config.num_layers)]


def init_vit_params(config: ViTConfig, rng: Optional[jax.Array] = None) -> dict:
  """Random params (for tests and shape checks); use the converters for real weights."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  return jax.jit(lambda r, x: VisionTransformer(config).init(r, x)["params"])(rng, x)


def abstract_vit_params(config: ViTConfig) -> dict:
  """Shapes/dtypes of the param tree, without allocating it."""
  x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels),
                           jnp.float32)
  return jax.eval_shape(lambda r, x: VisionTransformer(config).init(r, x)["params"],
                        jax.random.PRNGKey(0), x)


# ---------------------------------------------------------------------------------------------
# The HF weight table, run by `cirjax.convert.engine`. Keys are relative to the tower's prefix
# (e.g. 'vision_model.' in a Blip2ForImageTextRetrieval checkpoint, 'vision_tower.vision_model.'
# in LLaVA).

def _ln_rows(dst, src):
  return [(dst + ("scale",), src + ".weight", "id"), (dst + ("bias",), src + ".bias", "id")]


def _dense_rows(dst, src, bias=True):
  rows = [(dst + ("kernel",), src + ".weight", "linear")]
  if bias:
    rows.append((dst + ("bias",), src + ".bias", "id"))
  return rows


def vit_hf_table(config: ViTConfig) -> list[tuple[tuple, str, str]]:
  """Rows (cirjax param path, HF key relative to the tower prefix, transform name)."""
  if config.variant == "eva":  # Blip2VisionEmbeddings keeps leading singleton dims
    rows = [(("class_embedding",), "embeddings.class_embedding", "lead2"),
            (("position_embedding",), "embeddings.position_embedding", "lead1")]
  else:
    rows = [(("class_embedding",), "embeddings.class_embedding", "id"),
            (("position_embedding",), "embeddings.position_embedding.weight", "id")]
  rows.append((("patch_embedding",), "embeddings.patch_embedding.weight", "conv"))
  if config.patch_bias:
    rows.append((("patch_bias",), "embeddings.patch_embedding.bias", "id"))
  if config.pre_norm:
    rows += _ln_rows(("pre_layrnorm",), "pre_layrnorm")
  for i in range(config.num_layers):
    dst, src = (f"layers_{i}",), f"encoder.layers.{i}"
    rows += _ln_rows(dst + ("layer_norm1",), src + ".layer_norm1")
    rows += _ln_rows(dst + ("layer_norm2",), src + ".layer_norm2")
    if config.fused_qkv:
      rows += _dense_rows(dst + ("self_attn", "qkv"), src + ".self_attn.qkv")
      rows += _dense_rows(dst + ("self_attn", "projection"), src + ".self_attn.projection")
    else:
      for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rows += _dense_rows(dst + ("self_attn", name), f"{src}.self_attn.{name}")
    rows += _dense_rows(dst + ("fc1",), src + ".mlp.fc1")
    rows += _dense_rows(dst + ("fc2",), src + ".mlp.fc2")
  if config.post_layernorm:
    rows += _ln_rows(("post_layernorm",), "post_layernorm")
  return rows


def vit_config_from_hf(hf: Mapping[str, Any], variant: str) -> ViTConfig:
  """ViTConfig from an HF vision config dict (`Blip2VisionConfig` / `CLIPVisionConfig`)."""
  defaults = {"eva": dict(hidden_act="gelu", layer_norm_eps=1e-6),
              "clip": dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)}[variant]
  act = hf.get("hidden_act", defaults["hidden_act"])
  if variant == "eva" and not hf.get("qkv_bias", True):
    raise ValueError("Blip2VisionConfig.qkv_bias=False is not supported (every BLIP-2 "
                     "checkpoint has q/v biases)")
  if act not in ACTIVATIONS:
    raise ValueError(f"vision hidden_act {act!r} is not supported (expected one of {ACTIVATIONS})")
  return ViTConfig(
      image_size=int(hf.get("image_size", 224)),
      patch_size=int(hf.get("patch_size", 14)),
      num_channels=int(hf.get("num_channels", 3)),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=int(hf["num_attention_heads"]),
      layer_norm_eps=float(hf.get("layer_norm_eps", defaults["layer_norm_eps"])),
      hidden_act=act,
      variant=variant,
  )


def vit_config_to_hf(config: ViTConfig) -> dict:
  """HF vision config fields for this tower."""
  return dict(image_size=config.image_size, patch_size=config.patch_size,
              num_channels=config.num_channels, hidden_size=config.hidden_size,
              intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
              num_attention_heads=config.num_heads, layer_norm_eps=config.layer_norm_eps,
              hidden_act=config.hidden_act)

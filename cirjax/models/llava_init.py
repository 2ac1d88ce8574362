"""A LLaVA-Phi model without a checkpoint: its config from a training config's widths and
random parameters drawn fast. For random-init runs, the compile benchmark and tests; a
checkpoint brings its own config and weights (`cirjax.convert.registry`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cirjax.errors import ConfigError
from cirjax.models import llava
from cirjax.models.phi3 import Phi3Config
from cirjax.models.vit import ViTConfig


def config_from_widths(mc: Any, vocab_size: int, image_token_id: int,
                       compute_dtype: str) -> llava.LlavaConfig:
  """A LlavaConfig from a training config's `model` widths (`mc.vision`, `mc.text`: a
  random init; a checkpoint brings its own config)."""
  v, t = mc.vision, mc.text
  vs = int(t.get("vocab_size", 0) or 0)
  if vs == 0:  # the tokenizer's size, rounded up as checkpoints pad their embeddings
    vs = -(-vocab_size // 64) * 64
  if vocab_size > vs:
    raise ConfigError(f"config.model.text.vocab_size={vs} is smaller than the tokenizer's "
                      f"{vocab_size} tokens")
  vision = ViTConfig(image_size=int(v.image_size), patch_size=int(v.patch_size),
                     hidden_size=int(v.hidden_size), intermediate_size=int(v.intermediate_size),
                     num_layers=int(v.num_layers), num_heads=int(v.num_heads),
                     layer_norm_eps=1e-5, hidden_act="quick_gelu", variant="clip",
                     post_layernorm=True)
  text = Phi3Config(vocab_size=vs, hidden_size=int(t.hidden_size),
                    intermediate_size=int(t.intermediate_size), num_layers=int(t.num_layers),
                    num_heads=int(t.num_heads), num_kv_heads=int(t.num_kv_heads),
                    max_position_embeddings=int(t.get("max_position_embeddings", 4096)),
                    layout=t.get("layout", "fused"), rope_theta=float(t.get("rope_theta", 1e4)))
  return llava.LlavaConfig(vision=vision, text=text, image_token_id=image_token_id,
                           vision_feature_layer=int(mc.get("vision_feature_layer", -2)),
                           dtype=compute_dtype)


def random_params(config: llava.LlavaConfig, rng: jax.Array) -> dict:
  """Random LLaVA parameters with the tree of `llava.init_params`, drawn as one normal
  vector sliced per leaf (compiles in a fraction of the time of the per-module Flax init):
  biases 0, norm scales 1, kernels N(0, 1/fan_in), embeddings N(0, 0.02^2)."""
  abstract = llava.abstract_params(config)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  sizes = [int(np.prod(l.shape)) for _, l in leaves]
  flat = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  out, off = [], 0
  for (path, leaf), n in zip(leaves, sizes):
    names = [str(getattr(k, "key", k)) for k in path]
    name, parent = names[-1], names[-2] if len(names) > 1 else ""
    if name == "bias":
      x = jnp.zeros(leaf.shape, leaf.dtype)
    elif name in ("scale", "weight") and ("norm" in parent or "layrnorm" in parent):
      x = jnp.ones(leaf.shape, leaf.dtype)
    else:
      fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" or leaf.ndim == 4 else 0
      std = 1.0 / np.sqrt(fan_in) if fan_in else 0.02
      x = (flat[off:off + n].reshape(leaf.shape) * std).astype(leaf.dtype)
    off += n
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)

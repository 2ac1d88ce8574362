"""One attention core for the ViT, the Q-Former and Phi-3, with an implementation switch.

`attention_impl` (a field of `Blip2Config` / `LlavaConfig`, passed down as a module attribute):

* 'xla' (default, and what parity runs use): `jax.nn.dot_product_attention(implementation=
  'xla')`. Its logits accumulate in fp32 and its softmax is always fp32, so in fp32 it computes
  exactly what the einsum formulation does; in bf16/fp16 its logits are more precise (fp32
  accumulation instead of rounding the logits to the compute dtype).
* 'cudnn': the same call with `implementation='cudnn'`, cuDNN's fused (flash) kernels; GPU
  only, bf16/fp16 only.
* 'auto' (the training configs' choice): 'cudnn' when the default backend is a GPU and the
  compute dtype is bf16/fp16, else 'xla'; a model whose softmax is not fp32 (below) stays on
  'xla'.
* 'einsum': the explicit einsum + softmax + einsum formulation (the reference the others are
  tested against).

A model whose softmax runs in the compute dtype (`softmax_fp32=False`: HF BLIP-2's EVA ViT)
cannot be expressed by `dot_product_attention`, whose softmax is always fp32; under 'xla' such a
model keeps the einsum path in bf16/fp16 so HF's numerics hold, under 'auto' too. 'cudnn' is an
explicit opt-in to the fused kernel (fp32 softmax inside) for it.

Attention-probability dropout (`dropout_rate` with a `dropout_rng`: the Q-Former in a training
step) runs on the einsum path whatever `impl` says: `dot_product_attention` never exposes the
probabilities, so it cannot drop them. Without a `dropout_rng` (every encode, mining and
evaluation call) nothing changes.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn", "auto", "einsum")
_REDUCED = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_attention_impl(owner: str, value) -> None:
  """ValueError unless a config's `attention_impl` names one of `ATTENTION_IMPLS`."""
  if value not in ATTENTION_IMPLS:
    raise ValueError(f"{owner}.attention_impl must be one of {ATTENTION_IMPLS}, got {value!r}")


def resolve_impl(impl: str, dtype) -> str:
  """The implementation a call runs: 'auto' decided by backend and compute dtype."""
  check_attention_impl("attention", impl)
  if impl == "auto":
    gpu = jax.default_backend() == "gpu"
    return "cudnn" if gpu and jnp.dtype(dtype) in _REDUCED else "xla"
  return impl


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
  """Inverted dropout as `torch.nn.Dropout` in train mode: each element zeroed with
  probability `rate`, the rest scaled by 1 / (1 - rate). Identity without an `rng` (eval)."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


def _einsum_attention(q, k, v, bias, softmax_fp32, dropout_rate=0.0, dropout_rng=None):
  b, tq, n, hd = q.shape
  tk, nkv = k.shape[1], k.shape[2]
  # Query head i reads key/value head i // (n / nkv) (grouped-query attention).
  qg = q.reshape(b, tq, nkv, n // nkv, hd)
  logits = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k) * (hd ** -0.5)
  if softmax_fp32:
    logits = logits.astype(jnp.float32)
  if bias is not None:  # [B, 1|N, Tq, Tk] -> [B, G, 1|R, Tq, Tk]
    bias = bias.reshape(bias.shape[0], 1, bias.shape[1], *bias.shape[2:]) \
        if bias.shape[1] == 1 else bias.reshape(bias.shape[0], nkv, n // nkv, *bias.shape[2:])
    logits = logits + bias.astype(logits.dtype)
  probs = dropout(jax.nn.softmax(logits, axis=-1).astype(v.dtype), dropout_rate, dropout_rng)
  out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v)
  return out.reshape(b, tq, n, hd)


def dot_attention(q, k, v, *, bias: Optional[jax.Array] = None, softmax_fp32: bool = True,
                  impl: str = "xla", dropout_rate: float = 0.0,
                  dropout_rng: Optional[jax.Array] = None) -> jax.Array:
  """Attention on `[B, T, N, H]` queries and `[B, S, K, H]` keys/values (K divides N).

  `bias` is additive, broadcastable to `[B, N, T, S]` with a singleton or full head axis
  (padding / causal masks as large negative values). Scale is `H ** -0.5`. Returns
  `[B, T, N, H]` in the dtype of `v`. With a `dropout_rng` and `dropout_rate` > 0 the
  probabilities are dropped (einsum path, see the module docstring).
  """
  if dropout_rng is not None and dropout_rate > 0.0:
    return _einsum_attention(q, k, v, bias, softmax_fp32, dropout_rate, dropout_rng)
  if impl == "auto" and not softmax_fp32:
    impl = "xla"  # the fused kernels' softmax is fp32, not this model's: 'cudnn' only when asked
  impl = resolve_impl(impl, q.dtype)
  reduced = jnp.dtype(q.dtype) in _REDUCED
  if impl == "einsum" or (impl == "xla" and reduced and not softmax_fp32):
    return _einsum_attention(q, k, v, bias, softmax_fp32)
  if bias is not None:
    if impl == "cudnn":  # cuDNN takes the bias in the input dtype; keep it finite there
      bias = jnp.maximum(bias.astype(jnp.float32), jnp.finfo(q.dtype).min).astype(q.dtype)
    else:
      bias = bias.astype(jnp.promote_types(q.dtype, jnp.float32))
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=q.shape[-1] ** -0.5,
                                      implementation=impl).astype(v.dtype)

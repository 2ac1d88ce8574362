"""QuRe's / BLIP-2's score of a query with an image: the max over the image's tokens of the
dot products, `s(q, t) = max_k <t_k, q>` (docs/reference_semantics.md#qure-training).

`max_over_tokens` is the one body of that score: the model's `blip2.score`, the losses
(`qure_scores`, `qure_logits`), training's mining blocks, retrieval's device kernels and the
mining audit all call it, so a change of layout or precision happens here once. It keeps
the 3-D einsum form the training losses always used (their numbers, forward and backward,
stay bit for bit); at retrieval's query blocks (256 rows) XLA's CPU backend gives the same
bits as the flat `[B, D] x [D, N*K]` matmul retrieval used before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_over_tokens(query: jax.Array, tokens: jax.Array, *, paired: bool = False,
                    precision=None) -> jax.Array:
  """Max over the K tokens of `<tokens_k, query>`.

  Args:
    query: `[B, D]` query embeddings.
    tokens: all pairs (`paired=False`): `[N, K, D]`, every query against every item;
      paired: `[B, ..., K, D]`, row b's items scored against query b only.
    paired: see `tokens`.
    precision: `jax.lax.Precision` of the contraction (None: the backend's default).

  Returns:
    `[B, N]` (all pairs) or `[B, ...]` (paired), in the inputs' dtype.
  """
  spec = "bd,b...kd->b...k" if paired else "bd,nkd->bnk"
  return jnp.einsum(spec, query, tokens, precision=precision).max(-1)

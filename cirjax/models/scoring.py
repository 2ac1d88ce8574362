"""QuRe's / BLIP-2's score of a query with an image: the max over the image's tokens of the
dot products, `s(q, t) = max_k <t_k, q>` (docs/reference_semantics.md#qure-training).

`max_over_tokens` is the one body of that score: the model's `blip2.score`, the losses
(`qure_scores`, `qure_logits`), training's mining blocks, retrieval's device kernels and the
mining audit all call it, so a change of layout or precision happens here once. It keeps
the 3-D einsum form the training losses always used (their numbers, forward and backward,
stay bit for bit). `flat=True` computes the same scores as one `[B, D] x [D, N*K]` matmul
and a max over each item's K columns: on XLA's CPU backend that is 2.3x faster than the
einsum at retrieval's blocks (256 queries x 256 items x 32 tokens;
benchmarks/profile_retrieval.py), with the same bits (tests/test_retrieval_paths.py);
retrieval's ranking programs use it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_over_tokens(query: jax.Array, tokens: jax.Array, *, paired: bool = False,
                    precision=None, flat: bool = False) -> jax.Array:
  """Max over the K tokens of `<tokens_k, query>`.

  Args:
    query: `[B, D]` query embeddings.
    tokens: all pairs (`paired=False`): `[N, K, D]`, every query against every item;
      paired: `[B, ..., K, D]`, row b's items scored against query b only.
    paired: see `tokens`.
    precision: `jax.lax.Precision` of the contraction (None: the backend's default).
    flat: all pairs only: one flat matmul, then the max (see the module docstring).

  Returns:
    `[B, N]` (all pairs) or `[B, ...]` (paired), in the inputs' dtype.
  """
  if flat:
    if paired:
      raise ValueError("max_over_tokens: flat=True scores all pairs only")
    n, k, d = tokens.shape
    s = jnp.matmul(query, tokens.reshape(n * k, d).T, precision=precision)
    return s.reshape(query.shape[0], n, k).max(-1)
  spec = "bd,b...kd->b...k" if paired else "bd,nkd->bnk"
  return jnp.einsum(spec, query, tokens, precision=precision).max(-1)

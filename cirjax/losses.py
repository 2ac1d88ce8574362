"""The two training objectives: QuRe's pairwise sigmoid loss and InstructCIR's InfoNCE.

Both are pure `jnp` functions that upcast to float32 whatever the compute dtype, so they can
sit at the end of a bf16 forward pass inside a jitted train step.

*Pairwise sigmoid (QuRe, Eqs. 2-3).* The reference computes `log_softmax` over the two
logits `[s(q, t+), s(q, t-)]` and takes the KL divergence to `[1, 0]` with batch mean. That
is `-mean log sigma(s+ - s-)`, computed here as `-log_sigmoid(s+ - s-)`, which is finite for
any margin (no `exp` overflow, no `log(0)`). The scores are QuRe's: the max over the 32
target tokens of the dot product with the composed query, divided by the learned
temperature (`qure_scores`).

*InfoNCE (InstructCIR, Eqs. 1-2).* Row i: cosine similarities of query i with every target
of the **global** batch, divided by tau (0.05), plus optional hard-negative columns; the
label is i; cross-entropy averaged over the global batch; one-directional by default.
Written over global arrays: under `jax.jit` with the batch sharded over a mesh the compiler
gathers what each device needs, and the loss and its gradients are exactly those of the
single-device computation on the concatenated batch (tested on 4 devices).

*QuRe's InfoNCE variant* (`config.qure.loss = "infonce"`): `qure_logits` scores each query
against every positive and negative of the global batch, `info_nce_from_logits` takes the
cross-entropy with the positive on the diagonal.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from cirjax.models.scoring import max_over_tokens

REDUCTIONS = ("mean", "sum", "none")
HARD_NEGATIVE_SCOPES = ("batch", "own")


def _reduce(x: jax.Array, reduction: str) -> jax.Array:
  if reduction == "mean":
    return jnp.mean(x)
  if reduction == "sum":
    return jnp.sum(x)
  if reduction == "none":
    return x
  raise ValueError(f"reduction={reduction!r}; expected one of {REDUCTIONS}")


def qure_scores(query: jax.Array, target_tokens: jax.Array,
                temperature: Optional[jax.Array] = None) -> jax.Array:
  """QuRe's score `s(q, t) = max_k <t_k, q> / temp`, paired row by row.

  Args:
    query: `[B, D]` composed-query embeddings (L2-normalised).
    target_tokens: `[B, K, D]` target image token features (L2-normalised, K = 32).
    temperature: the learned `temp` (scalar); None scores without it (`use_temp=False`).

  Returns:
    `[B]` float32 scores.
  """
  if query.ndim != 2 or target_tokens.ndim != 3:
    raise ValueError(f"query must be [B, D] and target_tokens [B, K, D], got {query.shape} "
                     f"and {target_tokens.shape}")
  if query.shape[0] != target_tokens.shape[0] or query.shape[1] != target_tokens.shape[2]:
    raise ValueError(f"query {query.shape} and target_tokens {target_tokens.shape} disagree")
  s = max_over_tokens(query.astype(jnp.float32), target_tokens.astype(jnp.float32), paired=True)
  if temperature is not None:
    s = s / jnp.asarray(temperature, jnp.float32)
  return s


def qure_logits(query: jax.Array, target_tokens: jax.Array,
                temperature: Optional[jax.Array] = None) -> jax.Array:
  """QuRe's score of every query with every target, `[B, N]` float32: `max_k <t_k, q> / temp`.

  `query` is `[B, D]`, `target_tokens` `[N, K, D]`; with the positives as the first B targets
  this is the logit matrix of QuRe's InfoNCE variant (`info_nce_from_logits`).
  """
  q = jnp.asarray(query).astype(jnp.float32)
  t = jnp.asarray(target_tokens).astype(jnp.float32)
  if q.ndim != 2 or t.ndim != 3 or q.shape[1] != t.shape[2]:
    raise ValueError(f"query must be [B, D] and target_tokens [N, K, D], got {q.shape} and "
                     f"{t.shape}")
  s = max_over_tokens(q, t, precision=jax.lax.Precision.HIGHEST)
  if temperature is not None:
    s = s / jnp.asarray(temperature, jnp.float32)
  return s


def pairwise_sigmoid_loss(pos_scores: jax.Array, neg_scores: jax.Array, *,
                          reduction: str = "mean") -> jax.Array:
  """QuRe's Bradley-Terry loss `-log sigma(s_pos - s_neg)`, in float32.

  Args:
    pos_scores: `[B]` scores of each query with its target (temperature already applied,
      as `qure_scores` returns them).
    neg_scores: `[B]` (one negative per query, as QuRe trains) or `[B, M]` (M negatives per
      query, each paired with the positive; the mean is over all B*M pairs).
    reduction: `"mean"` (the reference's batch mean), `"sum"` or `"none"`.

  Returns:
    The reduced loss (a float32 scalar), or per-pair losses for `"none"`.
  """
  pos = jnp.asarray(pos_scores).astype(jnp.float32)
  neg = jnp.asarray(neg_scores).astype(jnp.float32)
  if pos.ndim != 1:
    raise ValueError(f"pos_scores must be [B], got shape {pos.shape}")
  if neg.ndim not in (1, 2) or neg.shape[0] != pos.shape[0]:
    raise ValueError(f"neg_scores must be [B] or [B, M] with B={pos.shape[0]}, "
                     f"got shape {neg.shape}")
  margin = (pos if neg.ndim == 1 else pos[:, None]) - neg
  return _reduce(-jax.nn.log_sigmoid(margin), reduction)


def _normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  # Same as torch.nn.functional.normalize: x / max(||x||, eps).
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _all_rows(x: jax.Array) -> jax.Array:
  """`x` replicated on every device when its batch axis is explicitly sharded.

  Under a mesh with Explicit axes (`jax.make_mesh`'s default) a row-sharded query times a
  row-sharded target would be sharded twice over the same axis; every device needs all the
  columns, so gather them (under Auto axes the compiler makes the same choice itself).
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(p is None for p in spec):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def info_nce_logits(query: jax.Array, target: jax.Array, *, temperature: float = 0.05,
                    hard_negatives: Optional[jax.Array] = None,
                    hard_negative_scope: str = "batch", normalize: bool = True) -> jax.Array:
  """The `[B, B + H']` logit matrix of `info_nce_loss` (column i of row i is the positive).

  `H' = B*H` for `hard_negative_scope="batch"`, `H` for `"own"`.
  """
  if hard_negative_scope not in HARD_NEGATIVE_SCOPES:
    raise ValueError(f"hard_negative_scope={hard_negative_scope!r}; expected one of "
                     f"{HARD_NEGATIVE_SCOPES}")
  q = jnp.asarray(query).astype(jnp.float32)
  t = jnp.asarray(target).astype(jnp.float32)
  if q.ndim != 2 or t.shape != q.shape:
    raise ValueError(f"query and target must both be [B, D], got {q.shape} and {t.shape}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if normalize:
    q, t = _normalize(q), _normalize(t)
  logits = jnp.einsum("id,jd->ij", q, _all_rows(t))
  if hard_negatives is not None:
    h = jnp.asarray(hard_negatives).astype(jnp.float32)
    if h.ndim == 2:
      h = h[:, None, :]
    if h.ndim != 3 or h.shape[0] != q.shape[0] or h.shape[2] != q.shape[1]:
      raise ValueError(f"hard_negatives must be [B, D] or [B, H, D] with B={q.shape[0]}, "
                       f"D={q.shape[1]}, got {jnp.shape(hard_negatives)}")
    if normalize:
      h = _normalize(h)
    if hard_negative_scope == "batch":
      # Every query sees every hard negative of the global batch (SimCSE/E5-V layout).
      extra = jnp.einsum("id,jhd->ijh", q, _all_rows(h)).reshape(q.shape[0], -1)
    else:
      extra = jnp.einsum("id,ihd->ih", q, h)   # only the row's own hard negatives
    logits = jnp.concatenate([logits, extra], axis=1)
  return logits / jnp.float32(temperature)


def info_nce_loss(query: jax.Array, target: jax.Array, *, temperature: float = 0.05,
                  hard_negatives: Optional[jax.Array] = None,
                  hard_negative_scope: str = "batch", symmetric: bool = False,
                  normalize: bool = True, reduction: str = "mean") -> jax.Array:
  """InfoNCE over the global batch, in float32 (InstructCIR: cosine / 0.05, one direction).

  Args:
    query: `[B, D]` query embeddings (image+instruction, or image in stage 1). Pass the
      global batch: inside `jax.jit` a batch-sharded array is the global batch.
    target: `[B, D]` the matching targets (modified captions); row i's positive is
      target i, every other target is an in-batch negative.
    temperature: tau; logits are cosine similarity / tau.
    hard_negatives: optional `[B, D]` or `[B, H, D]` extra negatives (InstructCIR stage 2:
      the original caption), added as extra logit columns.
    hard_negative_scope: `"batch"` (default; each query sees all B*H hard negatives, as the
      SimCSE-style reference code concatenates them) or `"own"` (only its own H, the
      paper's wording "the original caption of the current sample").
    symmetric: also add the target->query direction (in-batch columns only) and average
      the two; InstructCIR trains one-directional.
    normalize: L2-normalise the embeddings first (cosine similarity).
    reduction: `"mean"` over the global batch, `"sum"`, or `"none"` (per row).

  Returns:
    The loss (float32).
  """
  logits = info_nce_logits(query, target, temperature=temperature,
                           hard_negatives=hard_negatives,
                           hard_negative_scope=hard_negative_scope, normalize=normalize)
  return info_nce_from_logits(logits, symmetric=symmetric, reduction=reduction)


def info_nce_from_logits(logits: jax.Array, *, symmetric: bool = False,
                         reduction: str = "mean") -> jax.Array:
  """Cross-entropy of a `[B, B + extra]` logit matrix whose row i has its positive in column i.

  The in-batch columns come first, any extra negative columns after them (as
  `info_nce_logits` and `qure_logits` lay them out). `symmetric` also adds the column
  direction over the in-batch columns. Computed in float32.
  """
  logits = jnp.asarray(logits).astype(jnp.float32)
  b = logits.shape[0]
  if logits.ndim != 2 or logits.shape[1] < b:
    raise ValueError(f"logits must be [B, B + extra], got shape {logits.shape}")
  # Cross-entropy with the label on the diagonal: logsumexp - logit[i, i] (stable). The
  # diagonal is read through a mask, not a gather, so it stays elementwise under sharding.
  eye = (jax.lax.broadcasted_iota(jnp.int32, (b, b), 0)
         == jax.lax.broadcasted_iota(jnp.int32, (b, b), 1))
  cols = logits[:, :b]
  pos = jnp.sum(jnp.where(eye, cols, 0.0), axis=1)
  per_row = jax.nn.logsumexp(logits, axis=1) - pos
  if symmetric:
    per_row_t = jax.nn.logsumexp(cols, axis=0) - pos
    per_row = 0.5 * (per_row + per_row_t)
  return _reduce(per_row, reduction)


__all__ = ["qure_scores", "qure_logits", "pairwise_sigmoid_loss", "info_nce_logits",
           "info_nce_loss", "info_nce_from_logits", "REDUCTIONS", "HARD_NEGATIVE_SCOPES"]

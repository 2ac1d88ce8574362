"""Rematerialisation policies: what a rematerialised layer keeps from its forward pass.

`remat` (a model-config field and a training key) turns layer-wise rematerialisation on; the
policy (`remat_policy`) says which of a layer's intermediate values the backward pass reads
from memory instead of recomputing (`jax.checkpoint_policies`):

* `full`: save nothing but the layer's input, recompute the whole layer (least memory, one
  more forward pass; `jax.checkpoint_policies.nothing_saveable`).
* `dots_saveable`: keep every matmul output (attention scores included), recompute only the
  cheap elementwise work (norms, activations, softmax).
* `dots_with_no_batch_dims_saveable`: keep the outputs of matmuls with no batch dimension,
  i.e. the projections and MLP matmuls against the weights, and recompute the attention
  (whose scores grow with the sequence length squared).

The policy changes what is stored, never the math: gradients are the same as without remat.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: nothing saved (= nothing_saveable)
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DEFAULT_POLICY = "full"


def check_remat_policy(owner: str, value: Any) -> None:
  """ValueError naming `owner.remat_policy` and the choices unless `value` is a policy name."""
  if value not in REMAT_POLICIES:
    raise ValueError(f"{owner}.remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                     f"got {value!r}")


def remat_layer(layer_cls, policy: str = DEFAULT_POLICY, **kw):
  """`nn.remat(layer_cls, policy=...)` for a policy name (kw: static_argnums, prevent_cse)."""
  check_remat_policy("model config", policy)
  return nn.remat(layer_cls, policy=REMAT_POLICIES[policy], **kw)

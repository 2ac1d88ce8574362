"""The compiled train step: `(state, batch) -> (state, metrics)`, one XLA program per run.

Dtype policy (three knobs): parameters are stored in fp32 (`TrainState.params`), the forward
runs on a copy cast to `compute_dtype` (bf16 on accelerators) except parameters whose path
matches `fp32_params` (norms, temperatures), and the loss is reduced in fp32 by the task's
loss function. Gradients flow back through the cast, so the optimizer sees fp32 gradients.

Gradient accumulation splits the global batch into `accum_steps` strided micro-batches
(rows a, a+A, a+2A, ...), so every device holds a slice of every micro-batch and no
resharding happens; the update is applied once with the mean gradient. With InfoNCE the
in-batch negatives are then the micro-batch's, as in any accumulation scheme.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from cirjax.models.layer_stack import Stack
from cirjax.train.sharding import path_str
from cirjax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]

DEFAULT_FP32_PARAMS = r"(.*(norm|Norm|ln_|layernorm|LayerNorm|temp|scale).*)"


def cast_params(params: Any, dtype: str | jnp.dtype, keep_fp32: str = DEFAULT_FP32_PARAMS,
                uncast: Any = None) -> Any:
  """Floating parameters cast to `dtype`, except those whose path matches `keep_fp32` and
  those where the bool pytree `uncast` (same structure) is True."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return params
  rx = re.compile(keep_fp32) if keep_fp32 else None

  def one(path, x, skip=False):
    if skip or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if rx is not None and rx.fullmatch(path_str(path)):
      return x
    return x.astype(dtype)
  if uncast is None:
    return jax.tree_util.tree_map_with_path(one, params)
  return jax.tree_util.tree_map_with_path(one, params, uncast)


def frozen_in_layers(mask: Any, stacks: Sequence[Stack]) -> Any:
  """Bool pytree over `mask`'s leaves: frozen (mask False) and inside one of the stacked runs
  `stacks` -- the parameters a `scan_layers` step leaves fp32 for the model's scan to cast one
  layer at a time."""
  runs = tuple("/".join(s.parent + (s.stacked,)) + "/" for s in stacks)
  return jax.tree_util.tree_map_with_path(
      lambda path, m: bool(runs) and not m and path_str(path).startswith(runs), mask)


def _microbatches(batch: dict, n: int) -> dict:
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch dimension {x.shape[0]} is not divisible by accum_steps={n}")
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mask: Any, *,
                    schedule: Callable | None = None, seed: int = 0, accum_steps: int = 1,
                    compute_dtype: str = "float32",
                    fp32_params: str = DEFAULT_FP32_PARAMS,
                    cast_in_layers: Sequence[Stack] = ()) -> Callable:
  """Builds the pure step. `loss_fn(params, batch, rng) -> (loss, aux)`: loss a fp32 scalar
  (mean over the batch), aux a dict of fp32 scalars to log.

  `cast_in_layers`: the stacked runs of layers of a `scan_layers` state. Their frozen
  parameters enter the model fp32 and the scan casts each layer's slice as it runs (its dense
  layers cast their kernels to the compute dtype): the same bits as a cast up front, which
  would hold a compute-dtype copy of every frozen layer through the whole step (InstructCIR's
  3.8B-parameter base: XLA's plan drops from 59.8 to 45.7 GiB of temp). Trained parameters
  are still cast up front: cast in the scan, their plan grows (QuRe's Q-Former: +0.9 GiB).

  Frozen parameters (mask False) are wrapped in stop_gradient, so XLA drops their gradient
  computation entirely; their optimizer transform is set_to_zero with no state.

  Rematerialisation is the task's business (its model wraps each layer, from `config.remat`):
  a checkpoint around the whole forward saves no memory (the backward pass re-runs it and
  then holds every residual anyway) and, over layer-wise remat, runs the forward a third time.
  """

  uncast = frozen_in_layers(mask, cast_in_layers)

  def forward(params, batch, rng):
    params = jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p), mask, params)
    params = cast_params(params, compute_dtype, fp32_params, uncast)
    loss, aux = loss_fn(params, batch, rng)
    return loss.astype(jnp.float32), aux

  grad_fn = jax.value_and_grad(forward, has_aux=True)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    if accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    else:
      micro = _microbatches(batch, accum_steps)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

      def body(carry, xs):
        i, mb = xs
        g_acc, l_acc, a_acc = carry
        (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        g_acc = jax.tree.map(lambda x, y: x + y.astype(jnp.float32), g_acc, g)
        a_acc = jax.tree.map(lambda x, y: x + y, a_acc, a)
        return (g_acc, l_acc + l, a_acc), None

      first_mb = jax.tree.map(lambda x: x[0], micro)
      aux_shape = jax.eval_shape(lambda: forward(state.params, first_mb, rng)[1])
      a0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
      (grads, loss, aux), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), a0),
          (jnp.arange(accum_steps), micro))
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
      loss = loss / accum_steps
      aux = jax.tree.map(lambda a: a / accum_steps, aux)
    grads = jax.tree.map(lambda m, g: g if m else jnp.zeros_like(g), mask, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return step


def format_bytes(n: float | None) -> str:
  if n is None:
    return "?"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024:
      return f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} PiB"


def compile_step(step: Callable, abstract_state: Any, state_shardings: Any,
                 abstract_batch: dict, batch_shardings: dict, metrics_sharding: Any,
                 *, verbose: bool = True, name: str = "train step"):
  """Lowers and compiles the step ahead of time (state donated); prints memory_analysis().

  A run that cannot fit fails here, in seconds, instead of after the first data load.
  """
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, metrics_sharding), donate_argnums=(0,))
  lowered = jitted.lower(abstract_state, abstract_batch)
  compiled = lowered.compile()
  mem = memory_summary(compiled)
  if verbose and jax.process_index() == 0:
    print(f"[cirjax] compiled {name}: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in mem.items()),
          file=sys.stderr, flush=True)
  return compiled, mem


def memory_summary(compiled) -> dict:
  """Per-device argument/output/temp/code bytes of a compiled program (None if unknown)."""
  out = {}
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    m = None
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "alias_size_in_bytes"):
    out[key.replace("_size_in_bytes", "")] = getattr(m, key, None) if m is not None else None
  return out

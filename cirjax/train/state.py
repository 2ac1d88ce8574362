"""Train state, regex freezing and the optimizer with the papers' learning-rate schedules."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax

from cirjax.errors import ConfigError
from cirjax.models import layer_stack
from cirjax.train.sharding import path_str


@flax.struct.dataclass
class TrainState:
  """Everything on device that a step updates. Host-side state (data position, sampler,
  mining sets) lives beside it in the checkpoint, not here."""
  step: jax.Array
  params: Any
  opt_state: Any


def trainable_mask(params: Any, freeze: Sequence[str] = (), train_only: Sequence[str] = ()) -> Any:
  """Bool pytree: True where the parameter is trained.

  `freeze`: regexes (full match on 'a/b/c' paths) of frozen parameters, e.g. `vision/.*`.
  `train_only`: if given, only parameters matching one of these are trained (LoRA-only).
  A regex matching nothing is an error: a typo would otherwise silently train everything.
  """
  freeze_rx = [re.compile(r) for r in freeze]
  only_rx = [re.compile(r) for r in train_only]
  used = set()

  def one(path, _):
    name = path_str(path)
    for rx in freeze_rx:
      if rx.fullmatch(name):
        used.add(rx.pattern)
        return False
    if only_rx:
      for rx in only_rx:
        if rx.fullmatch(name):
          used.add(rx.pattern)
          return True
      return False
    return True

  mask = jax.tree_util.tree_map_with_path(one, params)
  unused = [r for r in list(freeze) + list(train_only) if r not in used]
  if unused:
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ValueError(f"freeze/train_only regex(es) {unused} match no parameter; "
                     f"parameter names look like {names[:6]}")
  return mask


def stacked_params_and_mask(params: Any, mask: Any, stacks: Sequence) -> tuple[Any, Any]:
  """Per-layer params (arrays or ShapeDtypeStructs) and trainable mask -> the `scan_layers`
  layout of `stacks` (`cirjax.models.layer_stack`): each run of layers one stacked parameter,
  trained only if it is in every layer (a mixed run is a ValueError naming it)."""
  return (layer_stack.stack(params, stacks),
          layer_stack.stack(mask, stacks, combine=layer_stack.same_flag))


def count_params(params: Any, mask: Any | None = None) -> tuple[int, int]:
  """(total, trainable) parameter counts."""
  leaves = jax.tree.leaves(params)
  total = sum(int(math.prod(x.shape)) for x in leaves)
  if mask is None:
    return total, total
  trainable = sum(int(math.prod(x.shape)) for x, m in zip(leaves, jax.tree.leaves(mask)) if m)
  return total, trainable


def make_schedule(cfg, steps_per_epoch: int, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Learning rate as a function of the optimizer step.

  * `cosine_per_epoch` (QuRe reference): constant within an epoch, epoch e of E uses
    `(lr - lr/100) * 0.5 * (1 + cos(pi e / E)) + lr/100`.
  * `warmup_cosine` (InstructCIR / HF Trainer): linear warm-up over `warmup_ratio` of the
    steps from 0, then cosine over the rest of the run to `lr * final_lr_ratio` (default 0;
    the QuRe study anneals to lr/100 over the whole run, not per epoch).
  * `constant`.
  """
  lr = float(cfg.lr)
  kind = cfg.get("schedule", "constant")
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "cosine_per_epoch":
    epochs = int(cfg.epochs)
    floor = lr * float(cfg.get("final_lr_ratio", 0.01))

    def sched(step):
      e = jnp.floor_divide(step, steps_per_epoch).astype(jnp.float32)
      return (lr - floor) * 0.5 * (1 + jnp.cos(jnp.pi * e / epochs)) + floor
    return sched
  if kind == "warmup_cosine":
    warm = int(math.ceil(float(cfg.get("warmup_ratio", 0.03)) * total_steps))
    floor = lr * float(cfg.get("final_lr_ratio", 0.0) or 0.0)

    def sched(step):
      step = step.astype(jnp.float32) if hasattr(step, "astype") else float(step)
      w = jnp.minimum(1.0, step / max(warm, 1))
      prog = jnp.clip((step - warm) / max(total_steps - warm, 1), 0.0, 1.0)
      return jnp.where(step < warm, lr * w,
                       floor + (lr - floor) * 0.5 * (1 + jnp.cos(jnp.pi * prog)))
    return sched
  check_schedule(cfg)
  raise AssertionError(kind)  # check_schedule refused it


SCHEDULES = ("constant", "cosine_per_epoch", "warmup_cosine")


def check_schedule(cfg) -> None:
  """Refuses an unknown `config.train.schedule` (a ConfigError naming it)."""
  kind = cfg.get("schedule", "constant")
  if kind not in SCHEDULES:
    raise ConfigError(f"config.train.schedule: unknown schedule {kind!r} (use "
                      f"{', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]})")


def make_optimizer(cfg, mask: Any, steps_per_epoch: int, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW over the trainable parameters; frozen ones get no optimizer state at all."""
  schedule = make_schedule(cfg, steps_per_epoch, total_steps)
  chain = []
  if cfg.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
  chain.append(optax.adamw(schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                           eps=float(cfg.get("eps", 1e-8)),
                           weight_decay=float(cfg.get("weight_decay", 0.0))))
  adamw = optax.chain(*chain)
  labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
  tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

"""The main training loop, shared by every method (a `Task` supplies model, data and eval).

A Task (see `cirjax/train/task.py`) knows the model's parameters, the loss, how to build this
process's rows of batch `i` of epoch `e`, what to do at an epoch start (QuRe: re-mine), how
to evaluate and what host-side state must go into a checkpoint. The trainer owns the rest:
mesh and shardings, the optimizer, the compiled step, checkpoints and resume, logging.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from cirjax.train import sharding as shd
from cirjax.train import state as st
from cirjax.train.checkpointing import Checkpointer
from cirjax.train.logging import MetricLogger, NonFiniteLossError, Progress, check_finite
from cirjax.train.step import DEFAULT_FP32_PARAMS, compile_step, make_train_step
from cirjax.train.task import build_task


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[cirjax] {msg}", file=sys.stderr, flush=True)


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def format_table(metrics: dict[str, Any], title: str = "final metrics",
                 chance: dict[str, float] | None = None) -> str:
  """A text table of scalar metrics, with a chance column where `chance` has the metric."""
  rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating, np.integer))]
  if not rows:
    return f"{title}: (none)"
  chance = chance or {}
  w = max(len(k) for k, _ in rows)
  with_chance = any(k in chance for k, _ in rows)
  width = w + 14 + (12 if with_chance else 0)
  lines = [title, "-" * width]
  if with_chance:
    lines.append(f"{'metric':<{w}}  {'value':>10}  {'chance':>10}")
  for k, v in rows:
    line = f"{k:<{w}}  {float(v):>10.4f}"
    if k in chance:
      line += f"  {float(chance[k]):>10.4f}"
    lines.append(line)
  lines.append("-" * width)
  return "\n".join(lines)


class TrainResult(dict):
  """What `train` returns: final metrics, step timings, exit status."""


def train(config: ml_collections.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh | None = None
          ) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Returns a TrainResult with `status` ("done", "nonfinite" or "stopped"), the last
  evaluation metrics, the losses and the measured step throughput.
  """
  workdir = os.path.abspath(workdir)
  _write_config(config, workdir)
  mesh = mesh or shd.make_mesh(tuple(tuple(a) for a in config.get("mesh", (("data", -1), ("fsdp", 1)))))
  _log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
       f"{jax.process_count()} process(es)")
  task = build_task(config, mesh, workdir)
  tcfg = config.train
  steps_per_epoch = task.steps_per_epoch
  epochs = int(tcfg.epochs)
  total_steps = steps_per_epoch * epochs
  if int(tcfg.get("max_steps", -1) or -1) > 0:
    total_steps = min(total_steps, int(tcfg.max_steps))
  global_batch = task.global_batch
  if global_batch % jax.device_count():
    raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the "
                     f"{jax.device_count()} devices")

  seed = int(config.get("seed", 0))
  init_rng = jax.random.PRNGKey(seed)
  abstract_params = jax.eval_shape(task.init_params, init_rng)
  mask = st.trainable_mask(abstract_params, tuple(config.get("freeze", ())),
                           tuple(config.get("train_only", ())))
  total, trainable = st.count_params(abstract_params, mask)
  _log(f"{task.name}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trained; "
       f"{steps_per_epoch} steps/epoch x {epochs} epochs, global batch {global_batch}")
  tx, schedule = st.make_optimizer(tcfg, mask, steps_per_epoch, steps_per_epoch * epochs)

  abstract_state = jax.eval_shape(lambda p: st.init_state(p, tx), abstract_params)
  rules = tuple(tuple(r) for r in config.get("sharding_rules", ((".*", "fsdp"),)))
  specs = shd.param_specs(abstract_state, mesh, rules, int(config.get("fsdp_min_size", 2 ** 14)))
  state_sh = shd.to_shardings(specs, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sh)

  ckpt_cfg = config.get("checkpoint", ml_collections.ConfigDict())
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(ckpt_cfg.get("keep", 2)),
                      best_metric=ckpt_cfg.get("best_metric") or None,
                      best_mode=ckpt_cfg.get("best_mode", "max"),
                      async_save=bool(ckpt_cfg.get("async_save", True)))
  logger = MetricLogger(workdir, tensorboard=bool(config.get("tensorboard", True)))

  start = ckpt.latest_step()
  if start is not None:
    _log(f"resuming from {ckpt.directory}/{start}")
    state, host, arrays = ckpt.restore(start, abstract_state)
    task.load_host_state(host.get("task", {}), arrays)
    step = int(host["step"])
    logger.truncate_after(step)
  else:
    params0 = task.initial_params(abstract_params)
    if params0 is None:
      state = jax.jit(lambda: st.init_state(task.init_params(init_rng), tx),
                      out_shardings=state_sh)()
    else:
      state = jax.jit(lambda p: st.init_state(p, tx), out_shardings=state_sh)(params0)
    step = 0

  step_fn = make_train_step(
      task.loss_fn, tx, mask, schedule=schedule, seed=seed,
      accum_steps=int(tcfg.get("accum_steps", 1)),
      compute_dtype=config.get("compute_dtype", "float32"),
      fp32_params=config.get("fp32_params", None) or DEFAULT_FP32_PARAMS)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.batch_sharding(mesh, len(v.shape)))
                    for k, v in task.batch_spec().items()}
  batch_sh = {k: v.sharding for k, v in abstract_batch.items()}
  t0 = time.perf_counter()
  compiled, mem = compile_step(step_fn, abstract_state, state_sh, abstract_batch, batch_sh,
                               shd.replicated(mesh))
  _log(f"compiled in {time.perf_counter() - t0:.1f}s")

  every = int(ckpt_cfg.get("every_steps", 0) or 0)
  eval_every = int(config.get("eval_every_epochs", 1) or 0)
  eval_every_steps = int(config.get("eval_every_steps", 0) or 0)  # besides epoch ends
  log_every = int(config.get("log_every_steps", 1) or 1)
  progress = Progress(total_steps, step, global_batch, desc=task.name)
  result = TrainResult(status="done", final_metrics={}, losses=[], step_times=[], memory=mem)
  last_eval: dict = {}
  stop_after = int(os.environ.get("CIRJAX_STOP_AFTER_STEP", "0") or 0)  # tests: simulated crash
  host_epoch = -1

  def save(step_now: int, metrics=None, force=True):
    host_json, arrays = task.host_state()
    ckpt.save(step_now, state, {"step": step_now, "task": host_json}, arrays,
              metrics=metrics, force=force)

  try:
    while step < total_steps:
      epoch, i = divmod(step, steps_per_epoch)
      if epoch != host_epoch:
        progress.pause()
        stats = task.begin_epoch(epoch, state.params, first_step_in_epoch=i)
        host_epoch = epoch
        if stats:
          logger.write(step, {"epoch": epoch, **stats}, kind="mining")
          progress.write(f"epoch {epoch}: " + ", ".join(
              f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
      local = task.batch(epoch, i)
      batch = shd.global_batch(local, mesh)
      ts = time.perf_counter()
      state, metrics = compiled(state, batch)
      metrics = jax.device_get(metrics)
      result["step_times"].append(time.perf_counter() - ts)
      loss = float(metrics["loss"])
      check_finite(step, loss, epoch)
      step += 1
      result["losses"].append(loss)
      progress.update(loss, epoch)
      if step % log_every == 0 or step == total_steps:
        logger.write(step, {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}})
      end_of_epoch = (i + 1 == steps_per_epoch) or step == total_steps
      eval_metrics = None
      if (end_of_epoch and eval_every and ((epoch + 1) % eval_every == 0 or step == total_steps)
          ) or (eval_every_steps and step % eval_every_steps == 0):
        progress.pause()
        eval_metrics = task.evaluate(state.params)
        if eval_metrics:
          last_eval = {k: float(v) for k, v in eval_metrics.items()}
          logger.write(step, {"epoch": epoch, **last_eval}, kind="eval")
          progress.write(f"eval after epoch {epoch}: " + ", ".join(
              f"{k} {v:.4f}" for k, v in last_eval.items()))
      if end_of_epoch or (every and step % every == 0):
        save(step, eval_metrics)
      if stop_after and step >= stop_after:
        ckpt.wait()
        result["status"] = "stopped"
        break
  except NonFiniteLossError as e:
    progress.close()
    ckpt.wait()
    _log(str(e))
    logger.write(e.step, {"nonfinite_loss": str(e.value)}, kind="error")
    result["status"] = "nonfinite"
    result["error"] = str(e)
    result["last_checkpoint"] = ckpt.latest_step()
    logger.close()
    ckpt.close()
    return result
  progress.close()
  ckpt.wait()
  if result["status"] == "done":
    if not last_eval:
      ev = task.evaluate(state.params)
      last_eval = {k: float(v) for k, v in (ev or {}).items()}
    result["final_metrics"] = last_eval
    times = result["step_times"][1:] or result["step_times"]
    if times:
      med = statistics.median(times)
      result["step_time_s"] = med
      result["samples_per_s"] = global_batch / med
    task.finish(state.params)
    logger.plot()
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump({"final_metrics": last_eval, "step_time_s": result.get("step_time_s"),
                   "samples_per_s": result.get("samples_per_s"), "steps": step,
                   "chance": task.chance_metrics()}, f, indent=2)
  logger.close()
  ckpt.close()
  result["state"] = state
  result["step"] = step
  result["chance"] = task.chance_metrics() if result["status"] == "done" else {}
  return result

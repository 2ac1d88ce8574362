"""The main training loop, shared by every method (a `Task` supplies model, data and eval).

A Task (see `cirjax/train/task.py`) knows the model's parameters, the loss, how to build this
process's rows of batch `i` of epoch `e`, what to do at an epoch start (QuRe: re-mine), how
to evaluate and what host-side state must go into a checkpoint. The trainer owns the rest:
mesh and shardings, the optimizer, the compiled step, checkpoints and resume, logging.

`Trainer` has three phases: set-up (`__init__`), the loop and finalisation (`run`). After each
step the hooks run (`add_hook(fn, every=n)`; by default the progress bar, metric logging,
evaluation, checkpointing, the `CIRJAX_STOP_AFTER_STEP` test stop, the profiler and the
preemption check), and every exit goes through `shutdown`. Process 0 holds the workdir lock
from set-up to shutdown. Each epoch's batches come from a `cirjax.data.loader.Prefetcher` started
after `task.begin_epoch`; a task with `stateful_batches` gets one worker called in step order
and its host state is taken with each batch, so a checkpoint holds the state as of the step it
saves, not of the batches built ahead. docs/train.md has the details.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from cirjax.errors import ConfigError
from cirjax.data.loader import Prefetcher, default_workers
from cirjax import console
from cirjax.models import layer_stack
from cirjax.train import sharding as shd
from cirjax.train import state as st
from cirjax.train import preemption, wandb_sink, warm_start
from cirjax.train import workdir as workdir_lib
from cirjax.train import workdir_lock
from cirjax.train.checkpointing import Checkpointer
from cirjax.train.logging import MetricLogger, NonFiniteLossError, Progress, check_finite
from cirjax.train.profiling import StepProfiler, parse_steps
from cirjax.train.step import DEFAULT_FP32_PARAMS, compile_step, make_train_step
from cirjax.train.task import build_task

STOP_AFTER_ENV = "CIRJAX_STOP_AFTER_STEP"  # tests: stop (as if killed) after this many steps
# The train state's parameter layout, recorded in every checkpoint's host state.
LAYOUT_KEY, PER_LAYER, STACKED = "param_layout", "per_layer", "stacked"


_log = console.log


def format_table(metrics: dict[str, Any], title: str = "final metrics",
                 chance: dict[str, float] | None = None,
                 start: dict[str, float] | None = None) -> str:
  """A text table of scalar metrics, with a column for the model the run started from
  (`start`) and one for chance where those have the metric."""
  rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating, np.integer))]
  if not rows:
    return f"{title}: (none)"
  extra = [(name, col) for name, col in (("start", start or {}), ("chance", chance or {}))
           if any(k in col for k, _ in rows)]
  w = max(len(k) for k, _ in rows)
  width = w + 14 + 12 * len(extra)
  lines = [title, "-" * width]
  if extra:
    lines.append(f"{'metric':<{w}}  {'value':>10}" + "".join(f"  {n:>10}" for n, _ in extra))
  for k, v in rows:
    line = f"{k:<{w}}  {float(v):>10.4f}"
    for _, col in extra:
      line += f"  {float(col[k]):>10.4f}" if k in col else " " * 12
    lines.append(line.rstrip())
  lines.append("-" * width)
  return "\n".join(lines)


class TrainResult(dict):
  """What `train` returns: final metrics, step timings, exit status."""


@dataclasses.dataclass
class StepInfo:
  """What hooks see after a step. `step` counts the steps done; `eval_metrics` is set by
  the evaluation hook for the hooks after it (the checkpoint's best-metric)."""
  step: int
  epoch: int
  index: int            # position of the step just run in its epoch
  loss: float
  metrics: dict[str, Any]
  end_of_epoch: bool
  last: bool
  eval_metrics: dict[str, Any] | None = None


Hook = Callable[[StepInfo], None]


class DataWait:
  """This epoch's seconds waiting for a batch and stepping (the trainer's data-wait log)."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.wait_s = self.busy_s = 0.0

  @property
  def fraction(self) -> float:
    return self.wait_s / max(self.wait_s + self.busy_s, 1e-9)


class Trainer:
  """Set up in `__init__`, trained by `run()`; see the module docstring."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               mesh: jax.sharding.Mesh | None = None):
    self.config, self.tcfg = config, config.train
    self.workdir = os.path.abspath(workdir)
    config_changes = workdir_lib.check_resume(config, self.workdir)
    wandb_sink.check_installed(config)
    self.profiler = StepProfiler(parse_steps(config.get("profile_steps", "")), self.workdir)
    self.preemption = preemption.PreemptionWatch()
    self.lock = workdir_lock.lock_run(self.workdir, _log)
    workdir_lock.release_on_error(self.lock, self._set_up, config, mesh, config_changes)

  def _set_up(self, config, mesh, config_changes) -> None:
    self.mesh = mesh or shd.make_mesh(
        tuple(tuple(a) for a in config.get("mesh", (("data", -1), ("fsdp", 1)))))
    _log(f"mesh {dict(self.mesh.shape)} over {jax.device_count()} "
         f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")
    self.task = build_task(config, self.mesh, self.workdir)
    self._plan_steps()
    self._abstract_state()
    self.progress: Progress | None = None
    self.resumed_from: int | None = None
    self._open_outputs()
    try:
      self.state, self.step = self._restore_or_init()
      # Only now, with a checkpoint restored (or a fresh state made), is the config the run's.
      workdir_lib.write_config(config, self.workdir, config_changes)
      self._compile()
    except BaseException:
      self.shutdown()
      raise
    self.hooks: list[tuple[int, Hook]] = []
    self.result = TrainResult(status="done", final_metrics={}, losses=[], step_times=[],
                              memory=self.memory)
    self.last_eval: dict[str, float] = {}
    self.host_snapshot: tuple[dict, dict] | None = None
    self.wait = DataWait()
    self.progress = Progress(self.total_steps, self.step, self.global_batch, desc=self.task.name,
                             every_s=float(config.get("progress_every_s", 30.0)))
    self._add_default_hooks()

  # ------------------------------------------------------------------ set-up phases
  def _plan_steps(self) -> None:
    self.steps_per_epoch = self.task.steps_per_epoch
    self.epochs = int(self.tcfg.epochs)
    self.total_steps = self.steps_per_epoch * self.epochs
    if int(self.tcfg.get("max_steps", -1) or -1) > 0:
      self.total_steps = min(self.total_steps, int(self.tcfg.max_steps))
    self.global_batch = self.task.global_batch
    if self.global_batch % jax.device_count():
      raise ConfigError(f"config.train.batch_size={self.global_batch} is not divisible by the "
                        f"{jax.device_count()} devices")

  def _abstract_state(self) -> None:
    """Parameter shapes, trainable mask, optimizer and the state's shardings (no arrays), in
    the run's parameter layout: with `scan_layers`, the task's runs of layers stacked."""
    config = self.config
    self.seed = int(config.get("seed", 0))
    self.init_rng = jax.random.PRNGKey(self.seed)
    # The task's (per-layer) tree: what init_params / initial_params give and the regexes name.
    self.abstract_params = jax.eval_shape(self.task.init_params, self.init_rng)
    mask = st.trainable_mask(self.abstract_params, tuple(config.get("freeze", ())),
                             tuple(config.get("train_only", ())))
    total, trainable = st.count_params(self.abstract_params, mask)
    self.stacks = self.task.layer_stacks()
    self.layout = STACKED if bool(config.get("scan_layers", False)) and self.stacks else PER_LAYER
    _log(f"{self.task.name}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trained "
         f"({self.layout.replace('_', '-')} layout); {self.steps_per_epoch} steps/epoch x "
         f"{self.epochs} epochs, global batch {self.global_batch}")
    run_params, self.mask = self.abstract_params, mask
    if self.layout == STACKED:
      run_params, self.mask = st.stacked_params_and_mask(run_params, mask, self.stacks)
    self.tx, self.schedule = st.make_optimizer(self.tcfg, self.mask, self.steps_per_epoch,
                                               self.steps_per_epoch * self.epochs)
    abstract = jax.eval_shape(lambda p: st.init_state(p, self.tx), run_params)
    self.abstract, self.state_sharding = self._sharded(abstract)
    # A checkpoint of the other layout (scan_layers changed on resume) restores into this one,
    # then converts (`_restore_or_init`).
    other = PER_LAYER if self.layout == STACKED else STACKED
    self.abstract_by_layout = {self.layout: self.abstract, other: self._sharded(
        layer_stack.nested_to_layout(abstract, self.stacks, other == STACKED))[0]}

  def in_layout(self, tree: Any) -> Any:
    """A per-layer param tree (or one of either layout) in the run's layout."""
    return layer_stack.to_layout(tree, self.stacks, self.layout == STACKED)

  def _sharded(self, abstract: Any) -> tuple[Any, Any]:
    """(abstract state with shardings, the shardings) by the config's sharding rules."""
    config = self.config
    rules = tuple(tuple(r) for r in config.get("sharding_rules", ((".*", "fsdp"),)))
    specs = shd.param_specs(abstract, self.mesh, rules, int(config.get("fsdp_min_size", 2 ** 14)),
                            stacked=layer_stack.stacked_paths(self.stacks))
    sharding = shd.to_shardings(specs, self.mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, sharding), sharding

  def _abstract_for(self, host: dict) -> Any:
    """The abstract state a checkpoint with host-state JSON `host` was saved in."""
    layout = host.get(LAYOUT_KEY, PER_LAYER)  # checkpoints before the key: per-layer
    if layout not in self.abstract_by_layout:
      raise ValueError(f"{LAYOUT_KEY}={layout!r} is not a parameter layout "
                       f"({PER_LAYER!r} or {STACKED!r})")
    return self.abstract_by_layout[layout]

  def _open_outputs(self) -> None:
    self.ckpt_cfg = self.config.get("checkpoint", ml_collections.ConfigDict())
    c = self.ckpt_cfg
    self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                             keep=int(c.get("keep", 2)), best_metric=c.get("best_metric") or None,
                             best_mode=c.get("best_mode", "max"),
                             async_save=bool(c.get("async_save", True)))
    self.logger = MetricLogger(self.workdir, tensorboard=bool(self.config.get("tensorboard", True)))
    self.logger.sinks += wandb_sink.sinks(self.config, self.workdir, self.logger.active)

  def _restore_or_init(self) -> tuple[Any, int]:
    """The newest restorable checkpoint's state and step (its host state loaded into the task),
    or a fresh state at step 0."""
    # Falls back past damaged steps, moving them aside (checkpointing.py's docstring).
    restored = self.ckpt.restore_newest(self._abstract_for, self.task.load_host_state, _log)
    if restored is not None:
      state, step = restored
      _log(f"resuming from {self.ckpt.step_dir(step)}")
      self.resumed_from = step
      if jax.tree.structure(state) != jax.tree.structure(self.abstract):
        # Saved in the other layout (scan_layers changed): stack / unstack params and moments.
        _log(f"converting the checkpoint's parameters and optimizer state to the {self.layout} "
             "layout of this run's scan_layers")
        state = jax.jit(lambda s: layer_stack.nested_to_layout(s, self.stacks,
                                                               self.layout == STACKED),
                        out_shardings=self.state_sharding)(state)
      return state, step
    # Stacked once here (initial params: on the host), never inside the step.
    params0 = self.task.initial_params(self.abstract_params)
    if params0 is None:
      state = jax.jit(lambda: st.init_state(self.in_layout(self.task.init_params(self.init_rng)),
                                            self.tx), out_shardings=self.state_sharding)()
    else:
      state = jax.jit(lambda p: st.init_state(p, self.tx),
                      out_shardings=self.state_sharding)(self.in_layout(params0))
    return state, 0

  def _compile(self) -> None:
    config = self.config
    step_fn = make_train_step(
        self.task.loss_fn, self.tx, self.mask, schedule=self.schedule, seed=self.seed,
        accum_steps=int(self.tcfg.get("accum_steps", 1)),
        compute_dtype=config.get("compute_dtype", "float32"),
        fp32_params=config.get("fp32_params", None) or DEFAULT_FP32_PARAMS,
        cast_in_layers=self.stacks if self.layout == STACKED else ())
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.batch_sharding(self.mesh, len(v.shape)))
        for k, v in self.task.batch_spec().items()}
    batch_sh = {k: v.sharding for k, v in abstract_batch.items()}
    t0 = time.perf_counter()
    self.compiled, self.memory = compile_step(step_fn, self.abstract, self.state_sharding,
                                              abstract_batch, batch_sh, shd.replicated(self.mesh))
    _log(f"compiled in {time.perf_counter() - t0:.1f}s")

  # ------------------------------------------------------------------ hooks
  def add_hook(self, fn: Hook, *, every: int = 1) -> None:
    """Calls `fn(info)` after every `every`-th step (hooks run in the order added)."""
    self.hooks.append((max(1, int(every)), fn))

  def _add_default_hooks(self) -> None:
    self.add_hook(self._progress_hook)
    self.add_hook(self._log_hook)
    self.add_hook(self._eval_hook)
    self.add_hook(self._checkpoint_hook)
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    if stop_after:
      self.add_hook(lambda info: self._stop_after_hook(info, stop_after))
    self.add_hook(lambda info: self.profiler.on_step(info.step, self.state))
    self.add_hook(preemption.hook(self))  # last: it sees whether this step was saved

  def _progress_hook(self, info: StepInfo) -> None:
    self.progress.update(info.loss, info.epoch,
                         extra={"data wait": f"{100 * self.wait.fraction:.0f}%"})

  def _log_hook(self, info: StepInfo) -> None:
    if info.step % int(self.config.get("log_every_steps", 1) or 1) == 0 or info.last:
      self.logger.write(info.step, {"epoch": info.epoch,
                                    **{k: float(v) for k, v in info.metrics.items()}})

  def _eval_hook(self, info: StepInfo) -> None:
    every_epochs = int(self.config.get("eval_every_epochs", 1) or 0)
    every_steps = int(self.config.get("eval_every_steps", 0) or 0)  # besides epoch ends
    at_epoch = info.end_of_epoch and every_epochs and (
        (info.epoch + 1) % every_epochs == 0 or info.last)
    if not (at_epoch or (every_steps and info.step % every_steps == 0)):
      return
    self.progress.pause()
    info.eval_metrics = self.task.evaluate(self.state.params)
    if info.eval_metrics:
      self.last_eval = {k: float(v) for k, v in info.eval_metrics.items()}
      self.logger.write(info.step, {"epoch": info.epoch, **self.last_eval}, kind="eval")
      self.progress.write(f"eval after epoch {info.epoch}: " + ", ".join(
          f"{k} {v:.4f}" for k, v in self.last_eval.items()))

  def _checkpoint_hook(self, info: StepInfo) -> None:
    every = int(self.ckpt_cfg.get("every_steps", 0) or 0)
    if info.end_of_epoch or (every and info.step % every == 0):
      self.save(info.step, info.eval_metrics)

  def _stop_after_hook(self, info: StepInfo, stop_after: int) -> None:
    if info.step >= stop_after:
      self.ckpt.wait()
      self.result["status"] = "stopped"

  def save(self, step: int, metrics: dict | None = None) -> None:
    """Checkpoints the state and the task's host state as of `step` (asynchronously)."""
    host_json, arrays = self.host_snapshot or self.task.host_state()
    self.ckpt.save(step, self.state, {"step": step, "task": host_json, LAYOUT_KEY: self.layout},
                   arrays, metrics=metrics, force=True)

  # ------------------------------------------------------------------ the loop
  def _workers(self) -> int:
    workers = self.config.get("data", {}).get("workers", None)
    workers = default_workers() if workers is None or workers < 0 else int(workers)
    return min(workers, 1) if self.task.stateful_batches else workers

  def _begin_epoch(self, epoch: int, index: int) -> None:
    self.progress.pause()
    stats = self.task.begin_epoch(epoch, self.state.params, first_step_in_epoch=index)
    if stats:
      self.logger.write(self.step, {"epoch": epoch, **stats}, kind="mining")
      self.progress.write(f"epoch {epoch}: " + ", ".join(
          f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))

  def _make_batch(self, epoch: int, index: int):
    batch = self.task.batch(epoch, index)
    return batch, (self.task.host_state() if self.task.stateful_batches else None)

  def _loop(self) -> None:
    """Epochs from the current step until `total_steps` or a hook stops the run."""
    self.profiler.before_step(self.step + 1)
    while self.step < self.total_steps and self.result["status"] == "done":
      epoch, first = divmod(self.step, self.steps_per_epoch)
      self._begin_epoch(epoch, first)
      end = min(self.steps_per_epoch, first + self.total_steps - self.step)
      self.wait.reset()
      with Prefetcher(lambda i, e=epoch: self._make_batch(e, i), range(first, end),
                      workers=self._workers(), name=f"{self.task.name}-batches") as batches:
        for index in range(first, end):
          t0 = time.perf_counter()
          local, self.host_snapshot = next(batches)
          batch = shd.global_batch(local, self.mesh)
          self.wait.wait_s += time.perf_counter() - t0
          self._run_step(epoch, index, batch)
          if self.result["status"] != "done":
            break

  def _run_step(self, epoch: int, index: int, batch: dict) -> None:
    ts = time.perf_counter()
    self.state, metrics = self.compiled(self.state, batch)
    metrics = jax.device_get(metrics)
    dt = time.perf_counter() - ts
    self.wait.busy_s += dt
    self.result["step_times"].append(dt)
    loss = float(metrics["loss"])
    check_finite(self.step, loss, epoch)
    self.step += 1
    self.result["losses"].append(loss)
    last = self.step == self.total_steps
    info = StepInfo(step=self.step, epoch=epoch, index=index, loss=loss, metrics=metrics,
                    end_of_epoch=index + 1 == self.steps_per_epoch or last, last=last)
    if info.end_of_epoch:  # before the hooks: the epoch's evaluation stays its last record
      self._report_data_wait(epoch)
    for every, hook in self.hooks:
      if self.step % every == 0:
        hook(info)

  def _report_data_wait(self, epoch: int) -> None:
    frac = self.wait.fraction
    self.logger.write(self.step, {"epoch": epoch, "data_wait_fraction": frac,
                                  "data_wait_s": self.wait.wait_s}, kind="data")
    self.progress.write(f"epoch {epoch}: {100 * frac:.1f}% of step time waiting for data "
                        f"({self.wait.wait_s:.1f}s, {self._workers()} worker(s))")

  # ------------------------------------------------------------------ run, finalise, shut down
  def run(self) -> TrainResult:
    """Trains to the end (or until stopped) and returns the TrainResult; see `train`."""
    try:
      if self.resumed_from is not None:
        # Only now: a run that fails before training changes nothing in the workdir but the
        # damaged checkpoints it moved aside.
        self.logger.truncate_after(self.resumed_from)
      nonfinite = None
      self.result["start_metrics"] = _start_metrics(self)
      self.preemption.install()
      try:
        self._loop()
      except NonFiniteLossError as e:
        nonfinite = e
      self._drain()
      if nonfinite is not None:
        self._record_nonfinite(nonfinite)
        return self.result
      if self.result["status"] == "done":
        self._finalise()
      self.result["state"] = self.state
      self.result["step"] = self.step
      self.result["chance"] = self.task.chance_metrics() if self.result["status"] == "done" else {}
      return self.result
    finally:
      self.shutdown()

  def _record_nonfinite(self, e: NonFiniteLossError) -> None:
    _log(str(e))
    self.logger.write(e.step, {"nonfinite_loss": str(e.value)}, kind="error")
    self.result["status"] = "nonfinite"
    self.result["error"] = str(e)
    self.result["last_checkpoint"] = self.ckpt.latest_step()

  def _finalise(self) -> None:
    """Final metrics (evaluating if the loop did not), step timing, export, plots, JSON."""
    if not self.last_eval:
      ev = self.task.evaluate(self.state.params)
      self.last_eval = {k: float(v) for k, v in (ev or {}).items()}
    self.result["final_metrics"] = self.last_eval
    times = self.result["step_times"][1:] or self.result["step_times"]
    if times:
      med = statistics.median(times)
      self.result["step_time_s"] = med
      self.result["samples_per_s"] = self.global_batch / med
    self.task.finish(self.state.params)
    self.logger.plot()
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "final_metrics.json"), "w") as f:
        kept = {k: self.result.get(k) for k in ("step_time_s", "samples_per_s", "start_metrics")}
        json.dump({"final_metrics": self.last_eval, **kept, "steps": self.step,
                   "chance": self.task.chance_metrics()}, f, indent=2)

  def _drain(self) -> None:
    """Closes the progress bar (what follows prints below it) and completes the last save."""
    if self.progress is not None:
      self.progress.close()
    self.ckpt.wait()

  def shutdown(self) -> None:
    """The one exit path (also on exceptions): progress bar, pending checkpoint, logger,
    checkpointer, the task's input workers."""
    self.profiler.stop()
    self.preemption.uninstall()
    self._drain()
    self.logger.close()
    self.ckpt.close()
    self.lock.release()
    if hasattr(self, "task"):
      self.task.close()


def _start_metrics(trainer: Trainer) -> dict[str, float]:
  """With `eval_at_start`, the metrics of the model the run starts from (evaluated on a fresh
  run, read back on a resumed one; cirjax.train.warm_start); {} without."""
  if not trainer.config.get("eval_at_start", False):
    return {}
  return warm_start.start_metrics(
      trainer.workdir, trainer.resumed_from is None and trainer.step == 0,
      lambda: trainer.task.evaluate(trainer.state.params), jax.process_index() == 0)


def train(config: ml_collections.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh | None = None
          ) -> TrainResult:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Returns a TrainResult with `status` ("done", "nonfinite", "stopped" or "preempted": saved on
  a preemption signal, see `cirjax.train.preemption`), the last
  evaluation metrics, the losses and the measured step throughput.
  """
  return Trainer(config, workdir, mesh=mesh).run()

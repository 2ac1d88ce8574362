"""Preemption: a signal makes the run save at the next step boundary every process agrees on,
then stop with `PREEMPTED_EXIT`.

The signals are SIGTERM (what `scancel`, Kubernetes and most schedulers send before killing)
and SIGUSR1 (SLURM's advance warning, `#SBATCH --signal=B:USR1@120`, forwarded to the tasks by
launch/slurm.sbatch). Where the decision is made:
  * one process: a Python handler for both signals sets a flag; the next step boundary sees it;
  * several processes: JAX's distributed runtime already owns SIGTERM (its preemption
    notifier, installed by `jax.distributed.initialize`), so cirjax leaves SIGTERM to it and
    turns SIGUSR1 into a SIGTERM to itself. After every step each process asks
    `multihost_utils.reached_preemption_sync_point(step)`; once any process has been
    signalled, the coordination service picks a step that every process then answers True
    at, so all save the same step and stop together (a per-process flag would not: each
    process would stop at a different step and the others would hang in the next collective).
    Without JAX's preemption service (`jax_enable_preemption_service=False`), the flags are
    combined with one all-gather per step instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

from cirjax.train import distributed

# Exit status of a run that saved a checkpoint on a preemption signal and stopped: resume it by
# running the same command again. 75 is EX_TEMPFAIL of sysexits.h ("try again later"), unlike
# 143 (128 + SIGTERM), which a shell reports for a process the signal killed before it saved.
PREEMPTED_EXIT = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _jax_preemption_service() -> bool:
  """Whether JAX's preemption sync manager runs in this process (multi-process runs)."""
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover  (a JAX without it: fall back to the all-gather)
    return False
  return getattr(jax_distributed.global_state, "preemption_sync_manager", None) is not None


class PreemptionWatch:
  """Installs the handlers (`install`), answers `requested(step)` after each step on every
  process, restores the previous handlers (`uninstall`)."""

  def __init__(self):
    self.signal_name: str | None = None
    self._flag = False
    self._announced = False
    self._previous: dict[int, object] = {}
    self._jax_sync = False

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # Python takes handlers only on the main thread; a library caller's choice
    self._jax_sync = jax.process_count() > 1 and _jax_preemption_service()
    for sig in SIGNALS:
      if sig == signal.SIGTERM and self._jax_sync:
        continue  # JAX's preemption notifier has it
      self._previous[sig] = signal.signal(sig, self._handle)

  def uninstall(self) -> None:
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)
    self._previous = {}

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    # Nothing printed here: the main thread may be inside a write to stderr (re-entrant I/O
    # raises); `requested` reports it.
    self.signal_name = signal.Signals(signum).name
    self._flag = True
    if self._jax_sync:
      # Hand it to JAX's notifier, which tells the coordination service.
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step` (a collective in multi-process runs: every process
    calls it after every step, with the same steps)."""
    if self._flag and not self._announced:
      self._announced = True
      print(f"[cirjax] process {jax.process_index()}: {self.signal_name} received: saving a "
            "checkpoint at the step all processes agree on, then stopping", file=sys.stderr,
            flush=True)
    if self._jax_sync:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return distributed.all_processes(self._flag)


def hook(trainer):
  """The trainer hook (added last, after the checkpoint hook): after a preemption signal, save
  this step unless the checkpoint hook just did, wait for the write, stop the run with status
  `preempted`. Every process calls `requested` after every step."""
  def after_step(info) -> None:
    if not trainer.preemption.requested(info.step) or info.last:
      return  # at the last step the run is about to end by itself
    if trainer.ckpt.saved_step != info.step:
      trainer.save(info.step, info.eval_metrics)
    trainer.ckpt.wait()
    trainer.result["status"] = "preempted"
    if jax.process_index() == 0:
      print(f"[cirjax] preempted ({trainer.preemption.signal_name or 'a signal to some process'}"
            f"): saved step {info.step} to {trainer.ckpt.step_dir(info.step)}; run the same "
            "command to resume", file=sys.stderr, flush=True)
  return after_step

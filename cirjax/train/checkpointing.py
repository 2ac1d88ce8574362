"""Orbax checkpoints in the workdir: keep the last N and the best by a metric; auto-resume.

A checkpoint holds three items:
  * `state`: the sharded TrainState, restored straight into its target shardings;
  * `host`: JSON (epoch, position in the epoch, the sampler's and the miner's scalars, ...);
  * `arrays`: host numpy arrays (hard-negative sets, sampler histories, cached data order).
Orbax writes each step into a temporary directory and renames it when complete, so a
process killed while saving leaves the previous step as the latest loadable one; stale
temporary directories are ignored on resume and cleaned up.

Resuming (`restore_newest`) falls back past damaged checkpoints: a step whose files are
missing, truncated or garbled (TensorStore checks sizes and CRCs), or whose host-state JSON
does not parse or lacks a key, is reported naming the step and the file at fault; once an
older step restores, each damaged newer one is renamed `<step>.corrupt` (Orbax lists only
directories named by a bare step number, so it no longer sees it) and the run resumes from
the older step. When no step restores, nothing is moved and `CheckpointError` lists them all.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from cirjax.errors import ConfigError
from cirjax.errors import CirjaxError
from cirjax.train import distributed


class _QuietUntrackedSaves(logging.Filter):
  # Orbax warns on every save without metrics when a best metric is tracked; cirjax saves
  # mid-epoch checkpoints without evaluation by design.
  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietUntrackedSaves())


class CheckpointError(CirjaxError, ValueError):
  """A checkpoint that cannot be restored; the message names the step and the file at fault."""


TRAINER_HOST_KEYS = ("step", "task")  # what the trainer's host-state JSON must hold
# Item files that must exist (and parse, for the JSON ones) before Orbax is asked to read them:
# its own errors for these name no file.
_REQUIRED_FILES = {"state": ("_METADATA", "manifest.ocdbt"),
                   "arrays": ("_METADATA", "manifest.ocdbt"), "host": ("metadata",)}
_JSON_FILES = ("_METADATA", "metadata")


class StepDamage(Exception):
  """Why one step cannot be restored: the file at fault and what is wrong with it."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path, self.reason = path, reason


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the three items above."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True, read_only: bool = False):
    """`read_only`: a reader of another run's checkpoints (`cirjax.train.workdir.Run`),
    which must not clean up the temporary directory of a save that run has in flight."""
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies = [ocm.LatestN(n=max(1, int(keep)))]
    if best_metric:
      if best_mode not in ("max", "min"):
        raise ConfigError(f"config.checkpoint.best_mode must be max or min, got {best_mode!r}")
      policies.append(ocm.BestN(get_metric_fn=lambda m: float(m[best_metric]),
                                reverse=(best_mode == "min"), n=1,
                                keep_checkpoints_without_metrics=False))
    best_fn = (lambda m: float(m[best_metric])) if best_metric else None
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "host", "arrays"))
    self.saved_step: int | None = None  # the last step `save` started (a save-now hook checks)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None without metrics)."""
    return self.manager.best_step() if self.best_metric else None

  def save(self, step: int, state: Any, host: dict, arrays: dict[str, np.ndarray] | None = None,
           metrics: dict | None = None, force: bool = True) -> bool:
    """Starts saving `step` (asynchronously by default; `wait()` to block)."""
    arrays = dict(arrays or {})
    arrays.setdefault("_present", np.zeros((), np.int32))  # orbax refuses empty trees
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    # Orbax cannot save zero-size arrays (e.g. no mined sets yet): keep their shape and
    # dtype in the JSON item and rebuild them on restore.
    empty = {k: [list(v.shape), v.dtype.str] for k, v in arrays.items() if v.size == 0}
    arrays = {k: v for k, v in arrays.items() if k not in empty}
    host = dict(host, _empty_arrays=empty)
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    self.saved_step = step
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                host=ocp.args.JsonSave(host),
                                arrays=ocp.args.StandardSave(arrays)),
        metrics={k: float(v) for k, v in metrics.items()} if metrics else None,
        force=force)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore(self, step: int, abstract_state: Any, host_keys: tuple[str, ...] = ("step",)
              ) -> tuple[Any, dict, dict]:
    """Restores `step` into the shardings of `abstract_state` (ShapeDtypeStructs, or a function
    of the step's host-state JSON returning them: a run reading checkpoints saved in another
    parameter layout); raises `StepDamage` naming the file when one is missing, truncated or
    garbled, or when the host state lacks one of `host_keys` or names no known layout."""
    self._check_files(step)
    host = self._read_host(step, host_keys)
    if callable(abstract_state):
      try:
        abstract_state = abstract_state(host)
      except (KeyError, ValueError) as e:
        raise StepDamage(_host_path(self.step_dir(step)), str(e)) from e
    restored = _read_or_damage(lambda: self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      arrays=ocp.args.StandardRestore())), self.step_dir(step))
    arrays = {k: np.asarray(v) for k, v in dict(restored["arrays"]).items() if k != "_present"}
    try:
      for k, (shape, dtype) in host.pop("_empty_arrays", {}).items():
        arrays[k] = np.zeros(shape, np.dtype(dtype))
    except (TypeError, ValueError, AttributeError) as e:
      raise StepDamage(_host_path(self.step_dir(step)), f"bad _empty_arrays entry ({e})") from e
    return restored["state"], host, arrays

  def _check_files(self, step: int) -> None:
    d = self.step_dir(step)
    for item, names in _REQUIRED_FILES.items():
      if not os.path.isdir(os.path.join(d, item)):
        raise StepDamage(os.path.join(d, item), "missing")
      for name in names:
        path = os.path.join(d, item, name)
        if not os.path.isfile(path):
          raise StepDamage(path, "missing")
        if name in _JSON_FILES:
          _read_json(path)

  def _read_host(self, step: int, required: tuple[str, ...] = ("step",)) -> dict:
    path = _host_path(self.step_dir(step))
    host = _read_json(path)
    if not isinstance(host, dict):
      raise StepDamage(path, f"host state is a JSON {type(host).__name__}, not an object")
    missing = [k for k in required if k not in host]
    if missing:
      raise StepDamage(path, "host state lacks the key(s) " + ", ".join(map(repr, missing)))
    if host.get("step") != step:
      raise StepDamage(path, f"host state holds step {host.get('step')!r}, not {step}")
    if not isinstance(host.get("task", {}), dict):
      raise StepDamage(path, f"host state's 'task' is a JSON {type(host['task']).__name__}, "
                       "not an object")
    return host

  def restore_newest(self, abstract_state: Any, load_host: Callable[[dict, dict], None],
                     log: Callable[[str], None]) -> tuple[Any, int] | None:
    """Restores the newest step that restores (None when there is none) and passes its task
    host state to `load_host`; damaged newer steps are moved aside, see the module docstring.

    Raises `CheckpointError` listing each step when none restores (then nothing is moved).
    """
    damaged: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, host, arrays = self.restore(step, abstract_state, TRAINER_HOST_KEYS)
        try:
          load_host(host["task"], arrays)
        except Exception as e:  # pylint: disable=broad-except  # the task's own checks
          raise StepDamage(_host_path(self.step_dir(step)),
                           f"the task cannot load this host state ({type(e).__name__}: {e})")
        fault = None
      except StepDamage as e:
        fault = str(e)
      # Every process reads its own shards: a step restores only if it did everywhere.
      if not distributed.all_processes(fault is None):
        damaged.append((step, fault or "damaged on another process"))
        continue
      for bad, why in damaged:
        log(f"checkpoint step {bad} is damaged ({why}): moved aside to "
            f"{self.move_aside(bad)}")
      if damaged:
        self.manager.reload()
      return state, int(host["step"])
    if not damaged:
      return None
    lines = "\n".join(f"  step {s}: {why}" for s, why in damaged)
    raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored:\n{lines}\nNothing was changed. "
        "Repair or remove the damaged steps, or start a new --workdir.")

  def move_aside(self, step: int) -> str:
    """Renames step `step` to `<step>.corrupt` (`.corrupt.N` if taken; process 0 renames, all
    wait) and returns the new path."""
    dest = self.step_dir(step) + ".corrupt"
    n = 1
    while os.path.exists(dest if n == 1 else f"{dest}.{n}"):
      n += 1
    dest = dest if n == 1 else f"{dest}.{n}"
    if jax.process_index() == 0:
      os.rename(self.step_dir(step), dest)
    distributed.barrier(f"cirjax_move_aside_{step}")
    return dest

  def restore_params(self, step: int | None, abstract_params: Any = None) -> Any:
    """Only the parameters of a checkpoint (e.g. stage 2 starting from stage 1).

    Works whatever devices or processes wrote the checkpoint: the arrays are read onto this
    process's first device (or into `abstract_params`' shardings when given).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      state = _read_or_damage(lambda: read_local(os.path.join(self.step_dir(step), "state")),
                              self.step_dir(step))
    except StepDamage as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read: "
                            f"{e}") from None
    params = state["params"]
    if abstract_params is not None:
      want = jax.tree.structure(abstract_params)
      if jax.tree.structure(params) != want:
        raise ValueError(f"checkpoint {self.directory}/{step}: parameter tree differs from the "
                         "model's (different config?)")
      params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding)
                            if getattr(a, "sharding", None) is not None else x,
                            params, abstract_params)
    return params

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class _DropClosedLoopReports:
  """An unraisable-exception hook passing on everything but 'Event loop is closed'."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    if not _closed_loop(unraisable.exc_value):
      self.previous(unraisable)


class _DropClosedLoopExcepthook:
  """The same for reports that TensorStore's threads print through `sys.excepthook`."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, etype, value, tb) -> None:
    if not _closed_loop(value):
      self.previous(etype, value, tb)


def _closed_loop(exc) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _DropAbandonedReadLogs(logging.Filter):
  """asyncio's reports about the reads a failed restore abandoned: their exceptions were never
  retrieved (the damage they hit is already reported, naming the file) or their loop is closed."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    msg = str(record.msg)
    return not ("exception was never retrieved" in msg or
                (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"))


def _read_or_damage(read: Callable[[], Any], step_dir: str) -> Any:
  """`read()`, with whatever Orbax/TensorStore raise turned into `StepDamage` naming the file."""
  _install_quiet_hooks()  # before the read: its abandoned callbacks may report at any moment
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-except  # their error types are not documented
    damage = _damage_from(e, step_dir)
  _quiet_abandoned_reads()  # outside the except clause: the failed read's frames are garbage now
  raise damage


def _quiet_abandoned_reads() -> None:
  """After a failed restore, the reads Orbax abandoned still hold callbacks into its closed
  event loop and print 'Event loop is closed' tracebacks when collected, and asyncio logs their
  never-retrieved exceptions (how soon depends on timing): those reports (only those) are
  dropped from now on, and the garbage is collected at once."""
  _install_quiet_hooks()
  gc.collect()


def _install_quiet_hooks() -> None:
  if not isinstance(sys.unraisablehook, _DropClosedLoopReports):
    sys.unraisablehook = _DropClosedLoopReports(sys.unraisablehook)
  if not isinstance(sys.excepthook, _DropClosedLoopExcepthook):
    sys.excepthook = _DropClosedLoopExcepthook(sys.excepthook)
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropAbandonedReadLogs) for f in asyncio_log.filters):
    asyncio_log.addFilter(_DropAbandonedReadLogs())


def _host_path(step_dir: str) -> str:
  return os.path.join(step_dir, "host", "metadata")


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise StepDamage(path, f"not readable JSON ({e})") from e


_TS_FILE = re.compile(r'local file "([^"]+)"')
_TS_CODES = {"NOT_FOUND": "missing", "OUT_OF_RANGE": "truncated", "DATA_LOSS": "corrupted"}


def _damage_from(e: Exception, step_dir: str) -> StepDamage:
  """The file and reason in an Orbax/TensorStore error (the step directory when it names none)."""
  msg = str(e).split(" [tensorstore_spec", 1)[0].strip()
  files = _TS_FILE.findall(msg)
  if files:  # TensorStore names the outer (directory) file first, the one it failed on last
    path = files[-1]
    tail = msg.rsplit(f'"{path}"', 1)[1].lstrip(": ").strip()
    word = _TS_CODES.get(msg.split(":", 1)[0], "unreadable")
    return StepDamage(path.rstrip("/"), f"{word} ({tail})" if tail else word)
  m = re.search(r"File (.+?) not found", msg)
  first = msg.splitlines()[0][:300] if msg else ""
  return StepDamage(m.group(1) if m else step_dir, "missing" if m else
                    f"cannot be restored ({type(e).__name__}: {first})")


def read_local(item_dir: str) -> Any:
  """Reads a saved array tree (e.g. `<ckpt>/<step>/state`) onto this process's first device.

  Independent of the mesh, device ids and process count that wrote it (orbax refuses to
  reuse the saved shardings on a different topology), so tools and tests can inspect any
  checkpoint.
  """
  ck = ocp.StandardCheckpointer()
  meta = ck.metadata(item_dir)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
  out = ck.restore(item_dir, target)
  ck.close()
  return out

"""What a training method supplies to the generic trainer, and the registry of methods."""

from __future__ import annotations

import importlib
from typing import Any

import jax
import ml_collections
import numpy as np

from cirjax.errors import CirjaxError
from cirjax.models.remat import DEFAULT_POLICY, REMAT_POLICIES
from cirjax.train.config_utils import ConfigError, load_module

# config.task -> "module:factory". A config may also name "path/to/file.py:factory".
TASKS = {
    "qure": "cirjax.train.qure:QuReTask",
    "instructcir": "cirjax.train.instructcir:InstructCIRTask",
}


def run_options(config: ml_collections.ConfigDict) -> dict:
  """The model-config fields a run sets from its top-level keys: remat and its policy, the
  attention kernel and the layer loop (they change how the model runs, never its math or its
  parameters, so each may change on resume). Raises ConfigError for an unknown remat_policy."""
  policy = config.get("remat_policy", DEFAULT_POLICY)
  if policy not in REMAT_POLICIES:
    raise ConfigError(f"config.remat_policy={policy!r}: use one of {sorted(REMAT_POLICIES)}")
  return dict(remat=bool(config.get("remat", False)), remat_policy=str(policy),
              attention_impl=str(config.get("attention_impl", "xla")),
              scan_layers=bool(config.get("scan_layers", False)))


class Task:
  """Base class: override what your method needs. All batch arrays have the global batch
  as leading dimension in `batch_spec`; `batch` returns only this process's rows."""

  name = "task"
  global_batch: int = 0
  steps_per_epoch: int = 0
  # True: `batch` advances host state that checkpoints hold (QuRe's walk sampler), so the
  # trainer builds batches one at a time in step order and checkpoints the host state taken
  # with each batch. False: `batch(epoch, i)` depends only on (epoch, i) and the state set at
  # `begin_epoch` and is thread-safe, so several worker threads build batches ahead.
  stateful_batches: bool = True

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str):
    self.config = config
    self.mesh = mesh
    self.workdir = workdir

  # --- model
  def init_params(self, rng: jax.Array) -> Any:
    raise NotImplementedError

  def initial_params(self, abstract_params: Any) -> Any | None:
    """Parameters to start from instead of `init_params` (pretrained, previous stage)."""
    return None

  def layer_stacks(self) -> list:
    """The runs of repeated layers (`cirjax.models.layer_stack.Stack`, paths from the root of
    the `init_params` tree) that a `scan_layers` run holds stacked in its train state.
    `init_params` / `initial_params` always give the per-layer layout; the trainer stacks
    them once, and every other method (loss, encoders, `evaluate`, `finish`) receives the
    state's layout: the model functions accept either, exports must unstack."""
    return []

  def loss_fn(self, params: Any, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """(fp32 scalar loss, dict of fp32 scalars). Honour `config.remat` by rematerialising the
    model's layers here: the trainer does not wrap the whole forward."""
    raise NotImplementedError

  # --- data
  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    raise NotImplementedError

  def begin_epoch(self, epoch: int, params: Any, first_step_in_epoch: int = 0) -> dict | None:
    """Called before the first step run in `epoch` (also when resuming mid-epoch)."""
    return None

  def batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
    """This process's rows of batch `index` of `epoch`; called from a worker thread, ahead
    of the step (see `stateful_batches`)."""
    raise NotImplementedError

  # --- checkpointed host state (sampler, mining sets)
  def host_state(self) -> tuple[dict, dict[str, np.ndarray]]:
    return {}, {}

  def load_host_state(self, host: dict, arrays: dict[str, np.ndarray]) -> None:
    pass

  # --- evaluation and the end of the run
  def evaluate(self, params: Any) -> dict[str, float] | None:
    return None

  def chance_metrics(self) -> dict[str, float]:
    return {}

  def finish(self, params: Any) -> None:
    """End of a completed run (e.g. export to HF format)."""

  def close(self) -> None:
    """Every exit of the trainer (stops input workers the task started)."""

  @classmethod
  def check_config(cls, config: Any) -> None:
    """Raises a `ConfigError` naming a config value the task cannot use, before anything is
    written (`cirjax train` calls it before a warm start or the trainer; `__init__` too)."""

  # --- the trained model, read back
  @classmethod
  def model_from_params(cls, run: Any, params: Any, source: str) -> Any:
    """The `cirjax.eval.model.Model` that `params` (a checkpoint's, host arrays in the train
    state's layout) make under the run's config (`run`: a `cirjax.train.workdir.Run`), as
    the task's export would have written it: how `cirjax.load` reads a workdir the run
    exported nothing to. `source`: where the params came from."""
    raise CirjaxError(f"{run.path / 'config.json'}: task {cls.name!r} does not rebuild its "
                      "model from a checkpoint; export the model from the run")


def task_class(name: Any, where: Any = "config.task") -> type:
  """The Task class of `name` (a registered name, `module:attr` or `file.py:attr`); errors
  name `where` the name was read."""
  if not name:
    raise ConfigError(f"{where} is not set (one of " + ", ".join(TASKS) + ")")
  target = TASKS.get(name, name)
  if ":" not in target:
    raise ConfigError(f"{where}={name!r}: unknown task; use one of {sorted(TASKS)} "
                      "or 'module:Class' / 'file.py:Class'")
  mod_name, attr = target.rsplit(":", 1)
  module = load_module(mod_name) if mod_name.endswith(".py") else importlib.import_module(mod_name)
  if not hasattr(module, attr):
    raise ConfigError(f"{where}={name!r}: {mod_name} has no {attr!r}")
  return getattr(module, attr)


def build_task(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: str) -> Task:
  """Instantiates `config.task` (see `task_class`)."""
  return task_class(config.get("task"))(config, mesh, workdir)

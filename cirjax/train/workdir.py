"""The workdir contract: a workdir holds one run; and the reader side, the one loader of a
trained model.

Writing: 
On resume (the workdir has a checkpoint) the requested config is compared with the stored
`config.json`. A difference in a key that changes the parameter tree, the data or the
optimizer is refused, listing each differing key with both values; keys that are safe to
change on resume (`RESUMABLE`: step limit, logging, evaluation frequency, checkpoint
retention, data workers, progress, profiling, wandb) are allowed and recorded in `config_history.jsonl`.
`config.json` is written atomically, and only once the run has restored its checkpoint or
initialised a fresh state, so a run that fails before that changes nothing in the workdir.

Reading (`open_run`, `Run`): a training workdir is a directory with the run's `config.json`
and `checkpoints/`. `Run.exported_model()` is its exported model (the first of `model`,
`export`, `best`, `final` that is a cirjax model directory), `Run.latest_params()` the
parameters of its newest step that restores, read through the checkpoint manager
(`cirjax.train.checkpointing.Checkpointer`; a damaged newer step is passed over, naming it).

`load_model(path)` (`cirjax.load`) is the one loader of a trained model: every
`--checkpoint` (`cirjax eval`, `mine`, `search`), the study's scoring and the Python API read a
model through it. `path` is, in this order:
* a Hugging Face hub id `ORG/NAME[@REVISION]` when no such local path exists
  (`cirjax.convert.hub.resolve`: its snapshot in the HF cache, then as below);
* a cirjax model directory (`cirjax_config.json`), an HF BLIP-2 / LLaVA directory or a LAVIS
  BLIP-2 state-dict file (`registry.load`; the tokenizer is the one beside it);
* a training workdir: its exported model; without one, its latest restorable parameters,
  made into a model by the run's task (`Task.model_from_params`, found through the task
  registry: the config and tokenizer the run trained with);
* a directory holding exported models (any subdirectory with `cirjax_config.json`, the
  newest first).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from cirjax.convert import hub, io, registry
from cirjax.errors import CirjaxError
from cirjax.eval import model as model_lib
from cirjax.train.config_utils import ConfigError

CONFIG_NAME = "config.json"
HISTORY_NAME = "config_history.jsonl"
# Dotted keys (or prefixes ending in '.') that may change between a run and its resume.
RESUMABLE = ("train.max_steps", "log_every_steps", "eval_every_epochs", "eval_every_steps",
             "eval_metrics", "tensorboard", "checkpoint.keep", "checkpoint.every_steps",
             "checkpoint.async_save", "checkpoint.best_metric", "checkpoint.best_mode",
             "data.workers", "data.encode_batch_size", "qure.encode_batch_size",
             "qure.mining_method", "remat", "remat_policy", "attention_impl", "scan_layers",
             "data.pixel_store", "data.pixel_store_dir", "progress_every_s", "profile_steps",
             "wandb",
             # Both input pipelines feed the same examples in the same order (docs/data.md#grain).
             "data.pipeline", "data.tfds_dir", "data.grain_workers",
             "model.require_init")  # a guard on an empty model.init; runs before it lack it


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _as_plain(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, Any, Any]]:
  """The allowed (key, stored, requested) changes of a resume; raises `ConfigError` naming
  every refused one. Nothing to compare (a new workdir, no checkpoint yet): no changes."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory")
  path = os.path.join(workdir, CONFIG_NAME)
  if not (has_checkpoint(workdir) and os.path.isfile(path)):
    return []
  try:
    with open(path) as f:
      stored = _flat(json.load(f))
  except ValueError as e:
    raise ConfigError(f"{path}: not valid JSON ({e}); the workdir's config is damaged: "
                      "restore it or start a new --workdir") from None
  requested = _flat(_as_plain(config))
  changed = [(k, stored.get(k, "<absent>"), requested.get(k, "<absent>"))
             for k in sorted(set(stored) | set(requested)) if stored.get(k) != requested.get(k)]
  refused = [c for c in changed if not _resumable(c[0])]
  if refused:
    lines = "\n".join(f"  {k}: stored {old!r}, requested {new!r}" for k, old, new in refused)
    raise ConfigError(
        f"{workdir} holds a run whose config differs in keys that change the model, the data "
        f"or the optimizer, so its checkpoints cannot resume this config:\n{lines}\n"
        "Start a new --workdir for the new config (or drop these overrides to resume).")
  return changed


def _resumable(key: str) -> bool:
  return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def write_config(config: ml_collections.ConfigDict, workdir: str,
                 changes: list[tuple[str, Any, Any]] = ()) -> None:
  """Writes `config.json` atomically (process 0) and appends allowed resume changes to
  `config_history.jsonl`."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_NAME)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)
  if changes:
    rec = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "changed": {k: {"stored": old, "requested": new} for k, old, new in changes}}
    with open(os.path.join(workdir, HISTORY_NAME), "a") as f:
      f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------- reading

EXPORT_NAMES = ("model", "export", "best", "final")
LOOKED_FOR = ("a cirjax model directory (cirjax_config.json), an HF directory (config.json of "
              f"a BLIP-2 or LLaVA model), a LAVIS BLIP-2 state-dict file "
              f"({'/'.join(registry.LAVIS_SUFFIXES)}), or a training "
              f"workdir (config.json + checkpoints/) holding an exported model "
              f"({', '.join(EXPORT_NAMES)}, or any subdirectory with cirjax_config.json) "
              "or a checkpoint, or a Hugging Face hub id ORG/NAME[@REVISION]")


def is_training_workdir(path: str | os.PathLike) -> bool:
  p = Path(path)
  return (p / CONFIG_NAME).is_file() and (p / "checkpoints").is_dir()


@dataclasses.dataclass(frozen=True)
class Run:
  """A training workdir, read (see the module docstring)."""
  path: Path

  @functools.cached_property
  def config(self) -> ml_collections.ConfigDict:
    """The run's config.json; a damaged one is an error naming it."""
    f = self.path / CONFIG_NAME
    try:
      config = json.loads(f.read_text())
    except ValueError as e:
      raise CirjaxError(f"{f}: not valid JSON ({e}); the workdir's config is damaged") from None
    if not isinstance(config, dict):
      raise CirjaxError(f"{f}: holds a JSON {type(config).__name__}, expected the run's "
                        "config (an object)")
    return ml_collections.ConfigDict(config)

  def exported_model(self) -> Optional[Path]:
    """The run's exported model directory, or None."""
    return next((self.path / n for n in EXPORT_NAMES if io.is_cirjax_dir(self.path / n)), None)

  def latest_params(self) -> Optional[tuple[Path, Any]]:
    """(step directory, host params) of the newest checkpoint step that restores, through
    the checkpoint manager; None without a step. Raises `CirjaxError` naming each step when
    there are steps and none restores."""
    # Orbax is heavy: only reading a checkpoint loads it.
    from cirjax.train.checkpointing import (  # pylint: disable=g-import-not-at-top
        CheckpointError, Checkpointer)
    if not (self.path / "checkpoints").is_dir():
      return None
    ck = Checkpointer(str(self.path / "checkpoints"), keep=1 << 30, async_save=False,
                      read_only=True)
    damaged = []
    try:
      for step in sorted(ck.all_steps(), reverse=True):
        try:
          params = ck.restore_params(step)
        except (CheckpointError, KeyError, TypeError) as e:
          damaged.append(f"  step {step}: {e}")
          continue
        return Path(ck.step_dir(step)), jax.tree.map(np.asarray, params)
    finally:
      ck.close()
    if damaged:
      raise CirjaxError(f"no checkpoint of {self.path} can be read:\n" + "\n".join(damaged))
    return None


def open_run(path: str | os.PathLike) -> Optional[Run]:
  """The training workdir at `path`, or None if it is none."""
  p = Path(path)
  return Run(p) if p.is_dir() and is_training_workdir(p) and not io.is_cirjax_dir(p) else None


def model_source(path: str | os.PathLike) -> Path | Run:
  """What `path` names: a model directory or file for `registry.load`, or a training run
  without an exported model (see the module docstring for the order)."""
  p = hub.resolve(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint path does not exist: {p}; expected {LOOKED_FOR}")
  if p.is_file():
    if p.suffix in registry.LAVIS_SUFFIXES:
      return p
    raise NotADirectoryError(f"checkpoint {p} is a file but not a LAVIS state dict; "
                             f"expected {LOOKED_FOR}")
  if io.is_cirjax_dir(p):
    return p
  # A training workdir's config.json is the run's config, not an HF model config: look for
  # its exported model before taking the directory for an HF one.
  exported = Run(p).exported_model()
  if exported is not None:
    return exported
  run = open_run(p)
  if run is not None:
    return run
  if (p / "config.json").is_file():
    return p
  subs = sorted((d for d in p.iterdir() if d.is_dir() and io.is_cirjax_dir(d)),
                key=lambda d: d.stat().st_mtime, reverse=True)
  if subs:
    return subs[0]
  raise FileNotFoundError(f"{p} is none of the checkpoints cirjax reads; looked for "
                          f"{LOOKED_FOR}; export the trained model first")


def load_model(path: str | os.PathLike, *, family: Optional[str] = None,
               **overrides) -> model_lib.Model:
  """The trained model at `path` (any `--checkpoint`, see the module docstring) as a
  `cirjax.eval.model.Model`. `family`, if given, is checked; `overrides` replace dtype
  fields of its config (`dtype`, `vision_dtype`, `param_dtype`)."""
  src = model_source(path)
  if not isinstance(src, Run):
    return model_lib.from_loaded(registry.load(src, family=family), **overrides)
  from cirjax.train import task  # pylint: disable=g-import-not-at-top  # the tasks are heavy
  name = src.config.get("task")  # a damaged config.json is named before any checkpoint
  found = src.latest_params()
  if found is None:
    raise FileNotFoundError(
        f"{src.path} is a training workdir without an exported model (looked for "
        f"{', '.join(EXPORT_NAMES)}) or a checkpoint; let the run finish, or export it")
  step_dir, params = found
  if not isinstance(params, dict):
    raise CirjaxError(f"{step_dir / 'state'}: holds no 'params' (not a cirjax training "
                      "checkpoint?)")
  model = task.task_class(name, where=f"{src.path / CONFIG_NAME}: task"
                          ).model_from_params(src, params, str(step_dir))
  if family is not None and model.family != family:
    raise io.WeightFileError(f"{src.path}: a '{model.family}' run, not '{family}' (use "
                             f"cirjax.load_{model.family})")
  if all(v is None for v in overrides.values()):
    return model
  return model_lib.make_model(model.family, model.config, model.params, model.tokenizer,
                              model.source, **overrides)

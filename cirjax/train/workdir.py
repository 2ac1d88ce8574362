"""The workdir contract: a workdir holds one run.

On resume (the workdir has a checkpoint) the requested config is compared with the stored
`config.json`. A difference in a key that changes the parameter tree, the data or the
optimizer is refused, listing each differing key with both values; keys that are safe to
change on resume (`RESUMABLE`: step limit, logging, evaluation frequency, checkpoint
retention, data workers, progress, profiling, wandb) are allowed and recorded in `config_history.jsonl`.
`config.json` is written atomically, and only once the run has restored its checkpoint or
initialised a fresh state, so a run that fails before that changes nothing in the workdir.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import jax
import ml_collections

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

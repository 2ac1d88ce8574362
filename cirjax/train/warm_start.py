"""A warm start made in the same command, and the metrics of the model a run starts from.

QuRe fine-tunes a *pretrained* BLIP-2: its pairwise loss against one hard negative assumes
a model that already ranks the target near the top. A config without pretrained weights (the
synthetic main job) says how to make that start in `config.warm_start`:

  c.warm_start = dict(overrides=("qure.loss=infonce", "qure.n_def=0", "train.epochs=2", ...))

`cirjax train` then first trains the same config with those overrides in WORKDIR/warm_start
(its own checkpoints, metrics and export; resumed like any run), and trains the config itself
from that run's exported model (`model.init`). Empty `overrides`: no warm start.

Either way a fresh run evaluates the model it starts from before its first step (the warm
start's export, a pretrained checkpoint, or a random initialisation) when `eval_at_start` is
set, keeps that in WORKDIR/start_metrics.json (a resumed run reads it back) and reports it
beside the final metrics.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Callable

import jax
import ml_collections

from cirjax import errors
from cirjax.train import config_utils, workdir_lock

WARM_DIR = "warm_start"
START_FILE = "start_metrics.json"


def warm_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The warm start's own config (this config with `warm_start.overrides`, exported, no
  warm start of its own), or None when the config has none."""
  ws = config.get("warm_start") or {}
  overrides = tuple(ws.get("overrides") or ())
  if not overrides:
    return None
  warm = copy.deepcopy(config)
  with warm.ignore_type():
    warm.warm_start = ml_collections.ConfigDict({"overrides": ()})
    warm.export = True
  return config_utils.apply_overrides(warm, overrides, source="config.warm_start.overrides")


def finished(workdir: str) -> bool:
  """A warm start that trained to its end and exported its model."""
  wdir = os.path.join(workdir, WARM_DIR)
  return (os.path.isfile(os.path.join(wdir, "final_metrics.json"))
          and os.path.isdir(os.path.join(wdir, "model")))


def run(config: ml_collections.ConfigDict, workdir: str,
        train_fn: Callable[[ml_collections.ConfigDict, str], dict],
        log: Callable[[str], None]) -> tuple[ml_collections.ConfigDict, dict | None]:
  """Trains the warm start if the config has one and it has not finished, and returns (the
  config to train, starting from the warm start's model; None) -- or (config, the warm
  start's result) when that run stopped early (preempted, non-finite loss), which the caller
  reports as its own."""
  warm = warm_config(config)
  if warm is None:
    return config, None
  wdir = os.path.join(workdir, WARM_DIR)
  if finished(workdir):
    log(f"warm start: done ({wdir}), training from its model")
  else:
    if jax.process_count() > 1:
      # Its export is written by process 0 alone, which the other processes could not wait
      # for before loading it.
      raise errors.UsageError(
          f"config.warm_start: the warm start ({wdir}) is made by a single process: run this "
          "command once with one process to make it (later runs with several processes find "
          "it finished and train from it), or give the start as --config.model.init=DIR with "
          "--config.warm_start.overrides=()")
    # A workdir another run holds is refused before the warm start writes into it.
    workdir_lock.lock_run(workdir, log).release()
    log(f"warm start: training {', '.join(config.warm_start.overrides)} in {wdir}")
    result = train_fn(warm, wdir)
    if result["status"] != "done":
      return config, result
  main = copy.deepcopy(config)
  with main.ignore_type():
    main.model.init = os.path.join(wdir, "model")
  return main, None


def start_metrics(workdir: str, fresh: bool, evaluate: Callable[[], dict[str, Any]],
                  write: bool) -> dict[str, float]:
  """The start model's metrics: evaluated now on a fresh run (and kept in WORKDIR/START_FILE
  by the writing process), read back on a resumed one ({} if it never had them)."""
  path = os.path.join(workdir, START_FILE)
  if not fresh:
    if not os.path.isfile(path):
      return {}
    with open(path) as f:
      return json.load(f)
  metrics = {k: float(v) for k, v in (evaluate() or {}).items()}
  if write:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(metrics, f, indent=2)
    os.replace(tmp, path)
  return metrics


__all__ = ["WARM_DIR", "START_FILE", "warm_config", "finished", "run", "start_metrics"]

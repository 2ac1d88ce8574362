"""The CIR splits a training config names (`config.data`), the synthetic benchmark made on
first use, and every image of a run by index."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cirjax.data import cirr, fashioniq, synth
from cirjax import console
from cirjax.data.records import CIRSplit, DataError
from cirjax.errors import MissingDependencyError, UsageError


_log = console.log


def _synth_key(field: str, split: int | None = None) -> str:
  return f"config.data.synth.{field}" + ("" if split is None else f"[{split}]")


def synth_config(synth_cfg: ml_collections.ConfigDict | None) -> synth.SynthConfig:
  """`config.data.synth` as a `SynthConfig`, checked: sizes the generator cannot meet are a
  `synth.SynthConfigError` naming the key (`config.data.synth.num_images[0]`, ...)."""
  kw = dict(synth_cfg or {})
  cfg = synth.SynthConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                             for k, v in kw.items()})
  synth.plan(cfg, _synth_key)
  return cfg


def ensure_synthetic(root: str, synth_cfg: ml_collections.ConfigDict | None) -> None:
  """Generates the synthetic benchmark at `root` unless it is already there (process 0)."""
  if synth.is_synthetic(root):
    return
  if os.path.exists(root) and os.listdir(root):
    raise DataError(f"config.data.root={root} exists but is not a cirjax synthetic dataset "
                    "(no meta.json from cirjax.data.synth); point it elsewhere")
  # Sizes the generator cannot meet fail on every process, before process 0 writes anything
  # (the others would otherwise wait for it at the barrier below).
  cfg = synth_config(synth_cfg)
  if jax.process_index() == 0:
    _log(f"synthetic data missing: generating it in {root}")
    tmp = root.rstrip("/") + ".tmp"
    synth.generate(tmp, cfg, progress=_log, key=_synth_key)
    os.replace(tmp, root)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("cirjax_synthetic_data")


def epoch_rows(seed: int, epoch: int, num_queries: int, steps_per_epoch: int,
               global_batch: int) -> np.ndarray:
  """The global query rows of `epoch` in batch order (the tail that fills no batch is
  dropped): the one definition of a training epoch's order, for both input pipelines."""
  order = np.random.default_rng([seed, epoch]).permutation(num_queries)
  return order[:steps_per_epoch * global_batch]


def image_table(train_splits: list[CIRSplit], eval_splits: list[CIRSplit]
                ) -> tuple[dict[str, int], dict[str, Any], int]:
  """Every image of the run by name: (name -> global index, name -> image reference, number
  of training images). Training images come first, then evaluation-only ones."""
  names: dict[str, int] = {}
  refs: dict[str, Any] = {}

  def add(split, image_names):
    for n in image_names:
      if n not in names:
        names[n] = len(names)
        refs[n] = split.images[n]

  for s in train_splits:
    add(s, list(s.corpus) + [x for q in s.queries for x in (q.reference, q.target)])
  n_train = len(names)
  for s in eval_splits:
    add(s, list(s.corpus) + [q.reference for q in s.queries])
  return names, refs, n_train


PIPELINES = ("prefetch", "grain")


def pipeline(dc: ml_collections.ConfigDict) -> str:
  """`config.data.pipeline`, checked: 'grain' needs `config.data.tfds_dir`."""
  p = str(dc.get("pipeline", "prefetch") or "prefetch")
  if p not in PIPELINES:
    raise UsageError(f"config.data.pipeline={p!r}: use one of {PIPELINES}")
  if p == "grain" and not dc.get("tfds_dir"):
    raise UsageError("config.data.pipeline='grain' reads a `cirjax data tfds` build: set "
                      "config.data.tfds_dir to its --data-dir")
  if p == "grain":
    missing = [m for m in ("grain", "tensorflow_datasets", "array_record")
               if importlib.util.find_spec(m) is None]
    if missing:
      raise MissingDependencyError(
          f"config.data.pipeline='grain' needs the optional package(s) {', '.join(missing)}, "
          "not installed: install cirjax's `grain` extra (pip install -e '.[grain]')")
  return p


def train_split_names(dc: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """The TFDS split names of the training and evaluation splits `config.data` names."""
  if dc.dataset == "fashioniq":
    cats = list(dc.categories)
    return [f"{c}_{dc.train_split}" for c in cats], [f"{c}_{dc.eval_split}" for c in cats]
  return [dc.train_split], [dc.eval_split]


def read_training_data(dc: ml_collections.ConfigDict):
  """(training splits, evaluation splits, image source) of `config.data`: from the dataset
  root (image source None: the files), or for the grain pipeline from the TFDS build in
  `config.data.tfds_dir` (images decoded from its ArrayRecords)."""
  if pipeline(dc) != "grain":
    return (*read_splits(dc), None)
  from cirjax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  if dc.dataset not in ("synthetic", "cirr", "fashioniq"):
    raise DataError(f"config.data.dataset={dc.dataset!r}: QuRe trains on synthetic, cirr or "
                    "fashioniq")
  train, evals = train_split_names(dc)
  splits, source = tfds_builders.image_source_for(os.path.expanduser(dc.tfds_dir), dc.dataset,
                                                   train + evals)
  return splits[:len(train)], splits[len(train):], source


def read_splits(dc: ml_collections.ConfigDict) -> tuple[list[CIRSplit], list[CIRSplit]]:
  """(training splits, evaluation splits) of `config.data`; FashionIQ gives one per category."""
  root = os.path.expanduser(dc.root)
  ds = dc.dataset
  if ds == "synthetic":
    ensure_synthetic(root, dc.get("synth"))
    return ([synth.read_synthetic(root, dc.train_split)],
            [synth.read_synthetic(root, dc.eval_split)])
  if ds == "cirr":
    return [cirr.read_cirr(root, dc.train_split)], [cirr.read_cirr(root, dc.eval_split)]
  if ds == "fashioniq":
    cats = list(dc.categories)
    return ([fashioniq.read_fashioniq(root, c, dc.train_split) for c in cats],
            [fashioniq.read_fashioniq(root, c, dc.eval_split) for c in cats])
  raise DataError(f"config.data.dataset={ds!r}: QuRe trains on synthetic, cirr or fashioniq")

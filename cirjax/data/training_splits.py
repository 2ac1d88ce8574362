"""The CIR splits a training config names (`config.data`), and the synthetic benchmark made
on first use."""

from __future__ import annotations

import os
import sys

import jax
import ml_collections
from jax.experimental import multihost_utils

from cirjax.data import cirr, fashioniq, synth
from cirjax.data.records import CIRSplit, DataError


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[cirjax] {msg}", file=sys.stderr, flush=True)


def ensure_synthetic(root: str, synth_cfg: ml_collections.ConfigDict | None) -> None:
  """Generates the synthetic benchmark at `root` unless it is already there (process 0)."""
  if synth.is_synthetic(root):
    return
  if os.path.exists(root) and os.listdir(root):
    raise DataError(f"config.data.root={root} exists but is not a cirjax synthetic dataset "
                    "(no meta.json from cirjax.data.synth); point it elsewhere")
  if jax.process_index() == 0:
    kw = dict(synth_cfg or {})
    cfg = synth.SynthConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                               for k, v in kw.items()})
    _log(f"synthetic data missing: generating it in {root}")
    tmp = root.rstrip("/") + ".tmp"
    synth.generate(tmp, cfg, progress=_log)
    os.replace(tmp, root)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("cirjax_synthetic_data")


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

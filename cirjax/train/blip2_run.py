"""A QuRe (BLIP-2) run's tokenizer and its exported model: what `cirjax train` writes at the
end of a run and what reading the run back (`QuReTask.model_from_params`, `cirjax eval`)
finds its vocabulary through."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections
import numpy as np

from cirjax import console
from cirjax.convert import hub, registry
from cirjax.data.tokenizer import find_vocab
from cirjax.models import blip2
from cirjax.train import config_utils
from cirjax.train import sharding as shd


_log = console.log


def tokenizer_source(config: ml_collections.ConfigDict) -> str:
  """The run's BERT tokenizer: `data.tokenizer` (a path or hub id); else the one beside
  `model.init` (its directory, or a LAVIS file's, when it holds vocab.txt / tokenizer.json /
  tokenizer_config.json); else `data.root` (the synthetic set's vocab.txt)."""
  named = config.data.get("tokenizer") or ""
  if named:
    return str(hub.resolve(named, weights=False))
  init = config_utils.model_init(config, check=False)
  beside = registry.tokenizer_dir(init) if init else None
  if beside is not None:
    return str(beside)
  return os.path.expanduser(config.data.get("root") or "")


def export_model(path: Path, config: ml_collections.ConfigDict, cfg: blip2.Blip2Config, params,
                 mesh: jax.sharding.Mesh) -> None:
  """Writes the trained model as a cirjax BLIP-2 directory at `path`, with the run's vocab."""
  host = jax.device_get(jax.jit(lambda p: p, out_shardings=shd.replicated(mesh))(params))
  if jax.process_index() != 0:
    return
  host = blip2.unstack_layers(jax.tree.map(np.asarray, host), cfg)  # the converters' layout
  registry.save(path, "blip2", cfg.replace(scan_layers=False), host, overwrite=True,
                extra={"trained_by": "cirjax train", "train_config": config.get("config_spec", "")})
  try:
    (path / "vocab.txt").write_text(find_vocab(tokenizer_source(config)).read_text())
  except FileNotFoundError:
    pass
  _log(f"exported the trained model to {path}")

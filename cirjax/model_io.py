"""cirjax model directories: an Orbax checkpoint of the params plus `cirjax_config.json`.

Layout of a directory written by `save_model_dir`:

    DIR/cirjax_config.json   {"format": "cirjax", "format_version": 1,
                              "model_type": "blip2" | "llava" | ..., "config": {...}}
    DIR/params/              Orbax (StandardCheckpointer) checkpoint of the param pytree

Writes are atomic: everything goes to a temporary directory beside the destination, which
is renamed into place only when complete. An existing destination is never touched unless
`overwrite=True`, and even then it is replaced only after the new one is fully written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np

CONFIG_NAME = "cirjax_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def is_cirjax_dir(path: str | os.PathLike) -> bool:
  """True if `path` is a directory written by `save_model_dir`."""
  p = Path(path)
  return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_cirjax_config(path: str | os.PathLike) -> dict:
  """Reads and validates DIR/cirjax_config.json."""
  f = Path(path) / CONFIG_NAME
  if not f.is_file():
    raise FileNotFoundError(f"{path}: not a cirjax model directory (no {CONFIG_NAME})")
  try:
    meta = json.loads(f.read_text())
  except ValueError as e:
    raise ValueError(f"{f}: not valid JSON ({e})") from None
  for key in ("model_type", "config"):
    if key not in meta:
      raise ValueError(f"{f}: missing field {key!r}")
  if meta.get("format_version", 1) > FORMAT_VERSION:
    raise ValueError(f"{f}: format_version {meta['format_version']} is newer than this cirjax "
                     f"understands ({FORMAT_VERSION})")
  return meta


class atomic_directory:  # pylint: disable=invalid-name
  """Context manager: yields a fresh temp dir beside `dst`; on success renames it to `dst`.

  On an exception the temp dir is removed and `dst` is untouched. If `dst` exists and
  `overwrite` is False, raises FileExistsError before anything is written.
  """

  def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False):
    self.dst = Path(dst).absolute()
    self.overwrite = overwrite
    self.tmp: Optional[Path] = None

  def __enter__(self) -> Path:
    if self.dst.exists() and not self.overwrite:
      raise FileExistsError(f"{self.dst} already exists; pass overwrite=True (--overwrite) to "
                            "replace it")
    self.dst.parent.mkdir(parents=True, exist_ok=True)
    self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    assert self.tmp is not None
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    if self.dst.exists():
      if not self.overwrite:  # appeared while we were writing
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise FileExistsError(f"{self.dst} appeared while writing; left it untouched")
      old = self.dst.parent / f".{self.dst.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(self.dst, old)
      try:
        os.rename(self.tmp, self.dst)
      except BaseException:
        os.rename(old, self.dst)
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise
      if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
      else:
        old.unlink()
    else:
      os.rename(self.tmp, self.dst)
    return False


def _to_host(params: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x) if not isinstance(x, jax.Array) else x, params)


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"config value {o!r} of type {type(o).__name__} is not JSON-serialisable")


def write_params(directory: str | os.PathLike, params: Any) -> None:
  """Writes an Orbax checkpoint of `params` to `directory` (which must not exist)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(Path(directory).absolute(), _to_host(params))
  ckptr.wait_until_finished()
  ckptr.close()


def read_params(directory: str | os.PathLike, target: Any = None) -> Any:
  """Restores an Orbax params checkpoint. `target` may be an abstract pytree (e.g. of
  `jax.ShapeDtypeStruct` with shardings) to restore straight into sharded arrays; without it
  the arrays land on the default device."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = Path(directory).absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: params checkpoint directory is missing")
  ckptr = ocp.StandardCheckpointer()
  try:
    if target is None:
      meta = ckptr.metadata(directory)
      tree = getattr(meta, "item_metadata", meta)
      tree = getattr(tree, "tree", tree)
      target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(
                                             jax.devices()[0])), tree)
    return ckptr.restore(directory, target)
  finally:
    ckptr.close()


def save_model_dir(path: str | os.PathLike, params: Any, config: Mapping[str, Any],
                   model_type: str, *, overwrite: bool = False,
                   extra: Optional[Mapping[str, Any]] = None,
                   extra_files: Optional[Mapping[str, str | os.PathLike]] = None) -> Path:
  """Saves params (Orbax) and `cirjax_config.json` to `path`, atomically.

  Args:
    path: destination directory. Must not exist unless `overwrite`.
    params: the param pytree (nested dicts of arrays).
    config: JSON-serialisable model config (e.g. `Blip2Config.to_dict()`).
    model_type: 'blip2', 'llava', ...; `load_model_dir` returns it for dispatch.
    overwrite: replace an existing destination (only after the new one is complete).
    extra: more JSON fields for cirjax_config.json (e.g. where the weights came from).
    extra_files: {name in the directory: source file} copied along (e.g. the tokenizer).
  """
  meta = {"format": "cirjax", "format_version": FORMAT_VERSION, "model_type": model_type,
          "config": dict(config)}
  if extra:
    meta.update(dict(extra))
  text = json.dumps(meta, indent=2, default=_json_default)  # fail before writing anything
  with atomic_directory(path, overwrite=overwrite) as tmp:
    write_params(tmp / PARAMS_DIR, params)
    (tmp / CONFIG_NAME).write_text(text + "\n")
    for name, src in (extra_files or {}).items():
      shutil.copyfile(src, tmp / name)
  return Path(path)


def load_model_dir(path: str | os.PathLike, *, target: Any = None) -> tuple[str, dict, Any]:
  """Loads a directory written by `save_model_dir`: returns (model_type, config dict, params).

  `target`: optional abstract pytree (shapes, dtypes, shardings) to restore into.
  """
  meta = read_cirjax_config(path)
  params = read_params(Path(path) / PARAMS_DIR, target)
  return meta["model_type"], meta["config"], params

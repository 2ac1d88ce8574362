"""Loading a model for evaluation/search: a checkpoint directory or a training workdir.

The evaluator needs an object with two methods (the `cirjax.load_blip2` protocol):

* `encode_image(pixels [B, H, W, 3] float32) -> [B, Q, D]` (or `[B, D]`), L2-normalised;
* `compose(pixels, input_ids [B, L] int32, attention_mask [B, L]) -> [B, D]`, L2-normalised.

Accepted paths:
* a cirjax model directory (`cirjax_config.json`, written by `cirjax convert` or by the
  trainer's export) or an HF BLIP-2 directory: loaded with `cirjax.load_blip2`;
* a training workdir: the newest model directory inside it, looked up as
  `<workdir>/model`, `<workdir>/export`, `<workdir>/best`, then any direct subdirectory that
  is a cirjax model directory (newest first). The trainer owns what it writes there; this
  module only reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_WORKDIR_CANDIDATES = ("model", "export", "best", "final")


def resolve_model_dir(path: str | os.PathLike) -> Path:
  """The model directory for `path` (itself, or the newest model dir of a workdir)."""
  from cirjax import model_io  # pylint: disable=g-import-not-at-top
  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint path does not exist: {p}")
  if not p.is_dir():
    raise NotADirectoryError(f"checkpoint must be a directory, got the file {p}")
  if model_io.is_cirjax_dir(p) or (p / "config.json").is_file():
    return p
  for name in _WORKDIR_CANDIDATES:
    if model_io.is_cirjax_dir(p / name):
      return p / name
  subs = sorted((d for d in p.iterdir() if d.is_dir() and model_io.is_cirjax_dir(d)),
                key=lambda d: d.stat().st_mtime, reverse=True)
  if subs:
    return subs[0]
  raise FileNotFoundError(
      f"{p} is neither a model directory (cirjax_config.json or an HF config.json) nor a "
      f"training workdir holding one (looked for {', '.join(_WORKDIR_CANDIDATES)} and any "
      "subdirectory with cirjax_config.json); export the trained model first")


def load_encoder(path: str | os.PathLike) -> tuple[Any, Path]:
  """Loads a BLIP-2 CIR model (see module docstring); returns (encoder, model dir)."""
  import cirjax  # pylint: disable=g-import-not-at-top
  from cirjax import model_io  # pylint: disable=g-import-not-at-top
  d = resolve_model_dir(path)
  if model_io.is_cirjax_dir(d):
    model_type = model_io.read_cirjax_config(d)["model_type"]
    if model_type != "blip2":
      raise ValueError(f"{d}: a '{model_type}' checkpoint; `cirjax eval`/`search` score BLIP-2 "
                       "(QuRe) models. For LLaVA-Phi use cirjax.eval.evaluate.encode_split with "
                       "an encoder built from cirjax.load_llava and its prompts")
  try:
    model = cirjax.load_blip2(d)
  except ModuleNotFoundError as e:
    raise RuntimeError(f"cannot load {d}: the BLIP-2 model code is not available ({e})") from e
  for m in ("encode_image", "compose"):
    if not callable(getattr(model, m, None)):
      raise TypeError(f"model loaded from {d} has no {m}() method")
  return pure(model), d


class PureEncoder:
  """An encoder as pure functions of explicit params, so the evaluator jits each once and
  passes the (replicated) params as an argument.

  `encode_image_fn(params, pixels) -> [B, Q, D]`, `compose_fn(params, pixels, ids, mask) ->
  [B, D]`. `encode_image` / `compose` call them eagerly (e.g. for a single search query).
  """

  def __init__(self, params: Any, encode_image_fn, compose_fn, config: Any = None):
    self.params, self.config = params, config
    self.encode_image_fn, self.compose_fn = encode_image_fn, compose_fn

  def encode_image(self, pixels):
    return self.encode_image_fn(self.params, pixels)

  def compose(self, pixels, input_ids, attention_mask):
    return self.compose_fn(self.params, pixels, input_ids, attention_mask)


def pure(encoder: Any) -> PureEncoder | Any:
  """A cirjax BLIP-2 model as a `PureEncoder` (its object methods check inputs on the host,
  which cannot run under the evaluator's jit); anything else unchanged."""
  if isinstance(encoder, PureEncoder):
    return encoder
  if type(encoder).__module__ == "cirjax.models.blip2" and hasattr(encoder, "params"):
    from cirjax.models import blip2  # pylint: disable=g-import-not-at-top
    cfg = encoder.config
    return PureEncoder(encoder.params, lambda p, px: blip2.encode_image(p, cfg, px),
                       lambda p, px, ids, mask: blip2.compose(p, cfg, px, ids, mask), cfg)
  return encoder


def jit_parts(encoder: Any, which: str):
  """(function, params) for `retrieval.encode_batches`: which = 'image' or 'compose'."""
  if isinstance(encoder, PureEncoder):
    return (encoder.encode_image_fn if which == "image" else encoder.compose_fn), encoder.params
  return (encoder.encode_image if which == "image" else encoder.compose), None


def model_image_size(model: Any, default: int = 224) -> int:
  """The model's input resolution from its config, if it states one."""
  cfg = getattr(model, "config", None)
  for path in (("vision", "image_size"), ("vision_config", "image_size"), ("image_size",)):
    obj = cfg
    for key in path:
      if obj is None:
        break
      obj = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
    if isinstance(obj, int) and obj > 0:
      return obj
  return default


def find_tokenizer_source(model_dir: Path, dataset_root: str | os.PathLike | None) -> Path:
  """Where the BERT vocab comes from: the model dir, else the dataset's vocab.txt (synthetic)."""
  from cirjax.data import text  # pylint: disable=g-import-not-at-top
  try:
    text.find_vocab(model_dir)
    return model_dir
  except FileNotFoundError:
    pass
  if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
    return model_dir
  if dataset_root is not None and (Path(dataset_root) / "vocab.txt").is_file():
    return Path(dataset_root) / "vocab.txt"
  raise FileNotFoundError(f"no tokenizer (vocab.txt / tokenizer.json) in {model_dir}; pass "
                          "--tokenizer PATH (a vocab.txt or a tokenizer directory)")

"""Loading a model for evaluation/search: a checkpoint directory or a training workdir.

A loaded model is a `cirjax.models.Model` (family, config, params, tokenizer). What the
evaluator and search run is its `RetrievalFns` (`retrieval_fns(model, split)`): the model
family's functional API as pure functions of explicit params,

* `image(params, pixels [B, H, W, 3] float32) -> [B, Q, D]` (or `[B, D]`), L2-normalised;
* `compose(params, pixels, input_ids [B, L] int32, attention_mask [B, L]) -> [B, D]`.

Accepted paths (`--checkpoint` of `cirjax eval` / `search` / `mine`):
* a Hugging Face hub id `ORG/NAME[@REVISION]` when no such local path exists
  (`cirjax.convert.hub.resolve`: its snapshot in the HF cache, then as below);
* a cirjax model directory (`cirjax_config.json`, written by `cirjax convert` or by the
  trainer's export), an HF BLIP-2 / LLaVA directory, or a LAVIS BLIP-2 `.pth`/`.pt`/`.bin`
  file: the family is told by `cirjax.convert.registry.sniff`;
* a training workdir (`config.json` of the run + `checkpoints/`): its exported model, looked
  up as `<workdir>/model`, `export`, `best`, `final`, then any direct subdirectory that is a
  cirjax model directory (newest first); with no export, its latest checkpoint
  (`workdir_checkpoint`), which the CLI (`cirjax.commands.eval.load_model`) turns into a
  model with the run's config, as only the training layer knows how. The trainer owns what it writes there; this module only
  reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from cirjax import prompts
from cirjax.convert import hub, io, registry
from cirjax.data import text
from cirjax.errors import CirjaxError, UsageError
from cirjax.models import Model, blip2, llava

_WORKDIR_CANDIDATES = ("model", "export", "best", "final")
_LOOKED_FOR = ("a cirjax model directory (cirjax_config.json), an HF directory (config.json of "
               f"a BLIP-2 or LLaVA model), a LAVIS BLIP-2 state-dict file "
               f"({'/'.join(registry.LAVIS_SUFFIXES)}), or a training "
               f"workdir (config.json + checkpoints/) holding an exported model "
               f"({', '.join(_WORKDIR_CANDIDATES)}, or any subdirectory with cirjax_config.json) "
               "or a checkpoint, or a Hugging Face hub id ORG/NAME[@REVISION]")


class WorkdirCheckpoint(NamedTuple):
  """A training workdir without an exported model: the run's config and its latest step."""
  workdir: Path
  config: dict        # the run's config.json
  step_dir: Path      # <workdir>/checkpoints/<step>


def is_training_workdir(p: Path) -> bool:
  return (p / "config.json").is_file() and (p / "checkpoints").is_dir()


def latest_checkpoint(workdir: Path) -> Path | None:
  """`<workdir>/checkpoints/<step>` of the highest step holding a `state` item, or None."""
  steps = [d for d in (workdir / "checkpoints").iterdir()
           if d.name.isdigit() and (d / "state").is_dir()]
  return max(steps, key=lambda d: int(d.name)) if steps else None


def resolve_model_dir(path: str | os.PathLike) -> Path:
  """The model for `path` (itself, or the newest model dir of a workdir); see the module
  docstring."""
  p = hub.resolve(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint path does not exist: {p}; expected {_LOOKED_FOR}")
  if p.is_file():
    if p.suffix in registry.LAVIS_SUFFIXES:
      return p
    raise NotADirectoryError(f"checkpoint {p} is a file but not a LAVIS state dict; "
                             f"expected {_LOOKED_FOR}")
  if io.is_cirjax_dir(p):
    return p
  # A training workdir's config.json is the run's config, not an HF model config: look for
  # its exported model before taking the directory for an HF one.
  for name in _WORKDIR_CANDIDATES:
    if io.is_cirjax_dir(p / name):
      return p / name
  if is_training_workdir(p):
    raise FileNotFoundError(
        f"{p} is a training workdir without an exported model (looked for "
        f"{', '.join(_WORKDIR_CANDIDATES)}) or a checkpoint; let the run finish, or export it")
  if (p / "config.json").is_file():
    return p
  subs = sorted((d for d in p.iterdir() if d.is_dir() and io.is_cirjax_dir(d)),
                key=lambda d: d.stat().st_mtime, reverse=True)
  if subs:
    return subs[0]
  raise FileNotFoundError(f"{p} is none of the checkpoints cirjax reads; looked for "
                          f"{_LOOKED_FOR}; export the trained model first")


def workdir_checkpoint(path: str | os.PathLike) -> WorkdirCheckpoint | None:
  """The latest checkpoint of a training workdir that has no exported model, else None."""
  p = Path(path)
  if not (p.is_dir() and is_training_workdir(p)) or io.is_cirjax_dir(p) or any(
      io.is_cirjax_dir(p / n) for n in _WORKDIR_CANDIDATES):
    return None
  step_dir = latest_checkpoint(p)
  if step_dir is None:
    return None
  try:
    config = json.loads((p / "config.json").read_text())
  except ValueError as e:
    raise CirjaxError(f"{p / 'config.json'}: not valid JSON ({e}); the workdir's config is "
                      "damaged") from None
  if not isinstance(config, dict):
    raise CirjaxError(f"{p / 'config.json'}: holds a JSON {type(config).__name__}, expected "
                      "the run's config (an object)")
  return WorkdirCheckpoint(p, config, step_dir)


def load_encoder(path: str | os.PathLike) -> tuple[Model, Path]:
  """Loads a model (see module docstring); returns (`Model`, model dir). Score it through
  `retrieval_fns(model, split)`. A training workdir with only checkpoints is an error here:
  its model is built by the training layer (`workdir_checkpoint` finds the checkpoint)."""
  d = resolve_model_dir(path)
  if registry.detect(d) == "llava":
    model = registry.load_llava(d)
    if model.tokenizer is None:
      raise FileNotFoundError(f"{d}: no tokenizer (tokenizer.json / tokenizer_config.json) next "
                              "to the LLaVA weights; the InstructCIR prompts need it")
    return Model("llava", model.config, model.params, model.tokenizer, str(d)), d
  return registry.load_blip2(d), d


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
  """Where the BERT vocab comes from: the model dir (or the directory of a LAVIS file), else
  the dataset's vocab.txt (synthetic)."""
  model_dir = model_dir if model_dir.is_dir() else model_dir.parent
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


class RetrievalFns(NamedTuple):
  """What evaluation and search run: pure functions of explicit params, which the encode
  loop jits once (params replicated and passed as an argument, never baked in)."""
  params: Any
  image: Callable    # (params, pixels) -> [B, Q, D] or [B, D], L2-normalised
  compose: Callable  # (params, pixels, input_ids, attention_mask) -> [B, D], L2-normalised


_LLAVA_DATASET = {"synthetic": "cirr", "cirr": "cirr", "circo": "circo",
                  "fashioniq": "fashioniq", "genecis": "genecis"}


def retrieval_fns(model: Model, split: Any = None, pad_to_multiple_of: int = 16
                  ) -> tuple[RetrievalFns, Callable | None, Callable | None]:
  """(RetrievalFns, tokenize_fn, text_fn) scoring `split` with `model`.

  BLIP-2: `blip2.encode_image` / `blip2.compose`; tokenize_fn and text_fn are None (the
  caller's BERT tokenizer and the default query text). LLaVA-Phi: `llava.embed` with
  InstructCIR's zero-shot prompts for the split's dataset (`split` is required).
  """
  cfg = model.config
  if model.family == "blip2":
    return RetrievalFns(model.params, lambda p, px: blip2.encode_image(p, cfg, px),
                        lambda p, px, ids, mask: blip2.compose(p, cfg, px, ids, mask)), None, None
  if model.family != "llava":
    raise ValueError(f"no retrieval functions for a {model.family!r} model")
  return _llava_fns(model, split, pad_to_multiple_of)


def _llava_fns(model: Model, split: Any, pad_to_multiple_of: int):
  """InstructCIR appendix D.2: target images are embedded with the dataset's "image" prompt
  (FashionIQ's names the category), queries with the "query" prompt filled with the
  modification text (GeneCIS: the task's prompt filled with the condition). The embedding is
  the final hidden state of the left-padded prompt's last (EOS) token, L2-normalised.
  Prompts are padded to a multiple of `pad_to_multiple_of` tokens (few compiled shapes)."""
  ds = _LLAVA_DATASET.get(getattr(split, "dataset", None))
  if ds is None:
    raise UsageError(f"no InstructCIR prompts for {getattr(split, 'dataset', None)!r}: a "
                     f"LLaVA-Phi model is evaluated on {', '.join(sorted(_LLAVA_DATASET))}")
  tok, cfg = model.tokenizer, model.config
  n_img = prompts.num_image_tokens(cfg.vision.image_size, cfg.vision.patch_size,
                                   cfg.vision_feature_select_strategy)
  fields: dict[str, str] = {}
  query_kind, text_field = "query", "modifier"
  if ds == "fashioniq":
    fields["category"] = prompts.FASHIONIQ_CATEGORY_WORDS[split.split.split(".")[0]]
  if ds == "genecis":
    query_kind = split.split
    text_field = "attribute" if split.split.endswith("attribute") else "object"
  image_t = prompts.inference_template(ds, "image")
  query_t = prompts.inference_template(ds, query_kind)
  img = prompts.encode(tok, image_t, [fields], num_image_tokens=n_img, image=True)
  ids0, mask0 = img["input_ids"], img["attention_mask"]

  def image_fn(params, pixels):
    b = pixels.shape[0]
    return llava.embed(params, cfg, jnp.broadcast_to(ids0, (b, ids0.shape[1])),
                       jnp.broadcast_to(mask0, (b, mask0.shape[1])), pixels)

  def compose_fn(params, pixels, ids, mask):
    return llava.embed(params, cfg, ids, mask, pixels)

  def tokenize_fn(texts):
    enc = prompts.encode(tok, query_t, [{**fields, text_field: t} for t in texts],
                         num_image_tokens=n_img, image=True,
                         pad_to_multiple_of=pad_to_multiple_of)
    return enc["input_ids"], enc["attention_mask"]

  return RetrievalFns(model.params, image_fn, compose_fn), tokenize_fn, lambda q: q.text

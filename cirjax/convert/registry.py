"""Model families, and the one place that tells them apart.

A `Family` record names what cirjax needs to handle one kind of model: its config class,
random init, HF reader/writer (the family's tables run by `cirjax.convert.engine`), and,
for BLIP-2, the LAVIS state-dict reader. On top of them:

    detect(path) -> 'blip2' | 'llava'          HF dir, LAVIS file or cirjax dir
    load(path, **kw) -> Loaded(family, config, params, source, kind)
    save(path, family, config, params)          cirjax model directory (atomic)
    export_hf(path, family, config, params)     HF directory (atomic)

A loaded model with its verbs (`cirjax.load`, `cirjax.eval.model.Model`) is built one layer
down from these records; nothing outside this module asks which family a model is: it reads
the family's fields (`Family.image_transform`, `Family.prompted`, the model functions, ...).

Sources: an HF directory (config.json `model_type` 'blip-2' or 'llava'), a LAVIS BLIP-2
state-dict file (.pth/.pt/.bin/.ckpt/.safetensors), or a cirjax model directory
(`cirjax_config.json`, format version 1, see `cirjax.convert.io`); wherever a path is taken,
a Hugging Face hub id (`ORG/NAME[@REVISION]`) is too (`cirjax.convert.hub.resolve`: a local
path wins; the id becomes its snapshot directory in the HF cache).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from cirjax.convert import hub, io
from cirjax.convert import blip2_convert, llava_convert
from cirjax.data.tokenizer import load_tokenizer
from cirjax.models import blip2, llava

LAVIS_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
                   "generation_config.json")


class Family(NamedTuple):
  """What cirjax knows about one model family.

  name: the `model_type` written to cirjax directories.
  config_class: has `from_dict` / `to_dict`.
  init: (config, rng) -> random params.
  hf_model_types: HF config.json `model_type` values of this family (detection).
  from_hf: (HF dir, **kw) -> (config, params).
  to_hf: (params, config, dir, **kw) -> dir; writes safetensors + config.json.
  check_export: (config) -> raises if the model cannot be written as HF.
  from_file: (state-dict file, **kw) -> (config, params), for families with a non-HF
    single-file layout (LAVIS BLIP-2).
  finish_hf: (HF dir being written, config, tokenizer dir or None) -> None: what an HF
    directory needs beside weights and copied tokenizer files for transformers' Auto
    classes (BLIP-2: the BERT tokenizer and image-processor config; LLaVA: token ids).
  unstack_layers: (params, config) -> the per-layer tree the HF tables and LoRA read.
  device_params: (params, config) -> the arrays a loaded model computes with (LLaVA: the LM
    head left on the host, the rest cast to `param_dtype`).
  read_lm_head: (HF dir) -> the LM-head kernel or None, for families that carry one.
  image_transform: the preprocessing of `cirjax.data.images.make_transform` the family's
    published checkpoints were trained with ('targetpad': QuRe's; 'clip': LLaVA's CLIP).
  prompted: text reaches the model inside InstructCIR's prompt templates, tokenised by the
    model's own (left-padding) tokenizer, which is then required (LLaVA); otherwise the
    text is tokenised as it is, by a BERT tokenizer (BLIP-2).
  image / query / text: the model functions behind the verbs of a loaded model, as pure
    functions of explicit params: `image(params, config, pixels, ids, mask)` -> target
    features [B, Q, D] or [B, D] (`ids`/`mask`: the image prompt of a prompted family, else
    None), `query(params, config, pixels, ids, mask)` -> composed queries [B, D],
    `text(params, config, ids, mask)` -> text features [B, D]; all L2-normalised.
  """
  name: str
  config_class: type
  init: Callable[..., Any]
  hf_model_types: tuple[str, ...]
  from_hf: Callable[..., tuple]
  to_hf: Callable[..., Path]
  check_export: Callable[[Any], Any] = lambda config: None
  from_file: Optional[Callable[..., tuple]] = None
  finish_hf: Callable[[Path, Any, Optional[Path]], Any] = lambda dst, config, tok: None
  unstack_layers: Callable[[Any, Any], Any] = lambda params, config: params
  device_params: Callable[[Any, Any], Any] = lambda params, config: params
  read_lm_head: Optional[Callable[[Path], Any]] = None
  image_transform: str = "clip"
  prompted: bool = False
  image: Optional[Callable[..., Any]] = None
  query: Optional[Callable[..., Any]] = None
  text: Optional[Callable[..., Any]] = None


class Loaded(NamedTuple):
  family: str
  config: Any
  params: Any
  source: str  # the path it came from
  kind: str    # 'cirjax', 'hf' or 'lavis'


def _blip2_init(config, rng: Optional[jax.Array] = None):
  return blip2.init_blip2(jax.random.PRNGKey(0) if rng is None else rng, config)


def _llava_finish_hf(dst: Path, config: llava.LlavaConfig, tokenizer_dir: Optional[Path]) -> None:
  """The tokenizer's bos/eos/pad ids into `text_config` (generation reads them there); a
  warning when there is no tokenizer to copy."""
  tok = load_tokenizer(dst, "llava", required=False)
  if tok is None:
    print(f"warning: {tokenizer_dir} holds no tokenizer (tokenizer.json / "
          f"tokenizer_config.json): the LLaVA export {dst} has none and no bos/eos/pad ids",
          file=sys.stderr, flush=True)
    return
  f = dst / "config.json"
  hf = json.loads(f.read_text())
  hf["text_config"] = llava_convert.llava_config_to_hf(
      config, llava_convert.tokenizer_token_ids(tok))["text_config"]
  f.write_text(json.dumps(hf, indent=2) + "\n")


def _llava_device_params(params, config: llava.LlavaConfig):
  # Encoding never reads the LM head (hidden x vocab, 0.4 GB for Phi-3): not on device.
  return llava.cast_params({k: v for k, v in params.items() if k != "lm_head"}, config)


FAMILIES = {
    "blip2": Family(
        "blip2", blip2.Blip2Config, _blip2_init, ("blip-2", "blip_2"), blip2_convert.from_hf,
        blip2_convert.to_hf, check_export=blip2_convert.config_to_hf,
        from_file=blip2_convert.from_lavis, finish_hf=blip2_convert.write_hf_preprocessing,
        unstack_layers=blip2.unstack_layers,
        device_params=lambda params, config: jax.tree.map(jnp.asarray, params),
        image_transform="targetpad", prompted=False,
        image=lambda p, cfg, px, ids, mask: blip2.encode_image(p, cfg, px),
        query=blip2.compose, text=blip2.encode_text),
    "llava": Family(
        "llava", llava.LlavaConfig, llava.init_params, ("llava", "llava_phi", "llava-phi"),
        llava_convert.from_hf, llava_convert.to_hf, finish_hf=_llava_finish_hf,
        unstack_layers=llava.unstack_layers, device_params=_llava_device_params,
        read_lm_head=llava_convert.read_lm_head, image_transform="clip", prompted=True,
        image=lambda p, cfg, px, ids, mask: llava.embed(p, cfg, ids, mask, px),
        query=lambda p, cfg, px, ids, mask: llava.embed(p, cfg, ids, mask, px),
        text=lambda p, cfg, ids, mask: llava.embed(p, cfg, ids, mask)),
}


def _family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; cirjax knows {sorted(FAMILIES)}")
  return FAMILIES[name]


def family(name: str) -> Family:
  """The Family record of 'blip2' or 'llava' (ValueError naming the known ones otherwise)."""
  return _family(name)


# ----------------------------------------------------------------------------- detection


def _hf_family(config_file: Path) -> str:
  try:
    hf = json.loads(config_file.read_text())
  except (OSError, ValueError) as e:
    raise io.WeightFileError(f"{config_file}: unreadable ({e})") from None
  if not isinstance(hf, dict):
    raise io.WeightFileError(f"{config_file}: an HF config.json holds a JSON object, got a "
                             f"{type(hf).__name__}")
  mt = hf.get("model_type")
  for fam in FAMILIES.values():
    if mt in fam.hf_model_types:
      return fam.name
  raise io.WeightFileError(f"{config_file}: unknown model_type {mt!r}: neither BLIP-2 nor LLaVA "
                           "(cirjax reads 'blip-2' Blip2ForImageTextRetrieval and 'llava' "
                           "LlavaForConditionalGeneration checkpoints)")


def sniff(path: str | os.PathLike) -> tuple[str, str]:
  """(family, kind) of a source; kind is 'cirjax', 'hf' or 'lavis'. Raises with the reason
  for anything else. A hub id is resolved first (`hub.resolve`)."""
  p = hub.resolve(path)
  if not p.exists():
    raise FileNotFoundError(f"{p}: no such file or directory (nor a Hugging Face hub id "
                            "ORG/NAME[@REVISION])")
  if io.is_cirjax_dir(p):
    mt = io.read_cirjax_config(p)["model_type"]
    if mt not in FAMILIES:
      raise io.WeightFileError(f"{p}: a '{mt}' checkpoint; cirjax knows the model families "
                               f"{sorted(FAMILIES)}")
    return mt, "cirjax"
  if p.is_dir():
    if (p / "config.json").is_file():
      return _hf_family(p / "config.json"), "hf"
    raise FileNotFoundError(f"{p}: no config.json (an HF model directory needs one) and no "
                            f"{io.CONFIG_NAME} (a cirjax directory); for a LAVIS checkpoint "
                            "pass the .pth file")
  if p.suffix in LAVIS_SUFFIXES:
    return "blip2", "lavis"
  raise io.WeightFileError(f"{p}: unknown checkpoint type (expected an HF or cirjax directory "
                           f"or a {'/'.join(LAVIS_SUFFIXES)} LAVIS state dict)")


def detect(path: str | os.PathLike) -> str:
  """The model family of an HF directory, LAVIS file or cirjax directory."""
  return sniff(path)[0]


# ----------------------------------------------------------------------------- in and out


def load(path: str | os.PathLike, *, family: Optional[str] = None, **kw) -> Loaded:
  """Reads any supported source. `family`, if given, is checked against the detected one;
  `kw` goes to the family's HF / LAVIS reader (e.g. `vision_heads` for LAVIS, `report`
  for LLaVA). `path` may be a hub id (`hub.resolve`); `Loaded.source` is then the local
  snapshot directory."""
  p = hub.resolve(path)
  found, kind = sniff(p)
  if family is not None and family != found:
    raise io.WeightFileError(f"{p}: a {kind} '{found}' model, not '{family}' (use "
                             f"cirjax.load_{found})")
  fam = FAMILIES[found]
  if kind == "cirjax":
    _, cfg_dict, params = io.load_model_dir(p)
    config = fam.config_class.from_dict(cfg_dict)
  elif kind == "hf":
    config, params = fam.from_hf(p, **kw)
  else:
    config, params = fam.from_file(p, **kw)
  return Loaded(found, config, params, str(p), kind)


def tokenizer_dir(path_or_id: str | os.PathLike) -> Optional[Path]:
  """The directory of a model (a directory, or the directory of a LAVIS file; a hub id is
  resolved) if it holds a tokenizer (vocab.txt, tokenizer.json or tokenizer_config.json),
  else None: where a run's tokenizer comes from when none is named."""
  p = hub.resolve(path_or_id)
  d = p if p.is_dir() else p.parent
  if any((d / n).is_file() for n in ("vocab.txt", "tokenizer.json", "tokenizer_config.json")):
    return d
  return None


def tokenizer_files(directory: str | os.PathLike) -> dict[str, Path]:
  """{name: path} of the tokenizer / processor / generation-config files in `directory`."""
  d = Path(directory)
  return {n: d / n for n in TOKENIZER_FILES if (d / n).is_file()}


def save(path: str | os.PathLike, family: str, config: Any, params: Any, *,
         overwrite: bool = False, tokenizer_dir: str | os.PathLike | None = None,
         extra: Optional[dict] = None) -> Path:
  """Writes a cirjax model directory (atomically); tokenizer files in `tokenizer_dir` are
  copied along. `extra`: more fields for cirjax_config.json (e.g. the source)."""
  _family(family)
  files = tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else None
  return io.save_model_dir(path, params, config.to_dict(), family, overwrite=overwrite,
                           extra=extra, extra_files=files)


def export_hf(path: str | os.PathLike, family: str, config: Any, params: Any, *,
              overwrite: bool = False, tokenizer_dir: str | os.PathLike | None = None,
              **kw) -> Path:
  """Writes an HF directory (atomically) that transformers' `from_pretrained` and Auto
  classes load: weights, config.json, the tokenizer files of `tokenizer_dir` and what the
  family adds (`Family.finish_hf`). A missing tokenizer or LLaVA LM head is a warning on
  stderr (the export still holds every weight cirjax uses). `kw` goes to the family's
  writer (`max_shard_bytes`, LLaVA's `key_format`)."""
  fam = _family(family)
  fam.check_export(config)  # refuse before writing anything
  # HF tables name every layer: a `scan_layers` (stacked) tree is unstacked first.
  params = fam.unstack_layers(params, config)
  with io.atomic_directory(path, overwrite=overwrite) as tmp:
    fam.to_hf(params, config, tmp, **kw)
    for name, f in (tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else {}).items():
      shutil.copyfile(f, tmp / name)
    fam.finish_hf(tmp, config, None if tokenizer_dir is None else Path(tokenizer_dir))
  return Path(path)


def lm_head(path: str | os.PathLike) -> Any:
  """The [hidden, vocab] LM-head kernel of a model directory whose family carries one (LLaVA;
  HF: only that tensor is read; cirjax: the whole directory), or None when it has none."""
  try:
    path = hub.resolve(path)
    found, kind = sniff(path)
  except (OSError, ValueError):
    return None
  if FAMILIES[found].read_lm_head is None or kind not in ("hf", "cirjax"):
    return None
  if kind == "hf":
    return FAMILIES[found].read_lm_head(path)
  return load(path).params.get("lm_head", {}).get("kernel")

"""`cirjax convert`: PyTorch checkpoints (HF, LAVIS) -> cirjax directories, and back to HF."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HELP = "convert HF / LAVIS checkpoints to cirjax model directories, and cirjax back to HF"
DESCRIPTION = """\
Converts model weights with strict key accounting: every source tensor is used exactly once
and every parameter is filled; otherwise the error lists each missing, unexpected and
mis-shaped key by name and nothing is written.

The direction follows from SRC:
  HF directory (config.json + model.safetensors / pytorch_model.bin, sharded or not)
      -> cirjax directory (Orbax params + cirjax_config.json). model_type 'blip-2'
         (Blip2ForImageTextRetrieval) or 'llava' (LlavaForConditionalGeneration).
  LAVIS BLIP-2 state dict (model.pth of QuRe / SPRC / blip2_feature_extractor; EVA or CLIP-L
  tower, depth and widths read from the tensors)
      -> cirjax directory.
  cirjax directory -> HF directory (safetensors + config.json) that transformers'
      from_pretrained loads (BLIP-2: EVA towers only; LLaVA: the hub layout).

`.bin`/`.pt`/`.pth` pickles are read with torch.load(weights_only=True): a pickle that would
run code is refused, never executed. Output goes to a temporary directory next to DST that
is renamed into place at the end: a failure leaves no partial output, and an existing DST
is never touched (unless --overwrite, and then only once the new one is complete).
Tokenizer files found beside the source (vocab.txt, tokenizer.json, ...) are copied along.

Examples:
  cirjax convert hf/blip2-itm-vit-g ckpt/blip2-itm
  cirjax convert qure_cirr/model.pth ckpt/qure-cirr
  cirjax convert ckpt/qure-trained out/qure-hf            # back to HF
  cirjax convert hf/llava-phi-3-mini-hf ckpt/llava-phi3
"""

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", "preprocessor_config.json", "processor_config.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", help="HF directory, LAVIS .pth/.pt/.bin file, or cirjax directory")
  p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing DST (only after the new output is complete)")
  p.add_argument("--vision-heads", type=int, default=None,
                 help="LAVIS only: ViT attention heads, if not a released tower (default: "
                 "16 for EVA-g 1408 and CLIP-L 1024, else width/64)")
  p.add_argument("--qformer-heads", type=int, default=None,
                 help="LAVIS only: Q-Former heads (default: 12 for 768 wide, else width/64)")
  p.add_argument("--max-shard-gb", type=float, default=5.0,
                 help="to HF: largest safetensors shard in GiB (default 5)")


def _log(msg: str) -> None:
  print(f"[convert] {msg}", file=sys.stderr, flush=True)


def _tokenizer_files(src: Path) -> dict:
  d = src if src.is_dir() else src.parent
  return {n: d / n for n in TOKENIZER_FILES if (d / n).is_file()}


def _hf_model_type(src: Path) -> str:
  from cirjax.models import blip2_convert  # pylint: disable=g-import-not-at-top
  cfg = blip2_convert.read_hf_config(src)
  mt = cfg.get("model_type")
  if mt in ("blip-2", "blip_2"):
    return "blip2"
  if mt in ("llava", "llava_phi", "llava-phi"):
    return "llava"
  raise ValueError(f"{src / 'config.json'}: unknown model_type {mt!r}; cirjax converts "
                   "'blip-2' (Blip2ForImageTextRetrieval) and 'llava'")


def _llava_convert():
  try:
    from cirjax.models import llava_convert  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(f"LLaVA conversion is unavailable: cirjax.models.llava_convert could not "
                       f"be imported ({e})") from e
  return llava_convert


def to_cirjax(src: Path, dst: Path, *, overwrite: bool = False, vision_heads=None,
              qformer_heads=None) -> tuple[str, dict]:
  """Converts an HF dir or LAVIS file into a cirjax dir; returns (model_type, config dict)."""
  from cirjax import model_io  # pylint: disable=g-import-not-at-top
  from cirjax.models import blip2_convert  # pylint: disable=g-import-not-at-top
  fmt = blip2_convert.source_format(src)
  t0 = time.time()
  if fmt == "hf":
    model_type = _hf_model_type(src)
    _log(f"reading HF {model_type} checkpoint {src}")
    if model_type == "blip2":
      cfg, params = blip2_convert.from_hf(src)
    else:
      cfg, params = _llava_convert().from_hf(src)
  else:
    model_type = "blip2"
    _log(f"reading LAVIS BLIP-2 state dict {src}")
    cfg, params = blip2_convert.from_lavis(src, vision_heads=vision_heads,
                                           qformer_heads=qformer_heads)
  import jax  # pylint: disable=g-import-not-at-top
  n = sum(int(x.size) for x in jax.tree.leaves(params))
  _log(f"converted {n / 1e6:.1f}M parameters in {time.time() - t0:.1f}s; writing {dst}")
  config = cfg.to_dict()
  model_io.save_model_dir(dst, params, config, model_type, overwrite=overwrite,
                          extra={"source": str(Path(src).absolute()), "source_format": fmt},
                          extra_files=_tokenizer_files(src))
  return model_type, config


def to_hf(src: Path, dst: Path, *, overwrite: bool = False,
          max_shard_bytes: int = 5 * 1024 ** 3) -> str:
  """Exports a cirjax dir to an HF directory; returns the model type."""
  from cirjax import model_io  # pylint: disable=g-import-not-at-top
  meta = model_io.read_cirjax_config(src)
  model_type = meta["model_type"]
  _log(f"reading cirjax {model_type} model {src}")
  if model_type == "blip2":
    from cirjax.models import blip2, blip2_convert  # pylint: disable=g-import-not-at-top
    cfg = blip2.Blip2Config.from_dict(meta["config"])
    blip2_convert.config_to_hf(cfg)  # refuse unexportable models before reading params
    export = lambda p, d: blip2_convert.to_hf(p, cfg, d, max_shard_bytes=max_shard_bytes)  # noqa: E731
  elif model_type == "llava":
    lc = _llava_convert()
    from cirjax.models.llava import LlavaConfig  # pylint: disable=g-import-not-at-top
    cfg = LlavaConfig.from_dict(meta["config"])
    export = lambda p, d: lc.to_hf(cfg, p, d, max_shard_bytes=max_shard_bytes)  # noqa: E731
  else:
    raise ValueError(f"{src}: unknown cirjax model_type {model_type!r} (expected 'blip2' or "
                     "'llava')")
  _, _, params = model_io.load_model_dir(src)
  with model_io.atomic_directory(dst, overwrite=overwrite) as tmp:
    export(params, tmp)
    for name, f in _tokenizer_files(Path(src)).items():
      shutil.copyfile(f, tmp / name)
  return model_type


def run(args: argparse.Namespace) -> int:
  from cirjax import model_io  # pylint: disable=g-import-not-at-top
  src, dst = Path(args.src), Path(args.dst)
  t0 = time.time()
  try:
    if dst.exists() and not args.overwrite:
      raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    if dst.absolute() == src.absolute():
      raise ValueError("SRC and DST are the same path")
    if model_io.is_cirjax_dir(src):
      model_type = to_hf(src, dst, overwrite=args.overwrite,
                         max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
      kind = "HF"
    else:
      model_type, _ = to_cirjax(src, dst, overwrite=args.overwrite,
                                vision_heads=args.vision_heads, qformer_heads=args.qformer_heads)
      kind = "cirjax"
  except (OSError, ValueError, RuntimeError) as e:
    print(f"cirjax convert: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({"src": str(src), "dst": str(dst), "model_type": model_type, "format": kind,
                    "seconds": round(time.time() - t0, 2)}))
  return 0

"""`cirjax convert`: PyTorch checkpoints (HF, LAVIS) -> cirjax directories, and back to HF."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cirjax.commands.data import positive_float, positive_int
from cirjax import console
from cirjax.errors import UsageError

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
      -> cirjax directory. A LAVIS training-runner checkpoint (checkpoint_best.pth: only the
      trained parameters, no frozen ViT) needs --base, the pretrained state dict the run
      started from, for the tensors it lacks.
  A Hugging Face hub id ORG/NAME[@REVISION] (when no such local path exists)
      -> fetched into the HF cache (HF_HUB_CACHE / HF_HOME; HF_HUB_OFFLINE=1: cache only),
         then converted as the HF directory it is.
  cirjax directory -> HF directory (safetensors + config.json) that transformers'
      from_pretrained loads (BLIP-2: EVA towers only; LLaVA: the hub layout).

`.bin`/`.pt`/`.pth` pickles are read with torch.load(weights_only=True): a pickle that would
run code is refused, never executed. Output goes to a temporary directory next to DST that
is renamed into place at the end: a failure leaves no partial output, and an existing DST
is never touched (unless --overwrite, and then only once the new one is complete).
Tokenizer files found beside the source (vocab.txt, tokenizer.json, ...) are copied along.

Examples:
  cirjax convert hf/blip2-itm-vit-g ckpt/blip2-itm
  cirjax convert Salesforce/blip2-itm-vit-g ckpt/blip2-itm        # hub id
  cirjax convert qure_cirr/model.pth ckpt/qure-cirr
  cirjax convert run/checkpoint_best.pth ckpt/run --base blip2_pretrained_vitL.pth
  cirjax convert ckpt/qure-trained out/qure-hf            # back to HF
  cirjax convert hf/llava-phi-3-mini-hf ckpt/llava-phi3
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", help="HF directory, LAVIS .pth/.pt/.bin file, cirjax directory, or "
                 "Hugging Face hub id ORG/NAME[@REVISION]")
  p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing DST (only after the new output is complete)")
  p.add_argument("--vision-heads", type=positive_int, default=None,
                 help="LAVIS only: ViT attention heads, if not a released tower (default: "
                 "16 for EVA-g 1408 and CLIP-L 1024, else width/64)")
  p.add_argument("--qformer-heads", type=positive_int, default=None,
                 help="LAVIS only: Q-Former heads (default: 12 for 768 wide, else width/64)")
  p.add_argument("--base", default=None,
                 help="LAVIS only: the full pretrained state dict a training-runner checkpoint "
                 "started from; fills the (frozen) parameters SRC lacks")
  p.add_argument("--max-shard-gb", type=positive_float, default=5.0,
                 help="to HF: largest safetensors shard in GiB (default 5)")


def _log(msg: str) -> None:
  console.log(msg, tag="convert")


def to_cirjax(src: Path, dst: Path, *, overwrite: bool = False, vision_heads=None,
              qformer_heads=None, base=None, source: str | None = None) -> tuple[str, dict]:
  """Converts an HF dir or LAVIS file (with `base`, a runner checkpoint on its pretrained
  state dict) into a cirjax dir; returns (model_type, config dict). `source`: what to record
  as where it came from (default: `src`'s absolute path)."""
  # On use, so that `cirjax --help` stays free of jax and the models (see cirjax.commands).
  import jax  # pylint: disable=g-import-not-at-top
  from cirjax.convert import registry  # pylint: disable=g-import-not-at-top
  family, kind = registry.sniff(src)
  if base is not None and kind != "lavis":
    raise UsageError(f"--base {base}: only for a LAVIS state-dict SRC (a training-runner "
                     f"checkpoint); {src} is a {kind} model")
  lavis = dict(vision_heads=vision_heads, qformer_heads=qformer_heads) if kind == "lavis" else {}
  if base is not None:
    lavis["base"] = base
  _log(f"reading {'LAVIS' if lavis else 'HF'} {family} checkpoint {src}")
  t0 = time.time()
  loaded = registry.load(src, **lavis)
  n = sum(int(x.size) for x in jax.tree.leaves(loaded.params))
  _log(f"converted {n / 1e6:.1f}M parameters in {time.time() - t0:.1f}s; writing {dst}")
  registry.save(dst, family, loaded.config, loaded.params, overwrite=overwrite,
                tokenizer_dir=src if src.is_dir() else src.parent,
                extra={"source": source or str(Path(src).absolute()), "source_format": kind,
                       **({"base": str(Path(base).absolute())} if base is not None else {})})
  return family, loaded.config.to_dict()


def to_hf(src: Path, dst: Path, *, overwrite: bool = False,
          max_shard_bytes: int = 5 * 1024 ** 3) -> str:
  """Exports a cirjax dir to an HF directory; returns the model type."""
  from cirjax.convert import registry  # pylint: disable=g-import-not-at-top  # as to_cirjax
  loaded = registry.load(src)
  _log(f"read cirjax {loaded.family} model {src}; writing {dst}")
  registry.export_hf(dst, loaded.family, loaded.config, loaded.params, overwrite=overwrite,
                     tokenizer_dir=src, max_shard_bytes=max_shard_bytes)
  return loaded.family


def run(args: argparse.Namespace) -> int:
  from cirjax.convert import hub, registry  # pylint: disable=g-import-not-at-top  # as to_cirjax
  dst = Path(args.dst)
  t0 = time.time()
  if dst.exists() and not args.overwrite:  # before a hub id is fetched
    raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
  src = hub.resolve(args.src)
  commit = hub.revision_of(src) if not Path(args.src).expanduser().exists() else None
  source = f"{args.src.split('@')[0]}@{commit}" if commit else None  # hub id: pin the commit
  if dst.absolute() == src.absolute():
    raise UsageError("SRC and DST are the same path")
  if registry.sniff(src)[1] == "cirjax":
    if args.base is not None:
      raise UsageError("--base is for converting a LAVIS training-runner checkpoint, not for "
                       "exporting a cirjax directory")
    model_type = to_hf(src, dst, overwrite=args.overwrite,
                       max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    kind = "HF"
  else:
    model_type, _ = to_cirjax(src, dst, overwrite=args.overwrite,
                              vision_heads=args.vision_heads, qformer_heads=args.qformer_heads,
                              base=args.base, source=source)
    kind = "cirjax"
  print(json.dumps({"src": args.src, **({"resolved": str(src)} if source else {}),
                    "dst": str(dst), "model_type": model_type, "format": kind,
                    "seconds": round(time.time() - t0, 2)}))
  return 0

"""`cirjax parity`: stage-by-stage numerical parity of a conversion against PyTorch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cirjax.commands.data import positive_int
from cirjax.commands.flags import add_renamed
from cirjax.errors import UsageError

HELP = "check a converted model against its PyTorch checkpoint, stage by stage"
DESCRIPTION = """\
Loads a PyTorch checkpoint (an HF directory, or a LAVIS BLIP-2 .pth) into the transformers
reference modules and its cirjax conversion (--converted DIR, else converted in memory now),
runs the same random inputs through both in fp32 with matmul precision 'highest', prints a
table of max abs / max rel error per stage, and exits 1 if any stage is above the
whole-model tolerance (1e-4 relative; not adjustable; docs/reference_semantics.md#parity).

BLIP-2 stages: vision features, Q-Former query outputs, target features, text feature,
joint (query + text) Q-Former outputs, composed query, scores.
LLaVA checkpoints (config.json model_type 'llava') are checked by
cirjax.convert.llava_parity.run_parity.

Exit status: 0 all stages within tolerance, 1 a stage above it, 2 the check could not run.

Examples:
  cirjax parity hf/blip2-itm-vit-g
  cirjax parity hf/blip2-itm-vit-g --converted ckpt/blip2-itm
  cirjax parity qure_cirr/model.pth --converted ckpt/qure-cirr --json parity.json
"""

ERROR_EXIT = 2  # the check could not run (1 means a stage above tolerance)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("path", help="the PyTorch checkpoint: HF directory, LAVIS BLIP-2 file or "
                 "Hugging Face hub id ORG/NAME[@REVISION]")
  p.add_argument("--converted", default=None,
                 help="cirjax directory converted from PATH (default: convert in memory)")
  add_renamed(p, "--batch-size", "--batch", type=positive_int, default=2,
              help="random inputs per run (default 2)")
  add_renamed(p, "--max-length", "--text-len", type=positive_int, default=12,
              help="token ids per text; rows after the first are padded (default 12)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
  p.add_argument("--vision-heads", type=positive_int, default=None,
                 help="LAVIS only: ViT heads (default: from --converted, else as convert)")
  p.add_argument("--qformer-heads", type=positive_int, default=None,
                 help="LAVIS only: Q-Former heads (default: from --converted, else as convert)")
  p.add_argument("--json", default=None, help="also write the rows as JSON to this file")


def run(args: argparse.Namespace) -> int:
  # On use, so that `cirjax --help` stays free of jax and the models (see cirjax.commands).
  from cirjax.convert import hub, parity, registry  # pylint: disable=g-import-not-at-top
  from cirjax.convert import blip2_parity, llava_parity  # pylint: disable=g-import-not-at-top
  path = hub.resolve(args.path)  # a hub id: its snapshot in the HF cache
  t0 = time.time()
  model_type, kind = registry.sniff(path)
  if kind == "cirjax":
    raise UsageError(f"{path} is a cirjax directory: pass the PyTorch checkpoint as PATH and "
                     f"this directory as --converted")
  print(f"[parity] {model_type}: {path} vs {args.converted or 'in-memory conversion'} "
        f"(batch {args.batch_size}, fp32, matmul precision highest)", file=sys.stderr, flush=True)
  if model_type == "llava":
    rows = llava_parity.run_parity(path, converted=args.converted, batch=args.batch_size,
                                   seed=args.seed)
  else:
    rows = blip2_parity.run_parity(path, converted=args.converted, batch=args.batch_size,
                                   text_len=args.max_length, seed=args.seed,
                                   vision_heads=args.vision_heads,
                                   qformer_heads=args.qformer_heads)
  rows = [r if isinstance(r, parity.ParityRow) else parity.ParityRow(*r) for r in rows]
  print(parity.format_table(rows))
  ok = all(r.ok for r in rows)
  print(f"{'PASS' if ok else 'FAIL'}: {sum(r.ok for r in rows)}/{len(rows)} stages within "
        f"tolerance ({time.time() - t0:.1f}s)")
  if args.json:
    Path(args.json).write_text(json.dumps([r._asdict() for r in rows], indent=2) + "\n")
  return 0 if ok else 1

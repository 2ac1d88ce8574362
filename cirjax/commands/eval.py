"""`cirjax eval`: score a model (or a random/oracle baseline) on a CIR benchmark."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cirjax.commands.flags import add_renamed
from cirjax.commands.data import (add_source_args, check_output, fashioniq_splits,
                                  positive_int, read_split_from_args)
from cirjax.data import genecis
from cirjax.data.records import DataError
from cirjax.errors import CirjaxError
from cirjax.eval import encoders, evaluate, retrieval, submission
from cirjax.train import workdir

HELP = "evaluate a checkpoint or a baseline on FashionIQ, CIRR, CIRCO, GeneCIS, HP-FashionIQ or synthetic"
DESCRIPTION = """\
Evaluates composed image retrieval exactly as the benchmarks' reference code does, and prints
a metrics table with the chance level beside each metric.

  cirjax eval --dataset synthetic --root DATA --baseline random
  cirjax eval --dataset synthetic --root DATA --baseline oracle
  cirjax eval --dataset cirr --root CIRR --checkpoint MODEL_DIR --split val
  cirjax eval --dataset cirr --root CIRR --checkpoint MODEL_DIR --split test1 --submission-dir OUT
  cirjax eval --dataset fashioniq --root FIQ --checkpoint MODEL_DIR          (all 3 categories)
  cirjax eval --dataset circo --root CIRCO --checkpoint MODEL_DIR --split test --submission-dir OUT
  cirjax eval --dataset cirr --tfds-dir TFDS_DIR --checkpoint MODEL_DIR    (a `cirjax data tfds` build)

--checkpoint takes a cirjax/HF BLIP-2 (QuRe) or LLaVA-Phi (InstructCIR, scored with the
paper's zero-shot prompts) model directory, a LAVIS BLIP-2 .pth, or a training workdir: its
exported model, or its latest checkpoint when the run exported none (the model is rebuilt
from the run's config.json).
The corpus is encoded in jitted batches sharded over all devices and its features stay there
(rows split); retrieval is a blocked matmul + top_k on device, and only the top-k lists reach
the host. Splits without ground truth (CIRR test1, CIRCO test) produce
submission files only. Counts of skipped images/queries (--skip-missing) are always shown.
"""

DATASETS = ("synthetic", "cirr", "fashioniq", "circo", "genecis", "hpfashioniq")


def add_encoder_args(parser: argparse.ArgumentParser) -> None:
  """The encoding options of every command that encodes a split with a checkpoint (eval,
  mine): `cirjax.eval.encoders.EncodeOptions`."""
  parser.add_argument("--tokenizer", default=None,
                      help="vocab.txt or tokenizer dir (default: the checkpoint's, else the "
                      "dataset's vocab.txt)")
  parser.add_argument("--image-size", type=positive_int, default=None,
                      help="input resolution (default: from the model config, else 224)")
  parser.add_argument("--max-length", type=positive_int, default=32, help="text tokens (BLIP-2: 32)")
  parser.add_argument("--batch-size", type=positive_int, default=64, help="encoding batch (global)")
  parser.add_argument("--num-workers", type=positive_int, default=4, help="image loading threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dataset", required=True, choices=DATASETS)
  parser.add_argument("--root", default=None,
                      help="dataset root directory (or give --tfds-dir)")
  parser.add_argument("--tfds-dir", default=None,
                      help="read the split from a TFDS build (`cirjax data tfds`) in this data_dir")
  parser.add_argument("--split", default=None,
                      help="split (default val; FashionIQ: val/train/test = all three "
                      "categories, or CATEGORY.SPLIT; GeneCIS: the task, required; CIRR test: "
                      "test1)")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="model directory, LAVIS .pth, training workdir "
                   "(its export, else its latest checkpoint) or Hugging Face hub id "
                   "ORG/NAME[@REVISION]")
  src.add_argument("--baseline", choices=("random", "oracle"),
                   help="score a uniformly random model (chance) or the ground truth (1.0)")
  parser.add_argument("--transform", default=None, choices=("targetpad", "squarepad", "clip"),
                      help="image preprocessing (default: targetpad, QuRe's 1.25 pad, for "
                      "BLIP-2; clip for LLaVA-Phi)")
  add_encoder_args(parser)
  parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
  add_source_args(parser)
  add_renamed(parser, "--json", "--out", dest="out", default=None,
              help="write metrics (and timings) as JSON to this file")
  parser.add_argument("--submission-dir", default=None,
                      help="write CIRR/CIRCO test-server submission files here")
  parser.add_argument("--name", default="cirjax", help="submission file name suffix")


def _splits(args) -> list[tuple[str, object, object]]:
  """[(label, CIRSplit, image source or None)]; FashionIQ's `val` = its three categories."""
  if (args.root is None) == (args.tfds_dir is None):
    # exit 1, as always (tests/test_tfds.py), though it is a usage error
    raise CirjaxError("give exactly one of --root (dataset on disk) or --tfds-dir (TFDS build)")
  if args.dataset == "fashioniq":
    names = fashioniq_splits(args.split)
  elif args.dataset == "genecis" and not args.split:
    raise DataError(f"GeneCIS has four tasks: choose one with --split ({', '.join(genecis.TASKS)})")
  else:
    names = [args.split]
  fiq_all = len(names) > 1
  out = []
  for n in names:
    if args.tfds_dir is not None:
      # The `tfds` extra is optional: only reading a TFDS build imports it.
      from cirjax.data import tfds_builders  # pylint: disable=g-import-not-at-top
      # TFDS split names cannot hold a dot: dress.val is the build's dress_val.
      s, source = tfds_builders.load_split(args.tfds_dir, args.dataset,
                                           (n or "val").replace(".", "_", 1))
    else:
      s = read_split_from_args(args, n)
      source = None
    out.append((s.split.split(".")[0] if fiq_all else s.name, s, source))
  return out


def run(args: argparse.Namespace) -> int:
  check_output(args.out, "--json")
  check_output(args.submission_dir, "--submission-dir", directory=True)
  t0 = time.time()
  splits = _splits(args)
  mesh = retrieval.make_mesh()
  desc = ", ".join(f"{s.name} ({len(s.queries)} queries, {len(s.corpus)} images)"
                   for _, s, _ in splits)
  print(f"[eval] {desc}; {mesh.devices.size} device(s)", flush=True)
  model = None
  source = f"baseline:{args.baseline}" if args.baseline else None
  options = encoders.EncodeOptions.from_args(args)
  if args.checkpoint:
    model = workdir.load_model(args.checkpoint)
    source = model.source
  results, report = {}, {"dataset": args.dataset, "source": source, "splits": {}}
  for label, split, image_source in splits:
    if model is not None:
      scorer, timings = encoders.encode(model, split, options, root=args.root, mesh=mesh,
                                        image_source=image_source)
    else:
      scorer, timings = evaluate.baseline_scorer(args.baseline, split, args.seed), {}
    res = evaluate.evaluate_split(split, scorer, mesh)
    res.timings.update(timings)
    results[label] = res
    if res.metrics and any(not k.startswith("skipped/") for k in res.metrics):
      print(evaluate.format_table(res), flush=True)
    else:
      print(f"[eval] {split.name}: no ground truth; rankings computed for submission files")
    report["splits"][split.name] = {"metrics": res.metrics, "chance": res.chance,
                                    "timings": res.timings, "queries": len(split.queries),
                                    "corpus": len(split.corpus), "skipped": split.skipped}
    if args.submission_dir:
      if split.dataset in ("cirr", "synthetic"):
        for p in submission.write_cirr_submission(res, args.submission_dir,
                                                  f"{args.name}_{split.split}"):
          print(f"[eval] wrote {p}")
      elif split.dataset == "circo":
        p = submission.write_circo_submission(
            res, Path(args.submission_dir) / f"circo_{split.split}_{args.name}.json")
        print(f"[eval] wrote {p}")
      else:
        print(f"[eval] {split.dataset} has no test-server format; no submission written")
  if args.dataset == "fashioniq" and len(results) > 1 and all(
      r.split.has_targets for r in results.values()):
    combined = evaluate.evaluate_fashioniq(results)
    report["fashioniq"] = combined
    print("FashionIQ (QuRe Table 2 layout)")
    for k, v in combined.items():
      print(f"  {k:<12} {v:8.2f}")
  report["elapsed_s"] = time.time() - t0
  if args.out:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"[eval] wrote {out}")
  print(f"[eval] done in {report['elapsed_s']:.1f}s")
  return 0

"""`cirjax data`: generate the synthetic benchmark, check a dataset, build TFDS datasets."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cirjax.commands.flags import add_renamed
from cirjax.errors import CirjaxError, UsageError

HELP = "make the synthetic CIR benchmark, check a dataset on disk, build TFDS datasets"
DESCRIPTION = """\
Datasets for composed image retrieval.

  cirjax data synth --out DIR [--seed 0] [--num-images 1500 --num-val-images 1000 ...]
      Renders the synthetic benchmark (CIRR layout + full relevant sets + vocab.txt).
  cirjax data check --dataset cirr --root DIR [--split val]
      Reads a dataset with cirjax's validating reader, decodes every image it uses and
      prints its statistics (undecodable files are named; --skip-missing drops and counts
      missing and undecodable images).
  cirjax data check --dataset instructcir --root pairs.jsonl [--image-root DIR]
      Reads an InstructCIR JSON-lines file (stage-1 caption pairs or stage-2 triplets) with
      the training reader and decodes every image it names.
  cirjax data tfds --dataset synthetic --root DIR --data-dir OUT
      Builds the TFDS (array_record) version of a dataset for tfds.data_source / grain.
"""

DATASETS = ("synthetic", "cirr", "fashioniq", "circo", "genecis", "hpfashioniq")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
  p = sub.add_parser("synth", help="generate the synthetic benchmark")
  p.add_argument("--out", required=True, help="output directory (created)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--resolution", type=positive_int, default=64,
                 help="image side in pixels (default 64)")
  p.add_argument("--num-images", type=int, default=1500, help="train corpus images")
  p.add_argument("--num-val-images", type=int, default=1000)
  p.add_argument("--num-test-images", type=int, default=500)
  p.add_argument("--num-triplets", type=int, default=4000, help="train triplets")
  p.add_argument("--num-val-queries", type=int, default=1000)
  p.add_argument("--num-test-queries", type=int, default=500)
  p.add_argument("--max-duplicates", type=positive_int, default=6,
                 help="images per attribute combination are uniform in MIN..N (default 6)")
  p.add_argument("--min-duplicates", type=positive_int, default=1,
                 help="the least images per attribute combination (default 1); more means "
                      "more false negatives per query")
  p.add_argument("--force", action="store_true", help="write into a non-empty directory")

  c = sub.add_parser("check", help="read and validate a dataset, decode every image, print "
                     "statistics")
  _dataset_args(c, DATASETS + ("instructcir",))
  c.add_argument("--image-root", default=None,
                 help="InstructCIR: the directory the records' images are relative to "
                 "(default: the directory of the --root file)")
  c.add_argument("--no-decode", action="store_true",
                 help="only check that image files exist (skip decoding them)")
  add_renamed(c, "--num-workers", "--workers", type=positive_int, default=None,
              help="threads decoding images (default: 2 x cores, at most 16)")

  t = sub.add_parser("tfds", help="build a TFDS (array_record) dataset of every split found")
  t.add_argument("--dataset", required=True, choices=DATASETS)
  t.add_argument("--root", required=True, help="dataset root (TFDS's manual_dir)")
  t.add_argument("--data-dir", required=True, help="TFDS data_dir to write into")
  t.add_argument("--fashioniq-root", default=None,
                 help="HP-FashionIQ: the FashionIQ root, when --root is the hpfiq.json file")
  for dest, (flag, _) in _TFDS_REFUSED.items():  # refused by name, never ignored
    t.add_argument(flag, dest=dest, nargs="?", const=True, default=None, help=argparse.SUPPRESS)


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (a zero batch size or k is a usage error, exit 2)."""
  try:
    n = int(text)
  except ValueError:
    n = 0
  if n < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
  return n


def non_negative_int(text: str) -> int:
  """argparse type: an integer >= 0."""
  try:
    n = int(text)
  except ValueError:
    n = -1
  if n < 0:
    raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
  return n


def check_output(path, flag: str, directory: bool = False) -> None:
  """Refuses, before any work, an output path that cannot be written: a file where a
  directory is needed (the path itself, or one of its parents) or a directory where a file
  is."""
  if path is None:
    return
  p = Path(path).absolute()
  if p.exists() and p.is_dir() != directory:
    raise UsageError(f"{flag} {path} is a {'file' if directory else 'directory'}, expected a "
                     f"{'directory' if directory else 'file'}")
  for parent in p.parents:
    if parent.exists():
      if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is a file, not a directory")
      break


def positive_float(text: str) -> float:
  """argparse type: a number > 0."""
  try:
    x = float(text)
  except ValueError:
    x = 0.0
  if not x > 0:
    raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
  return x


def _dataset_args(p: argparse.ArgumentParser, datasets=DATASETS) -> None:
  p.add_argument("--dataset", required=True, choices=datasets)
  p.add_argument("--root", required=True, help="dataset root (InstructCIR: the JSON-lines "
                 "file of caption pairs or triplets)")
  p.add_argument("--split", default=None, help="split (default: val; GeneCIS: the task, required; "
                 "FashionIQ: CATEGORY.SPLIT, e.g. dress.val)")
  add_source_args(p)


def add_source_args(p: argparse.ArgumentParser) -> None:
  """Where a dataset's parts are, beyond --root (shared by data check/tfds and eval)."""
  p.add_argument("--hp-file", default=None,
                 help="HP-FashionIQ: the released hpfiq.json (default: ROOT/hpfiq.json or "
                 "ROOT/HP_FashionIQ/hpfiq.json, with --root the FashionIQ root)")
  p.add_argument("--fashioniq-root", default=None,
                 help="HP-FashionIQ: the FashionIQ root, when --root is the hpfiq.json file")
  p.add_argument("--layout", default=None,
                 help="CIRR: force a folder layout (flat, release, clip4cir, clip4cir_raw; "
                 "default: detected, docs/data.md)")
  p.add_argument("--vg-root", default=None,
                 help="GeneCIS attribute tasks: the Visual Genome images (default ROOT/VG_100K)")
  p.add_argument("--coco-root", default=None,
                 help="GeneCIS object tasks: the COCO val2017 images (default ROOT/val2017)")
  p.add_argument("--skip-missing", action="store_true",
                 help="drop queries/images whose files are missing (or, for data check, "
                 "undecodable) and count them")


def read_split_from_args(args: argparse.Namespace, split: str | None):
  """`read_split` with the options `add_source_args` defines."""
  return read_split(args.dataset, args.root, split, args.skip_missing, args.fashioniq_root,
                    args.hp_file, args.layout, args.vg_root, args.coco_root)


def read_split(dataset: str, root: str, split: str | None, skip_missing: bool = False,
               fashioniq_root: str | None = None, hp_file: str | None = None,
               layout: str | None = None, vg_root: str | None = None,
               coco_root: str | None = None):
  """One reader entry point for the CLI commands (data, eval, search)."""
  # `cirjax --help` imports every command module: the readers (numpy, PIL) load on use.
  from cirjax import data  # pylint: disable=g-import-not-at-top
  from cirjax.data import synth  # pylint: disable=g-import-not-at-top
  on_missing = "skip" if skip_missing else "error"
  if dataset == "synthetic":
    return synth.read_synthetic(root, split or "val", on_missing=on_missing)
  if dataset == "cirr":
    return data.read_cirr(root, split or "val", on_missing=on_missing, layout=layout)
  if dataset == "circo":
    return data.read_circo(root, split or "val", on_missing=on_missing)
  if dataset == "fashioniq":
    cat, dot, sp = (split or "").partition(".")
    if not dot:
      raise data.DataError(f"FashionIQ: this needs one category and split, e.g. --split "
                           f"dress.val (got {split!r})")
    return data.read_fashioniq(root, cat, sp, on_missing=on_missing)
  if dataset == "genecis":
    if not split:
      raise data.DataError("GeneCIS has four tasks: choose one with --split "
                           f"({', '.join(data.genecis.TASKS)})")
    return data.read_genecis(root, split, vg_root=vg_root, coco_root=coco_root,
                             on_missing=on_missing)
  if dataset == "hpfashioniq":
    return data.read_hpfashioniq(hp_file or root, fashioniq_root or (root if hp_file else None),
                                 on_missing=on_missing)
  raise UsageError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def fashioniq_splits(split: str | None) -> list[str]:
  """FashionIQ's one meaning of `--split` for every command: `val` (the default), `train` or
  `test` = all three categories; `dress.val` = one category."""
  from cirjax.data import fashioniq  # pylint: disable=g-import-not-at-top  (fast --help)
  split = split or "val"
  if "." in split:
    return [split]
  if split not in fashioniq.SPLITS:
    raise fashioniq.DataError(f"FashionIQ --split must be one of {fashioniq.SPLITS} (all three "
                              f"categories) or CATEGORY.SPLIT (e.g. dress.val), got {split!r}")
  return [f"{c}.{split}" for c in fashioniq.CATEGORIES]


def check_instructcir(args) -> dict:
  """`data check --dataset instructcir`: an InstructCIR JSON-lines file (stage-1 caption pairs,
  or stage-2 triplets when its first record has an "instruction"), read with the training
  reader, every image decoded; its statistics."""
  # `cirjax --help` imports every command module: the readers (numpy, PIL) load on use.
  from cirjax.data import images, instructcir, records  # pylint: disable=g-import-not-at-top
  for flag, dest in (("--split", "split"), ("--layout", "layout"), ("--hp-file", "hp_file")):
    if getattr(args, dest, None) is not None:
      raise UsageError(f"{flag}: an InstructCIR file has no {dest.replace('_', ' ')}; give the "
                       "file as --root (and --image-root)")
  path = Path(args.root)
  first = next(iter(records.load_jsonl(path, "InstructCIR records")), {})
  triplets = isinstance(first, dict) and "instruction" in first
  read = instructcir.read_instruct_triplets if triplets else instructcir.read_caption_pairs
  image_root = Path(args.image_root) if args.image_root else path.parent
  items, skipped = read(path, image_root, "skip" if args.skip_missing else "error")
  paths = sorted({str(x.image) for x in items})
  undecodable = 0
  if not args.no_decode:
    errs = images.decode_errors(paths, args.num_workers, f"decoding {path.name}")
    bad = {p: e for p, e in zip(paths, errs) if e is not None}
    if bad and not args.skip_missing:
      listed = "\n".join(f"  {p}: {e}" for p, e in sorted(bad.items())[:10])
      raise records.DataError(f"{path}: {len(bad)} image file(s) cannot be decoded:\n{listed}\n"
                              "(pass --skip-missing to drop them and count them)")
    undecodable = len(bad)
    items = [x for x in items if str(x.image) not in bad]
  return {"dataset": "instructcir", "file": str(path), "image_root": str(image_root),
          "kind": "triplets (stage 2)" if triplets else "caption pairs (stage 1)",
          "records": len(items), "images": len({str(x.image) for x in items}),
          "skipped": {"missing_images": skipped, "undecodable_images": undecodable}}


def _stats(s) -> dict:
  rel = [len(q.relevant) for q in s.queries if q.relevant]
  return {"split": s.name, "queries": len(s.queries), "corpus_images": len(s.corpus),
          "known_images": len(s.images), "with_target": sum(q.target is not None
                                                          for q in s.queries),
          "mean_relevant": (sum(rel) / len(rel)) if rel else None, "skipped": s.skipped}


def run(args: argparse.Namespace) -> int:
  # `cirjax --help` imports every command module: the readers (numpy, PIL) load on use.
  from cirjax.data import images  # pylint: disable=g-import-not-at-top
  if args.data_command is None:
    print(DESCRIPTION)
    return 2
  if args.data_command == "synth":
    return _synth(args)
  if args.data_command == "check" and args.dataset == "instructcir":
    print(json.dumps(check_instructcir(args), indent=2))
    return 0
  if args.data_command == "check":
    names = (fashioniq_splits(args.split) if args.dataset == "fashioniq" else [args.split])
    stats = []
    for name in names:
      s = read_split_from_args(args, name)
      if not args.no_decode:
        s = images.check_images_decode(s, "skip" if args.skip_missing else "error",
                                       workers=args.num_workers, progress=True)
      stats.append(_stats(s))
    if len(stats) == 1:
      print(json.dumps(stats[0], indent=2))
    else:
      total = {k: sum(st[k] for st in stats) for k in ("queries", "corpus_images")}
      print(json.dumps({"splits": stats, "total": total}, indent=2))
    return 0
  if args.data_command == "tfds":
    _refuse_tfds_options(args)
    # The `tfds` extra is optional: only `data tfds` (and `eval --tfds-dir`) import it.
    from cirjax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    tfds_builders.require()
    splits = tfds_builders.available_splits(args.dataset, args.root)
    print(f"[tfds] building {tfds_builders.BUILDERS[args.dataset]} (queries + images) for "
          f"splits {', '.join(splits)} into {args.data_dir}", flush=True)
    path = tfds_builders.build(args.dataset, args.root, args.data_dir,
                               fashioniq_root=args.fashioniq_root)
    print(f"wrote {path}; read it with cirjax.data.tfds_builders.load_split"
          f"(data_dir, {args.dataset!r}, SPLIT) or tfds.data_source")
    return 0
  return 2


# The `data synth` flag of each SynthConfig field (per split for the sizes), for its errors.
_SYNTH_FLAGS = {"num_images": ("--num-images", "--num-val-images", "--num-test-images"),
                "num_queries": ("--num-triplets", "--num-val-queries", "--num-test-queries")}


def _synth_flag(field: str, split: int | None = None) -> str:
  if field in _SYNTH_FLAGS:
    return _SYNTH_FLAGS[field][split]
  return "--" + field.replace("_", "-")


# Options `data tfds` shares with `data check` but cannot honour, and why.
_TFDS_REFUSED = {
    "split": ("--split", "a build holds every split found under --root; choose one when "
              "reading it (cirjax eval --tfds-dir DIR --split S)"),
    "layout": ("--layout", "the build reads CIRR in its detected layout"),
    "skip_missing": ("--skip-missing", "a build needs every image (list the missing ones "
                     "with cirjax data check --skip-missing)"),
    "hp_file": ("--hp-file", "the build reads HP-FashionIQ from --root (the hpfiq.json file or "
                "its directory) with --fashioniq-root"),
    "vg_root": ("--vg-root", "the build reads GeneCIS images from ROOT/VG_100K"),
    "coco_root": ("--coco-root", "the build reads GeneCIS images from ROOT/val2017"),
}


def _refuse_tfds_options(args) -> None:
  """A usage error naming every given option `data tfds` does not take (none is ignored)."""
  given = [f"{flag}: {why}" for dest, (flag, why) in _TFDS_REFUSED.items()
           if getattr(args, dest, None) not in (None, False)]
  if given:
    raise UsageError("data tfds does not take " + "; ".join(given))


def _synth(args) -> int:
  # `cirjax --help` imports every command module: the readers (numpy, PIL) load on use.
  from cirjax.data import synth  # pylint: disable=g-import-not-at-top
  out = Path(args.out)
  if out.exists() and not out.is_dir():
    raise CirjaxError(f"--out {out} is a file, not a directory")
  if out.exists() and any(out.iterdir()) and not args.force:
    raise CirjaxError(f"{out} is not empty (pass --force to write into it)")
  cfg = synth.SynthConfig(
      seed=args.seed, resolution=args.resolution,
      num_images=(args.num_images, args.num_val_images, args.num_test_images),
      num_queries=(args.num_triplets, args.num_val_queries, args.num_test_queries),
      max_duplicates=args.max_duplicates, min_duplicates=args.min_duplicates)
  t0 = time.time()
  summary = synth.generate(out, cfg, progress=lambda s: print(s, flush=True), key=_synth_flag)
  print(f"[synth] done in {time.time() - t0:.1f}s: {out}")
  for split, st in summary["splits"].items():
    print(f"  {split:6s} {st['images']:6d} images  {st['queries']:6d} queries  "
          f"relevant/query {st['mean_relevant']:.2f} (min {st['min_relevant']}, "
          f"max {st['max_relevant']})")
  return 0

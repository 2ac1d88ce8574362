"""`cirjax search`: top-k images for one (reference image, text) query, printed and as HTML."""

from __future__ import annotations

import argparse
from pathlib import Path

from cirjax import search as search_lib
from cirjax.commands.data import check_output, positive_int, read_split
from cirjax.data import loader
from cirjax.data.records import DataError
from cirjax.errors import UsageError
from cirjax.eval import encoders, retrieval
from cirjax.train import workdir

HELP = "search a corpus with a reference image + text; print the top k and write an HTML page"

DESCRIPTION = """\
Composed image search with a BLIP-2 (QuRe) or LLaVA-Phi (InstructCIR: the zero-shot prompts
of the split's dataset, CIRR's for a plain --corpus) checkpoint: any --checkpoint `cirjax
eval` takes.

  cirjax search --checkpoint MODEL --corpus IMAGES_DIR --reference ref.png --text "make it red"
  cirjax search --checkpoint MODEL --dataset synthetic --root DATA --split val --query-id 5040
  cirjax search --checkpoint MODEL --dataset cirr --root CIRR --reference dev-1-0-img0 --text "..."

With --dataset/--root the corpus is that split's evaluation corpus and --reference may be an
image name of the split; --query-id takes reference, text and the known relevant images from
the annotations, so the page frames relevant results in green. The reference is never
returned as a result when it is part of the corpus. --features-cache FILE.npz keeps the corpus
features between runs (re-encoded when the model, preprocessing or file list changes).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True,
                      help="model directory, LAVIS .pth, training workdir or Hugging Face hub "
                      "id (see cirjax eval)")
  parser.add_argument("--corpus", default=None, help="directory of corpus images")
  parser.add_argument("--dataset", default=None,
                      choices=("synthetic", "cirr", "fashioniq", "circo"),
                      help="use a dataset split as the corpus instead of --corpus")
  parser.add_argument("--root", default=None, help="dataset root (with --dataset)")
  parser.add_argument("--split", default=None, help="dataset split (default val)")
  parser.add_argument("--query-id", default=None, help="a query of the split (with --dataset)")
  parser.add_argument("--reference", default=None, help="reference image file (or split name)")
  parser.add_argument("--text", default=None, help="modification text")
  parser.add_argument("--relevant", default="",
                      help="comma-separated corpus names known to be relevant (marked on the page)")
  parser.add_argument("--k", type=positive_int, default=10, help="results to show (default 10)")
  parser.add_argument("--html", default="search.html", help="HTML page to write")
  parser.add_argument("--features-cache", default=None, help=".npz file for corpus features")
  parser.add_argument("--tokenizer", default=None, help="vocab.txt or tokenizer dir")
  parser.add_argument("--transform", default=None, choices=("targetpad", "squarepad", "clip"),
                      help="image preprocessing (default: the model family's: targetpad for "
                      "BLIP-2, clip for LLaVA-Phi)")
  parser.add_argument("--image-size", type=positive_int, default=None)
  parser.add_argument("--max-length", type=positive_int, default=32)
  parser.add_argument("--batch-size", type=positive_int, default=64)


def _query(args, split):
  """(reference path, text, relevant names, target name) from the arguments."""
  relevant = [r for r in args.relevant.split(",") if r]
  if args.query_id is not None:
    if split is None:
      raise UsageError("--query-id needs --dataset and --root")
    q = next((q for q in split.queries if q.query_id == str(args.query_id)), None)
    if q is None:
      raise DataError(f"{split.name}: no query with id {args.query_id!r} "
                      f"(ids run like {split.queries[0].query_id!r})")
    text = args.text or loader.default_text(q)
    return split.images[q.reference].path, text, list(q.relevant) + relevant, q.target
  if args.reference is None or args.text is None:
    raise UsageError("give --reference and --text (or --query-id with --dataset)")
  ref = Path(args.reference)
  if not ref.is_file():
    if split is not None and args.reference in split.images:
      ref = split.images[args.reference].path
    else:
      raise FileNotFoundError(f"reference image not found: {args.reference}")
  return ref, args.text, relevant, None


def run(args: argparse.Namespace) -> int:
  check_output(args.html, "--html")
  check_output(args.features_cache, "--features-cache")
  if (args.corpus is None) == (args.dataset is None):
    raise UsageError("give exactly one of --corpus DIR or --dataset NAME --root DIR")
  split = None
  if args.dataset is not None:
    if args.root is None:
      raise UsageError("--dataset needs --root")
    split = read_split(args.dataset, args.root, args.split)
    corpus = search_lib.corpus_from_split(split)
  else:
    corpus = search_lib.corpus_from_dir(args.corpus)
  reference, query_text, relevant, target = _query(args, split)
  model = workdir.load_model(args.checkpoint)
  enc = encoders.encoder(model, split, encoders.EncodeOptions.from_args(args), args.root)
  mesh = retrieval.make_mesh()
  print(f"[search] {len(corpus.names)} corpus images, model {model.source}", flush=True)
  feats = search_lib.encode_corpus(enc.fns, corpus, enc.transform, args.batch_size, mesh,
                                   args.features_cache, str(Path(model.source).resolve()))
  hits = search_lib.search(enc.fns, corpus, feats, reference, query_text, enc.transform,
                           enc.tokenize, args.k, relevant=relevant, target=target, mesh=mesh)
  print(f"query: {reference} + \"{query_text}\"")
  print(search_lib.format_hits(hits))
  known = len(set(relevant) | ({target} if target else set())) if (relevant or target) else None
  page = search_lib.write_html(args.html, reference, query_text, hits,
                               title=f"cirjax search: {Path(model.source).name}",
                               num_relevant=known)
  print(f"[search] wrote {page}")
  return 0

"""`cirjax eval`: score a model (or a random/oracle baseline) on a CIR benchmark."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cirjax.commands.flags import add_renamed
from cirjax.commands.data import (add_source_args, check_output, fashioniq_splits,
                                  positive_int, read_split_from_args)
import jax
import ml_collections
import numpy as np

from cirjax import lora as lora_lib
from cirjax.convert import hub, io, registry
from cirjax.data import genecis, images, loader, text
from cirjax.data.records import DataError
from cirjax.data.word_tokenizer import load_tokenizer
from cirjax.errors import CirjaxError
from cirjax.eval import encoders, evaluate, retrieval, submission
from cirjax.models import Model, llava
from cirjax.train import config_utils, instructcir, qure

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
  """The encoding options of every command that encodes a split with a checkpoint (eval, mine)."""
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


def model_from_checkpoint(ck: encoders.WorkdirCheckpoint) -> Model:
  """The model in a training workdir's latest checkpoint, built with the run's config (what
  the task's export would have written; `encoders.load_encoder`'s `from_checkpoint`)."""
  config = ml_collections.ConfigDict(ck.config)
  params = io.read_params(ck.step_dir / "state")
  if not isinstance(params, dict) or "params" not in params:
    raise CirjaxError(f"{ck.step_dir / 'state'}: holds no 'params' (not a cirjax training "
                      "checkpoint?)")
  params = jax.tree.map(np.asarray, params["params"])
  task, source = config.get("task"), str(ck.step_dir)
  if task == "qure":
    init = config_utils.model_init(config, check=False)
    if init:
      cfg = registry.load(init, family="blip2").config
    else:  # the Q-Former's vocabulary is the run's tokenizer's: read it off the embeddings
      vocab = params["embeddings"]["word_embeddings"].shape[0]
      cfg = qure.model_config(config.model, vocab)
    params = qure.blip2.unstack_layers(params, cfg)  # a scan_layers run's state is stacked
    vocab_src = qure.tokenizer_source(config)
    has_vocab = vocab_src and os.path.exists(os.path.expanduser(vocab_src))
    return Model("blip2", cfg, params, os.path.expanduser(vocab_src) if has_vocab else None,
                 source)
  if task == "instructcir":
    cfg_file = ck.workdir / instructcir.LLAVA_CONFIG_FILE
    if not cfg_file.is_file():
      raise CirjaxError(f"{ck.workdir}: an InstructCIR workdir without "
                        f"{instructcir.LLAVA_CONFIG_FILE}; export the model from the run")
    cfg = llava.LlavaConfig.from_dict(json.loads(cfg_file.read_text())).replace(dtype="float32")
    tok_dirs = [str(ck.workdir / instructcir.TOKENIZER_DIR), config.data.get("tokenizer"),
                config_utils.model_init(config, check=False)]
    # paths or hub ids; of data.tokenizer only the tokenizer files are fetched
    found = [hub.resolve(d, weights=i == 2) for i, d in enumerate(tok_dirs) if d]
    tok_dir = next((str(d) for d in found if d.is_dir()), None)
    if tok_dir is None:
      raise CirjaxError(f"{ck.workdir}: no tokenizer (looked in {', '.join(map(str, tok_dirs))})")
    params = {k: llava.unstack_layers(v, cfg) for k, v in params.items()}  # as above
    adapter = lora_lib.Adapter(params["lora"], instructcir.lora_config(config.lora))
    merged = jax.tree.map(np.asarray, lora_lib.merge(params["base"], adapter))
    return Model("llava", cfg, merged, load_tokenizer(os.path.expanduser(tok_dir)), source)
  raise CirjaxError(f"{ck.workdir / 'config.json'}: task {task!r}: cirjax rebuilds models of "
                    "'qure' and 'instructcir' runs only; export the model from the run")


def load_model(path) -> tuple[Model, Path]:
  """--checkpoint: `encoders.load_encoder`, or a training workdir's latest checkpoint when
  the run exported no model; returns (model, where it came from)."""
  ck = encoders.workdir_checkpoint(path)
  if ck is not None:
    return model_from_checkpoint(ck), ck.step_dir
  return encoders.load_encoder(path)


def tokenizer_source(args, model: Model, model_dir) -> str:
  """--tokenizer, else a checkpoint's run's vocab, else the model's, else the dataset's."""
  if args.tokenizer:
    return str(hub.resolve(args.tokenizer, weights=False))
  if isinstance(model.tokenizer, str):
    return model.tokenizer
  return encoders.find_tokenizer_source(Path(model_dir), args.root)


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
  model = tokenize_fn = transform = None
  llava = False
  source = f"baseline:{args.baseline}" if args.baseline else None
  if args.checkpoint:
    model, model_dir = load_model(args.checkpoint)
    llava = model.family == "llava"
    source = str(model_dir)
    if llava:
      tok_src = f"{model_dir} (InstructCIR zero-shot prompts)"
    else:
      tok_src = tokenizer_source(args, model, model_dir)
      tokenizer = text.load_bert_tokenizer(tok_src)
      tokenize_fn = loader.bert_tokenize_fn(tokenizer, args.max_length)
      for _, s, _ in splits:  # a vocabulary built on other data turns words into [UNK]
        text.check_tokenizer_coverage(tokenizer, [loader.default_text(q) for q in s.queries],
                                      str(tok_src), f"the {s.name} queries")
    dim = args.image_size or encoders.model_image_size(model)
    transform = images.make_transform(args.transform or ("clip" if llava else "targetpad"), dim)
    print(f"[eval] model {model_dir}, tokenizer {tok_src}, images {transform.name} {dim}px",
          flush=True)
  results, report = {}, {"dataset": args.dataset, "source": source, "splits": {}}
  for label, split, image_source in splits:
    if model is not None:
      enc, tk, text_fn = encoders.retrieval_fns(model, split)
      scorer, timings = evaluate.encode_split(enc, split, transform, tk or tokenize_fn,
                                              args.batch_size,
                                              text_fn=text_fn, mesh=mesh,
                                              num_threads=args.num_workers,
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

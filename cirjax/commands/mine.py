"""`cirjax mine`: one QuRe mining of a split with any checkpoint, its statistics and figures."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cirjax import mining
from cirjax.commands.data import check_output, non_negative_int, positive_int, read_split
from cirjax.commands.eval import add_encoder_args
from cirjax.eval import encoders, retrieval
from cirjax.mining import audit as mining_audit
from cirjax.mining import plots as mining_plots
from cirjax.train import workdir

HELP = "mine hard negatives of a split with a checkpoint: statistics, false negatives, figures"
DESCRIPTION = """\
Encodes a split with a checkpoint (`cirjax eval`'s encoding, any --checkpoint it takes), mines every query's QuRe
hard-negative set over the split's corpus (target = the annotated one, as training mines CIRR
and the synthetic set), and, where every query's full relevant set is known (synthetic,
CIRCO), audits each strategy's negative pool: QuRe's set, top-k, after-target top-k and the
whole corpus -- the share of drawn negatives that are in fact relevant, the mean pool size,
and the share of queries whose pool holds a relevant image.

  cirjax mine --checkpoint WORKDIR --dataset synthetic --root DATA --out OUT
  cirjax mine --checkpoint MODEL --dataset synthetic --root DATA --split val --k 50 --out OUT

Writes OUT/mining.json and the figures OUT/set_sizes.png (QuRe Fig. 5), OUT/score_curves.png
(Figs. 7-8: sorted scores of a few queries with the target and the two gaps) and, with full
relevant sets, OUT/false_negatives.png.
"""

DATASETS = ("synthetic", "circo", "cirr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True,
                      help="model directory, LAVIS .pth, training workdir (its export, else "
                      "its latest checkpoint) or Hugging Face hub id ORG/NAME[@REVISION]")
  parser.add_argument("--dataset", required=True, choices=DATASETS)
  parser.add_argument("--root", required=True, help="dataset root directory")
  parser.add_argument("--split", default="train",
                      help="split to mine (default train, what training mines)")
  parser.add_argument("--out", required=True, help="directory for mining.json and the PNGs")
  parser.add_argument("--k", type=positive_int, default=100,
                      help="pool size of the top-k strategies (QuRe's ablation: 100)")
  parser.add_argument("--consecutive-threshold", type=non_negative_int, default=1,
                      help="QuRe's minimum distance between the two drops minus one "
                      "(reference 1; 0 = the paper's plain top-2)")
  parser.add_argument("--strict-below", action="store_true",
                      help="after-target list = scores strictly below the target (paper Eq. 5)")
  parser.add_argument("--plot-queries", type=positive_int, default=6,
                      help="queries drawn in score_curves.png")
  add_encoder_args(parser)


def run(args: argparse.Namespace) -> int:
  t0 = time.time()
  check_output(args.out, "--out", directory=True)
  split = read_split(args.dataset, args.root, args.split)
  print(f"[mine] {split.name}: {len(split.queries)} queries, {len(split.corpus)} images",
        flush=True)
  scorer, _ = encoders.encode(workdir.load_model(args.checkpoint), split,
                              encoders.EncodeOptions.from_args(args), root=args.root)
  full = args.dataset in mining_audit.FULL_RELEVANT_DATASETS
  res = mining_audit.audit_split(
      scorer, split, k=min(args.k, len(split.corpus) - 1),
      consecutive_threshold=args.consecutive_threshold, strict_below=args.strict_below,
      strategies=mining_audit.STRATEGIES if full else ("qure",))
  report = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "split": args.split,
            "queries": len(split.queries), "corpus": len(split.corpus), "k": args.k,
            "consecutive_threshold": args.consecutive_threshold,
            "strict_below": args.strict_below, **res.summary()}
  if not full:  # CIRR knows the target only: an audit would count no false negative
    del report["false_negatives"]
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  report["figures"] = write_figures(res, scorer, out, args.plot_queries, full)
  report["elapsed_s"] = time.time() - t0
  (out / "mining.json").write_text(json.dumps(report, indent=2))
  print(format_report(report))
  print(f"[mine] wrote {out / 'mining.json'} and {', '.join(report['figures'])}")
  return 0


def write_figures(res, scorer: retrieval.FeatureScorer, out: Path, n_queries: int,
                  full: bool) -> list[str]:
  """Fig. 5 (set sizes), Figs. 7-8 (score curves of the first queries with a set) and the
  false-negative bars."""
  files = []
  mining_plots.plot_set_size_histogram(res.stats, out / "set_sizes.png")
  files.append("set_sizes.png")
  have = np.flatnonzero(res.stats.set_size > 0)
  rows = (have if have.size else np.arange(res.stats.set_size.size))[:n_queries]
  if rows.size:
    sub = mining.MiningStats(**{f: getattr(res.stats, f)[rows]
                                for f in mining.MiningStats.__dataclass_fields__})
    mining_plots.plot_score_curves(
        mining_audit.score_rows(scorer, rows), res.target_index[rows], sub, range(rows.size),
        out / "score_curves.png", max_points=200,
        titles=[f"query {int(r)}" for r in rows])
    files.append("score_curves.png")
  if full:
    mining_plots.plot_false_negatives({s: a.summary() for s, a in res.audits.items()},
                                      out / "false_negatives.png")
    files.append("false_negatives.png")
  return files


def format_report(report: dict) -> str:
  m = report["mining"]
  lines = [f"QuRe sets: mean size {m['mean_set_size']:.1f}, median {m['median_set_size']:.0f}, "
           f"empty {m['empty']}/{m['num_queries']}"]
  if "false_negatives" in report:
    lines.append(f"{'strategy':<18} {'fn_share %':>10} {'pooled %':>9} {'pool':>8} "
                 f"{'queries w/ FN %':>15}")
    for s, v in report["false_negatives"].items():
      lines.append(f"{s:<18} {100 * v['fn_share']:>10.2f} {100 * v['fn_share_pooled']:>9.2f} "
                   f"{v['pool_size']:>8.1f} {100 * v['fn_queries']:>15.2f}")
  return "\n".join(lines)

"""`cirjax study`: QuRe's claim measured against ground truth on the synthetic set."""

from __future__ import annotations

import argparse
import sys

from cirjax.train.config_utils import ConfigError

HELP = "run the QuRe study (warm-up + five arms x seeds) and write its report"
DESCRIPTION = """\
Trains the study config's shared warm-up once, then each arm from it with every seed (same
budget), scores each final model against the full relevant sets (R@K, Recall_subset@1,
mAP@K, relevant share of the top 5, the synthetic preference rate of QuRe Eq. 9, and each
mining strategy's false negatives), and writes OUT/study.json, OUT/study.md and plots.
Finished runs in WORKDIR are reused, so an interrupted study continues where it stopped.

  cirjax study --config configs/study_qure_synthetic.py --workdir runs/study \\
      --out benchmarks/results/study_qure_synthetic
  cirjax study --config configs/study_qure_synthetic.py:quick --workdir /tmp/s --out /tmp/s/report
  cirjax study --config configs/study_qure_synthetic.py --workdir W --out O --arms pairwise_qure --seeds 0
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True,
                      help="study config, e.g. configs/study_qure_synthetic.py[:quick]")
  parser.add_argument("--workdir", required=True, help="one training workdir per run inside")
  parser.add_argument("--out", required=True, help="directory for study.json/.md and plots")
  parser.add_argument("--arms", default=None,
                      help="comma-separated subset of the config's arms (default: all)")
  parser.add_argument("--seeds", default=None,
                      help="comma-separated seeds (default: the config's, 0..N-1)")


def _ints(text: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
  # The study imports the trainer and the evaluator: loaded when the command runs.
  from cirjax import study  # pylint: disable=g-import-not-at-top
  from cirjax.data.records import DataError  # pylint: disable=g-import-not-at-top
  try:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    seeds = _ints(args.seeds) if args.seeds is not None else None
    study.run_study(args.config, args.workdir, args.out, arms=arms, seeds=seeds)
  except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0

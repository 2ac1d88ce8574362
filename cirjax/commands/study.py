"""`cirjax study`: QuRe's claims measured against ground truth on the synthetic set."""

from __future__ import annotations

import argparse

HELP = "run the QuRe study (warm-ups, tuned arms x paired replicates x densities) and report"
DESCRIPTION = """\
Per false-negative density of the study config: trains the warm-ups to a plateau, tunes
every arm's learning rate on validation, trains every arm from every warm-up with every
seed, scores each final model against the full relevant sets on test1, and writes
study.json, study.md and study_curves.png to OUT (default WORKDIR/report). A run is
finished when its result.json exists: rerunning the same command skips finished runs and
completes the rest. An OUT that already holds files is only written with --overwrite.

  cirjax study --config configs/study_qure_synthetic.py --workdir runs/study
  cirjax study --config configs/study_qure_synthetic.py:quick --workdir /tmp/s
  cirjax study --config configs/study_qure_synthetic.py:spotcheck,warmups=1,lrs=3e-5 \\
      --workdir runs/spot
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True,
                      help="study config, e.g. configs/study_qure_synthetic.py[:quick]")
  parser.add_argument("--workdir", required=True, help="one training workdir per run inside")
  parser.add_argument("--out", default=None,
                      help="report directory (default WORKDIR/report)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the files of a non-empty --out (e.g. the committed report)")
  parser.add_argument("--arms", default=None,
                      help="comma-separated subset of the config's arms (default: all)")
  parser.add_argument("--densities", default=None,
                      help="comma-separated subset of the config's densities (default: all)")


def _list(text: str | None) -> list[str] | None:
  return [x.strip() for x in text.split(",") if x.strip()] if text else None


def run(args: argparse.Namespace) -> int:
  # The study imports the trainer and the evaluator: loaded when the command runs.
  from cirjax import study  # pylint: disable=g-import-not-at-top
  study.run_study(args.config, args.workdir, args.out, overwrite=args.overwrite,
                  arms=_list(args.arms), densities=_list(args.densities))
  return 0

"""Test-server submission files in the official layouts.

* CIRR (CLIP4Cir/SPRC `generate_cirr_test_submissions`, evaluation server cirr.cecs.anu.edu.au):
  `recall_submission_<name>.json` = {"version": "rc2", "metric": "recall",
  "<pairid>": [top-50 image names, reference removed]} and
  `recall_subset_submission_<name>.json` = {"version": "rc2", "metric": "recall_subset",
  "<pairid>": [top-3 img_set members]}.
* CIRCO (miccunifi/CIRCO README): {"<query id>": [top-50 image ids]} for every test query.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cirjax.data.records import DataError
from cirjax.eval.evaluate import EvalResult


def write_cirr_submission(result: EvalResult, out_dir: str | os.PathLike, name: str
                          ) -> tuple[Path, Path]:
  split = result.split
  if split.dataset not in ("cirr", "synthetic"):
    raise ValueError(f"CIRR submissions need a CIRR-layout split, got {split.name}")
  if result.ranking is None or result.ranking.shape[1] < 50:
    raise DataError(f"{split.name}: a CIRR submission needs the top 50 per query; the corpus "
                    f"has {len(split.corpus)} images")
  if result.subset_ranking is None or result.subset_ranking.shape[1] < 3:
    raise ValueError("a CIRR submission needs the img_set ranking (top 3 per query)")
  corpus = np.asarray(split.corpus)
  sub = {"version": "rc2", "metric": "recall"}
  grp = {"version": "rc2", "metric": "recall_subset"}
  for i, q in enumerate(split.queries):
    sub[str(int(q.query_id))] = corpus[result.ranking[i, :50]].tolist()
    sub_row = result.subset_ranking[i]
    grp[str(int(q.query_id))] = corpus[sub_row[sub_row >= 0][:3]].tolist()
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  p1, p2 = out / f"recall_submission_{name}.json", out / f"recall_subset_submission_{name}.json"
  p1.write_text(json.dumps(sub))
  p2.write_text(json.dumps(grp))
  return p1, p2


def write_circo_submission(result: EvalResult, path: str | os.PathLike) -> Path:
  split = result.split
  if split.dataset != "circo":
    raise ValueError(f"CIRCO submissions need a CIRCO split, got {split.name}")
  if result.ranking is None or result.ranking.shape[1] < 50:
    raise DataError(f"{split.name}: a CIRCO submission needs the top 50 per query; the corpus "
                    f"has {len(split.corpus)} images")
  corpus = split.corpus
  sub = {str(q.query_id): [int(corpus[j]) for j in result.ranking[i, :50]]
         for i, q in enumerate(split.queries)}
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(sub))
  return path

"""HP-FashionIQ reader (QuRe §4): FashionIQ validation queries with two retrieved sets of
five images each and the set people preferred.

The QuRe authors' release format is not public in our sources, so cirjax reads one JSON list
(or JSON lines) with these keys per query, and documents it (docs/data.md):

```
{"id": "q17", "category": "shirt", "candidate": "B00...", "captions": ["...", "..."],
 "set1": [5 image names], "set2": [5 image names], "preferred": 1 or 2,
 "valid": true}        # optional; queries flagged invalid (307 + 28 in the paper) are skipped
```
Images are FashionIQ images (`FASHIONIQ_ROOT/images/<name>.png`). Invalid queries are not
evaluated and their number is reported (`CIRSplit.skipped["invalid"]`).
"""

from __future__ import annotations

import os
from pathlib import Path

from cirjax.data import fashioniq, records
from cirjax.data.records import CIRSplit, DataError, ImageRef, Query
from cirjax.data.text import fashioniq_caption


def read_hpfashioniq(path: str | os.PathLike, fashioniq_root: str | os.PathLike,
                     on_missing: str = "error", check_images: bool = True) -> CIRSplit:
  """Reads the preference file; `Query.extra` holds set1, set2 and preferred."""
  path = Path(path)
  if path.suffix == ".jsonl":
    entries = records.load_jsonl(path, "HP-FashionIQ")
  else:
    entries = records.load_json(path, "HP-FashionIQ")
  entries = records.expect_list(entries, path, "HP-FashionIQ")
  images: dict[str, ImageRef] = {}
  queries, invalid = [], 0
  for i, e in enumerate(entries):
    where = f"{path} entry {i}"
    records.require(e, ["candidate", "captions", "set1", "set2", "preferred"], where)
    if not e.get("valid", True):
      invalid += 1
      continue
    for key in ("set1", "set2"):
      s = e[key]
      if not isinstance(s, list) or len(s) != 5 or not all(isinstance(n, str) for n in s):
        raise DataError(f"{where}: {key} must be a list of 5 image names, got {s!r}")
    if e["preferred"] not in (1, 2):
      raise DataError(f"{where}: preferred must be 1 or 2, got {e['preferred']!r}")
    for n in [e["candidate"], *e["set1"], *e["set2"]]:
      images[n] = ImageRef(fashioniq.image_path(Path(fashioniq_root), n))
    qid = str(e.get("id", i))
    queries.append(Query(query_id=qid, reference=e["candidate"],
                         text=fashioniq_caption(e["captions"]),
                         extra={"set1": list(e["set1"]), "set2": list(e["set2"]),
                                "preferred": int(e["preferred"]),
                                "category": e.get("category")}))
  if not queries:
    raise DataError(f"{path}: no valid queries ({invalid} flagged invalid)")
  corpus = list(images)
  out = CIRSplit("hpfashioniq", "val", queries, corpus, images, skipped={"invalid": invalid})
  out = records.validate_split(out, require_in_corpus=False)
  if check_images:
    out = records.check_images_exist(out, on_missing)
  return out

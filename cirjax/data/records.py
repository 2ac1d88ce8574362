"""The in-memory form every dataset reader returns, and the checks they share.

A reader turns a published on-disk layout into a `CIRSplit`: a list of `Query` records and
the evaluation corpus (image names in a fixed order, each with a path). Names are the
dataset's own image ids as strings (FashionIQ ASINs, CIRR names, CIRCO/COCO ids).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from cirjax.errors import CirjaxError


class DataError(CirjaxError, ValueError):
  """A dataset file or entry is missing, malformed or inconsistent (message names it)."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """Where an image comes from: a file, and for GeneCIS attribute tasks a box to crop."""
  path: Path
  bbox: tuple[float, float, float, float] | None = None  # x, y, w, h (GeneCIS VAW crops)


@dataclasses.dataclass
class Query:
  """One composed query.

  `relevant` lists every known ground truth, the annotated target first (CIRR: just the
  target; CIRCO and the synthetic set: the full set). `subset` is CIRR's `img_set` members.
  `gallery` is GeneCIS's per-query gallery (distractors only; the target is separate).
  """
  query_id: str
  reference: str
  text: str
  target: str | None = None
  relevant: tuple[str, ...] = ()
  subset: tuple[str, ...] = ()
  gallery: tuple[str, ...] = ()
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CIRSplit:
  """A split: its queries, its retrieval corpus (ordered names) and where every image is."""
  dataset: str
  split: str
  queries: list[Query]
  corpus: list[str]
  images: dict[str, ImageRef]
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def name(self) -> str:
    return f"{self.dataset}/{self.split}"

  def corpus_index(self) -> dict[str, int]:
    return {n: i for i, n in enumerate(self.corpus)}

  @property
  def has_targets(self) -> bool:
    return all(q.target is not None for q in self.queries)


def load_json(path: Path, what: str) -> Any:
  """Reads a JSON file, naming it (and the line/column) on any failure."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{what}: file not found: {path}")
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{what}: malformed JSON in {path} at line {e.lineno} column {e.colno}: "
                    f"{e.msg}") from None
  except OSError as e:
    raise DataError(f"{what}: cannot read {path}: {e}") from None


def load_jsonl(path: Path, what: str) -> list[dict]:
  """Reads JSON lines (blank lines ignored), naming the file and line of a bad record."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{what}: file not found: {path}")
  out = []
  with open(path, "r", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{what}: malformed JSON in {path} line {lineno}: {e.msg}") from None
      if not isinstance(rec, dict):
        raise DataError(f"{what}: {path} line {lineno} is not a JSON object")
      out.append(rec)
  return out


def require(entry: Any, keys: Iterable[str], where: str) -> None:
  """Every key present in a dict entry, else an error naming the entry and the key."""
  if not isinstance(entry, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
  for k in keys:
    if k not in entry:
      raise DataError(f"{where}: missing key {k!r} (keys present: {sorted(entry)})")


def expect_list(data: Any, path: Path, what: str) -> list:
  if not isinstance(data, list):
    raise DataError(f"{what}: {path} should hold a JSON list, got {type(data).__name__}")
  if not data:
    raise DataError(f"{what}: {path} is empty (no entries): an empty split cannot be used")
  return data


def check_unique(ids: Sequence[str], what: str) -> None:
  seen = set()
  for i in ids:
    if i in seen:
      raise DataError(f"{what}: duplicate id {i!r}")
    seen.add(i)


def check_images_exist(split: CIRSplit, on_missing: str = "error") -> CIRSplit:
  """Stats every image the split uses. `on_missing`: "error" (default) or "skip".

  With "skip", queries that use a missing image are dropped and missing corpus images are
  removed, and both counts are recorded in `split.skipped` so every report states them.
  A query whose target is dropped from the corpus is dropped too (never left unreachable).
  """
  if on_missing not in ("error", "skip"):
    raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
  missing = {n for n, ref in split.images.items() if not os.path.isfile(ref.path)}
  if not missing:
    return split
  if on_missing == "error":
    first = sorted(missing)[0]
    if len(missing) == len(split.images):
      # Skipping would drop every query: the root or its layout is wrong, not a few files.
      hint = ("no image of the split is where its annotations say: check the root and the "
              "folder layout (docs/data.md)")
    else:
      hint = "pass on_missing='skip' / --skip-missing to drop them and count them"
    raise DataError(f"{split.name}: {len(missing)} image file(s) missing, e.g. {first!r} at "
                    f"{split.images[first].path} ({hint})")
  return drop_images(split, missing, "missing")


def drop_images(split: CIRSplit, bad: set[str], what: str = "missing") -> CIRSplit:
  """`split` without the images in `bad` and every query that uses one, the counts added to
  `split.skipped` (`<what>_images`, `corpus_images`, `queries`). A query whose target is
  dropped from the corpus is dropped too (never left unreachable)."""
  corpus = [n for n in split.corpus if n not in bad]
  kept = []
  for q in split.queries:
    used = {q.reference, *q.relevant, *q.subset, *q.gallery} | ({q.target} - {None})
    if used & bad:
      continue
    kept.append(q)
  skipped = dict(split.skipped)
  key = f"{what}_images"
  skipped[key] = skipped.get(key, 0) + len(bad)
  skipped["corpus_images"] = skipped.get("corpus_images", 0) + len(split.corpus) - len(corpus)
  skipped["queries"] = skipped.get("queries", 0) + len(split.queries) - len(kept)
  if not kept:
    raise DataError(f"{split.name}: every query uses an image that is {what}; nothing left to "
                    "evaluate")
  if not corpus:
    raise DataError(f"{split.name}: the corpus has no images left after skipping {what} ones")
  return dataclasses.replace(split, queries=kept, corpus=corpus, skipped=skipped)


def validate_split(split: CIRSplit, require_in_corpus: bool = True) -> CIRSplit:
  """Cross-checks a split: non-empty, unique ids, every name known, targets in the corpus."""
  if not split.queries:
    raise DataError(f"{split.name}: no queries (empty split)")
  if not split.corpus:
    raise DataError(f"{split.name}: the corpus has no images")
  check_unique([q.query_id for q in split.queries], f"{split.name} query ids")
  check_unique(split.corpus, f"{split.name} corpus image names")
  corpus = set(split.corpus)
  for q in split.queries:
    where = f"{split.name} query {q.query_id}"
    for role, names in (("reference", [q.reference]), ("target", [q.target] if q.target else []),
                        ("relevant", q.relevant), ("img_set member", q.subset),
                        ("gallery", q.gallery)):
      for n in names:
        if n not in split.images:
          raise DataError(f"{where}: {role} image {n!r} is not a known image of this split")
    if require_in_corpus:
      for n in ([q.target] if q.target else []) + list(q.relevant):
        if n not in corpus:
          raise DataError(f"{where}: ground-truth image {n!r} is not in the corpus, so it could "
                          "never be retrieved")
  return split

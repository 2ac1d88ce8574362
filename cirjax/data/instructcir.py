"""InstructCIR training data (InstructCIR §2.2-2.3, appendix C) as JSON lines.

Stage 1, image-caption pairs (LLaVA-Pretrain / FOIL style), one object per line:
  {"image": "relative/path.jpg", "caption": "a husky lying on the grass"}
Stage 2, CC3M-Instruct triplets:
  {"image": "relative/path.jpg", "instruction": "make the dog run",
   "modified_caption": "a husky running on the grass",
   "original_caption": "a husky lying on the grass"}
`image` is relative to `image_root`. The LLaVA-style `{"image", "conversations": [...]}`
layout of LLaVA-Pretrain is accepted for stage 1 (caption = the last "gpt" turn).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cirjax.data import records
from cirjax.data.records import DataError


@dataclasses.dataclass(frozen=True)
class CaptionPair:
  image: Path
  caption: str


@dataclasses.dataclass(frozen=True)
class InstructTriplet:
  image: Path
  instruction: str
  modified_caption: str
  original_caption: str


def _str(e: dict, key: str, where: str) -> str:
  v = e[key]
  if not isinstance(v, str) or not v.strip():
    raise DataError(f"{where}: {key!r} must be a non-empty string, got {v!r}")
  return v


def _check_images(paths: list[Path], path: Path, on_missing: str) -> list[bool]:
  ok = [p.is_file() for p in paths]
  if not all(ok) and on_missing == "error":
    i = ok.index(False)
    raise DataError(f"{path} record {i + 1}: image not found: {paths[i]} "
                    "(on_missing='skip' drops such records and counts them)")
  return ok


def read_caption_pairs(path: str | os.PathLike, image_root: str | os.PathLike,
                       on_missing: str = "error", check_images: bool = True
                       ) -> tuple[list[CaptionPair], int]:
  """Stage-1 pairs; returns (pairs, number skipped for missing images)."""
  path, image_root = Path(path), Path(image_root)
  recs = records.load_jsonl(path, "InstructCIR caption pairs")
  if not recs:
    raise DataError(f"{path}: no records (empty split)")
  out = []
  for i, e in enumerate(recs):
    where = f"{path} record {i + 1}"
    records.require(e, ["image"], where)
    if "caption" in e:
      cap = _str(e, "caption", where)
    elif isinstance(e.get("conversations"), list) and e["conversations"]:
      turns = [t for t in e["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"]
      if not turns:
        raise DataError(f"{where}: conversations have no 'gpt' turn to use as caption")
      cap = str(turns[-1].get("value", "")).strip()
      if not cap:
        raise DataError(f"{where}: the last 'gpt' turn is empty")
    else:
      raise DataError(f"{where}: missing key 'caption' (or LLaVA 'conversations')")
    out.append(CaptionPair(image_root / _str(e, "image", where), cap))
  skipped = 0
  if check_images:
    ok = _check_images([p.image for p in out], path, on_missing)
    skipped = ok.count(False)
    out = [p for p, k in zip(out, ok) if k]
  return out, skipped


def read_instruct_triplets(path: str | os.PathLike, image_root: str | os.PathLike,
                           on_missing: str = "error", check_images: bool = True
                           ) -> tuple[list[InstructTriplet], int]:
  """Stage-2 CC3M-Instruct triplets; returns (triplets, number skipped for missing images)."""
  path, image_root = Path(path), Path(image_root)
  recs = records.load_jsonl(path, "InstructCIR triplets")
  if not recs:
    raise DataError(f"{path}: no records (empty split)")
  out = []
  keys = ["image", "instruction", "modified_caption", "original_caption"]
  for i, e in enumerate(recs):
    where = f"{path} record {i + 1}"
    records.require(e, keys, where)
    out.append(InstructTriplet(image_root / _str(e, "image", where), _str(e, "instruction", where),
                               _str(e, "modified_caption", where),
                               _str(e, "original_caption", where)))
  skipped = 0
  if check_images:
    ok = _check_images([t.image for t in out], path, on_missing)
    skipped = ok.count(False)
    out = [t for t, k in zip(out, ok) if k]
  return out, skipped

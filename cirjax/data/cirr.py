"""CIRR reader (Liu et al. 2021) in its published layout (also the synthetic set's layout).

```
ROOT/captions/cap.rc2.{train,val,test1}.json
    [{"pairid": 12063, "reference": "dev-147-1-img1", "target_hard": "dev-83-0-img1",
      "target_soft": {"dev-83-0-img1": 1.0}, "caption": "...",
      "img_set": {"id": 264, "members": [6 names], "reference_rank": 3, "target_rank": 4}}]
ROOT/image_splits/split.rc2.{train,val,test1}.json   {"dev-0-0-img0": "./dev/dev-0-0-img0.png"}
```
Paths in the split file are relative to ROOT. test1 entries carry no `target_hard` /
`target_soft` (ground truth is on the evaluation server). The corpus is the split file's
images in file order. `relevant` holds `target_hard` only: CIRR annotates one target.
"""

from __future__ import annotations

import os
from pathlib import Path

from cirjax.data import records
from cirjax.data.records import CIRSplit, DataError, ImageRef, Query

SPLITS = ("train", "val", "test1")


def read_image_split(root: Path, split: str) -> dict[str, ImageRef]:
  path = Path(root) / "image_splits" / f"split.rc2.{split}.json"
  data = records.load_json(path, "CIRR image split")
  if not isinstance(data, dict):
    raise DataError(f"CIRR image split: {path} should map image name -> relative path, "
                    f"got {type(data).__name__}")
  if not data:
    raise DataError(f"CIRR image split: {path} is empty: a corpus with no images")
  out = {}
  for name, rel in data.items():
    if not isinstance(rel, str) or not rel:
      raise DataError(f"{path} entry {name!r}: relative path must be a non-empty string, got {rel!r}")
    out[name] = ImageRef(Path(root) / rel)
  return out


def read_cirr(root: str | os.PathLike, split: str = "val", on_missing: str = "error",
              check_images: bool = True) -> CIRSplit:
  """Reads one CIRR split with its `img_set` members; validates every entry."""
  root = Path(root)
  if split not in SPLITS:
    raise DataError(f"CIRR split must be one of {SPLITS}, got {split!r}")
  images = read_image_split(root, split)
  cap_path = root / "captions" / f"cap.rc2.{split}.json"
  caps = records.expect_list(records.load_json(cap_path, "CIRR captions"), cap_path,
                             "CIRR captions")
  has_target = split != "test1"
  queries = []
  for i, e in enumerate(caps):
    where = f"{cap_path} entry {i}"
    keys = ["pairid", "reference", "caption", "img_set"] + (["target_hard"] if has_target else [])
    records.require(e, keys, where)
    where = f"{cap_path} entry {i} (pairid {e['pairid']})"
    img_set = e["img_set"]
    records.require(img_set, ["members"], f"{where} img_set")
    members = img_set["members"]
    if not isinstance(members, list) or not members:
      raise DataError(f"{where}: img_set.members must be a non-empty list, got {members!r}")
    target = e.get("target_hard") if has_target else None
    soft = e.get("target_soft", {})
    if not isinstance(soft, dict):
      raise DataError(f"{where}: target_soft must be a dict name -> score, got {soft!r}")
    if not isinstance(e["caption"], str):
      raise DataError(f"{where}: caption must be a string, got {e['caption']!r}")
    for role, n in [("reference", e["reference"])] + ([("target_hard", target)] if target else []) \
        + [("img_set member", m) for m in members] + [("target_soft", s) for s in soft]:
      if n not in images:
        raise DataError(f"{where}: {role} {n!r} is not an image of split.rc2.{split}.json")
    if target is not None and target not in members:
      raise DataError(f"{where}: target_hard {target!r} is not among img_set.members")
    subset = tuple(m for m in members if m != e["reference"])
    queries.append(Query(
        query_id=str(e["pairid"]), reference=e["reference"], text=e["caption"], target=target,
        relevant=(target,) if target else (), subset=subset,
        extra={"target_soft": dict(soft), "img_set_id": img_set.get("id")}))
  out = CIRSplit("cirr", split, queries, list(images), images)
  out = records.validate_split(out)
  if check_images:
    out = records.check_images_exist(out, on_missing)
  return out

"""CIRCO reader (Baldrati et al. 2023) in its published layout.

```
ROOT/annotations/{val,test}.json
    [{"id": 0, "reference_img_id": 85932, "target_img_id": 9761,
      "relative_caption": "is held by a little girl on a chair", "shared_concept": "a teddy bear",
      "gt_img_ids": [9761, 489535, ...]}]
ROOT/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json  {"images": [{"id", "file_name"}]}
ROOT/COCO2017_unlabeled/unlabeled2017/<file_name>
```
The corpus is every image of `image_info_unlabeled2017.json` (file order). Test entries lack
`target_img_id`/`gt_img_ids`. `target_img_id` is the first of `gt_img_ids` (checked).
Image names are the COCO ids as strings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cirjax.data import records
from cirjax.data.records import CIRSplit, DataError, ImageRef, Query
from cirjax.data.text import circo_caption

SPLITS = ("val", "test")


def read_image_info(root: Path) -> dict[str, ImageRef]:
  path = Path(root) / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
  data = records.load_json(path, "CIRCO image list")
  if not isinstance(data, dict) or "images" not in data:
    raise DataError(f"CIRCO image list: {path} should be a COCO info file with an 'images' list")
  imgs = records.expect_list(data["images"], path, "CIRCO image list")
  base = Path(root) / "COCO2017_unlabeled" / "unlabeled2017"
  out = {}
  for i, im in enumerate(imgs):
    records.require(im, ["id", "file_name"], f"{path} images[{i}]")
    name = str(im["id"])
    if name in out:
      raise DataError(f"{path}: duplicate image id {name}")
    out[name] = ImageRef(base / im["file_name"])
  return out


def parse_annotations(entries: list[Any], path: Path, has_gt: bool) -> list[Query]:
  """CIRCO annotation entries -> Queries (shared with the synthetic set's relevant-set file)."""
  queries = []
  for i, e in enumerate(entries):
    where = f"{path} entry {i}"
    keys = ["id", "reference_img_id", "relative_caption"]
    keys += ["target_img_id", "gt_img_ids"] if has_gt else []
    records.require(e, keys, where)
    where = f"{path} entry {i} (id {e['id']})"
    target, gts = None, ()
    if has_gt:
      gt = e["gt_img_ids"]
      if not isinstance(gt, list) or not gt:
        raise DataError(f"{where}: gt_img_ids must be a non-empty list, got {gt!r}")
      gts = tuple(str(g) for g in gt)
      if len(set(gts)) != len(gts):
        raise DataError(f"{where}: gt_img_ids has duplicates: {gt}")
      target = str(e["target_img_id"])
      if gts[0] != target:
        raise DataError(f"{where}: target_img_id {target} is not the first of gt_img_ids {gt}")
    queries.append(Query(
        query_id=str(e["id"]), reference=str(e["reference_img_id"]),
        text=e["relative_caption"], target=target, relevant=gts,
        extra={"shared_concept": e.get("shared_concept"),
               "blip2_text": circo_caption(e["relative_caption"])}))
  return queries


def read_circo(root: str | os.PathLike, split: str = "val", on_missing: str = "error",
               check_images: bool = True) -> CIRSplit:
  """Reads a CIRCO split with its full ground-truth sets."""
  root = Path(root)
  if split not in SPLITS:
    raise DataError(f"CIRCO split must be one of {SPLITS}, got {split!r}")
  images = read_image_info(root)
  path = root / "annotations" / f"{split}.json"
  entries = records.expect_list(records.load_json(path, "CIRCO annotations"), path,
                                "CIRCO annotations")
  queries = parse_annotations(entries, path, has_gt=(split != "test"))
  out = records.validate_split(CIRSplit("circo", split, queries, list(images), images))
  if check_images:
    out = records.check_images_exist(out, on_missing)
  return out

"""GeneCIS reader (Vaze et al. 2023): four conditional-retrieval tasks, one gallery per query.

```
ROOT/genecis/{change_attribute,focus_attribute,change_object,focus_object}.json
    [{"reference": R, "target": T, "gallery": [G, ...], "condition": "color"}]
  attribute tasks (Visual Genome crops): R/T/G = {"image_id": 2376, "instance_bbox": [x, y, w, h]}
  object tasks (COCO val2017):         R/T/G = {"val_image_id": 139}
ROOT/VG_100K/<image_id>.jpg            ROOT/val2017/<val_image_id:012d>.jpg
```
Each query ranks its target among its own gallery (R@{1,2,3}). Attribute-task images are
crops of a box: their names are `"<image_id>@x,y,w,h"`, and `ImageRef.bbox` carries the box
(`cirjax.data.images.load_genecis_crop` cuts it). The "corpus" is the union of every image
used, so each is encoded once.

A few official entries list their target in their own gallery too (change_object entry 19).
The official evaluation scores `[target] + gallery` and sorts descending with ties in index
order (PyTorch's sort), so such a copy, which ties the target exactly, ranks after it and never
costs a hit. cirjax drops these copies from the gallery (counted in
`skipped["gallery_copies_of_target"]`), which gives the same ranks while keeping its own rule
for other ties (a distractor that ties the target counts as ranked before it, so a constant
scorer cannot score 100).
"""

from __future__ import annotations

import os
from pathlib import Path

from cirjax.data import records
from cirjax.data.records import CIRSplit, DataError, ImageRef, Query

TASKS = ("change_attribute", "focus_attribute", "change_object", "focus_object")


def _image(item, where: str, task: str, vg_root: Path, coco_root: Path) -> tuple[str, ImageRef]:
  if not isinstance(item, dict):
    raise DataError(f"{where}: expected an image object, got {item!r}")
  if "object" in task:
    records.require(item, ["val_image_id"], where)
    iid = int(item["val_image_id"])
    return str(iid), ImageRef(coco_root / f"{iid:012d}.jpg")
  records.require(item, ["image_id", "instance_bbox"], where)
  box = item["instance_bbox"]
  if not isinstance(box, list) or len(box) != 4:
    raise DataError(f"{where}: instance_bbox must be [x, y, w, h], got {box!r}")
  box = tuple(float(b) for b in box)
  if box[2] <= 0 or box[3] <= 0:
    raise DataError(f"{where}: instance_bbox has no area: {box}")
  name = f"{item['image_id']}@" + ",".join(f"{b:g}" for b in box)
  return name, ImageRef(vg_root / f"{item['image_id']}.jpg", bbox=box)


def read_genecis(root: str | os.PathLike, task: str, vg_root: str | os.PathLike | None = None,
                 coco_root: str | os.PathLike | None = None, on_missing: str = "error",
                 check_images: bool = True) -> CIRSplit:
  """Reads one GeneCIS task file; validates every entry."""
  root = Path(root)
  if task not in TASKS:
    raise DataError(f"GeneCIS task must be one of {TASKS}, got {task!r}")
  vg = Path(vg_root) if vg_root else root / "VG_100K"
  coco = Path(coco_root) if coco_root else root / "val2017"
  path = root / "genecis" / f"{task}.json"
  entries = records.expect_list(records.load_json(path, "GeneCIS"), path, "GeneCIS")
  images: dict[str, ImageRef] = {}
  queries = []
  copies = 0
  for i, e in enumerate(entries):
    where = f"{path} entry {i}"
    records.require(e, ["reference", "target", "gallery", "condition"], where)
    if not isinstance(e["gallery"], list) or not e["gallery"]:
      raise DataError(f"{where}: gallery must be a non-empty list")
    ref, rref = _image(e["reference"], f"{where} reference", task, vg, coco)
    tgt, tref = _image(e["target"], f"{where} target", task, vg, coco)
    gal = []
    for j, g in enumerate(e["gallery"]):
      n, r = _image(g, f"{where} gallery[{j}]", task, vg, coco)
      if n == tgt:  # the target itself: see the module docstring
        copies += 1
        continue
      images[n] = r
      gal.append(n)
    if not gal:
      raise DataError(f"{where}: the gallery holds only copies of the target")
    images[ref], images[tgt] = rref, tref
    queries.append(Query(query_id=str(i), reference=ref, text=str(e["condition"]), target=tgt,
                         relevant=(tgt,), gallery=tuple(gal), extra={"task": task}))
  corpus = list(images)
  skipped = {"gallery_copies_of_target": copies} if copies else {}
  out = records.validate_split(CIRSplit("genecis", task, queries, corpus, images, skipped))
  if check_images:
    out = records.check_images_exist(out, on_missing)
  return out

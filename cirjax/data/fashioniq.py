"""FashionIQ reader (Wu et al. 2021) in its published layout.

```
ROOT/captions/cap.{dress,shirt,toptee}.{train,val,test}.json
    [{"candidate": "B00...", "target": "B00...", "captions": ["is red", "has no sleeves"]}]
ROOT/image_splits/split.{cat}.{split}.json   ["B00...", ...]
ROOT/images/<name>.png                       (names carry no extension)
```
Images are found as `images/<name>.png` (the layout of the CLIP4Cir / SPRC / QuRe code),
`images/<name>.jpg`, or `image_data/<category>/<name>.jpg` (the official download scripts'
per-category folders, which HP-FashionIQ's paths use), first match wins.
The evaluation corpus is the category's split images (split file order). The query text is
the two captions joined as QuRe does (`text.fashioniq_caption`). Test captions may lack
"target" (the ground truth is not public); such queries get `target=None`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cirjax.data import records
from cirjax.data.records import CIRSplit, DataError, ImageRef, Query
from cirjax.data.text import fashioniq_caption

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def image_path(root: Path, name: str, category: str | None = None) -> Path:
  """Where image `name` is under `root` (see the module docstring); when no candidate exists,
  `images/<name>.png`, which the missing-file check then names."""
  base = Path(root) / "images"
  if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
    return base / name
  candidates = [base / f"{name}{ext}" for ext in IMAGE_EXTENSIONS]
  cats = [category] if category else list(CATEGORIES)
  candidates += [Path(root) / "image_data" / c / f"{name}{ext}" for c in cats
                 for ext in (".jpg", ".png")]
  return next((p for p in candidates if p.is_file()), candidates[0])


def read_fashioniq(root: str | os.PathLike, category: str, split: str = "val",
                   on_missing: str = "error", check_images: bool = True) -> CIRSplit:
  """Reads one FashionIQ category/split; validates entries and (optionally) image files."""
  root = Path(root)
  if category not in CATEGORIES:
    raise DataError(f"FashionIQ category must be one of {CATEGORIES}, got {category!r}")
  if split not in SPLITS:
    raise DataError(f"FashionIQ split must be one of {SPLITS}, got {split!r}")
  cap_path = root / "captions" / f"cap.{category}.{split}.json"
  split_path = root / "image_splits" / f"split.{category}.{split}.json"
  caps = records.expect_list(records.load_json(cap_path, "FashionIQ captions"), cap_path,
                             "FashionIQ captions")
  names = records.expect_list(records.load_json(split_path, "FashionIQ image split"), split_path,
                              "FashionIQ image split")
  for i, n in enumerate(names):
    if not isinstance(n, str) or not n:
      raise DataError(f"{split_path} entry {i}: image name must be a non-empty string, got {n!r}")
  records.check_unique(names, f"{split_path} image names")
  images = {n: ImageRef(image_path(root, n, category)) for n in names}
  queries = []
  for i, e in enumerate(caps):
    where = f"{cap_path} entry {i}"
    records.require(e, ["candidate", "captions"], where)
    caps_i = e["captions"]
    if not isinstance(caps_i, list) or len(caps_i) != 2 or not all(isinstance(c, str) for c in caps_i):
      raise DataError(f"{where}: 'captions' must be a list of two strings, got {caps_i!r}")
    target = e.get("target")
    if target is None and split != "test":
      raise DataError(f"{where}: missing key 'target' (only test captions may omit it)")
    for n in (e["candidate"], target):
      if n is not None and n not in images:
        # References may come from outside the split's image list; they must exist on disk.
        images[n] = ImageRef(image_path(root, n, category))
    queries.append(Query(query_id=str(i), reference=e["candidate"], text=fashioniq_caption(caps_i),
                         target=target, relevant=(target,) if target else (),
                         extra={"captions": list(caps_i), "category": category}))
  out = CIRSplit("fashioniq", f"{category}.{split}", queries, list(names), images)
  out = records.validate_split(out, require_in_corpus=(split != "train"))
  if check_images:
    out = records.check_images_exist(out, on_missing)
  return out

"""CIRR reader (Liu et al. 2021) in its released layouts (also the synthetic set's layout).

```
captions/cap.rc2.{train,val,test1}.json
    [{"pairid": 12063, "reference": "dev-147-1-img1", "target_hard": "dev-83-0-img1",
      "target_soft": {"dev-83-0-img1": 1.0}, "caption": "...",
      "img_set": {"id": 264, "members": [6 names], "reference_rank": 3, "target_rank": 4}}]
image_splits/split.rc2.{train,val,test1}.json   {"dev-0-0-img0": "./dev/dev-0-0-img0.png"}
```
test1 entries carry no `target_hard` / `target_soft` (ground truth is on the evaluation
server). The corpus is the split file's images in file order. `relevant` holds `target_hard`
only: CIRR annotates one target.

Where the annotation folders and the images sit differs between downloads; the split files'
paths (`./dev/...`, `./train/34/...`) are relative to an image base. `LAYOUTS` names the ones
in use (annotation folder, image base), relative to the root the user gives:

* `flat`          ROOT/captions, ROOT/image_splits, images ROOT/dev/... (cirjax's synthetic set)
* `release`       the official release (`git clone -b cirr_dataset ... cirr` + the NLVR2 images
                  in `img_raw/`): ROOT/captions, ROOT/image_splits, images ROOT/img_raw/dev/...
* `clip4cir`      the CLIP4Cir / SPRC / QuRe code's: ROOT/cirr/captions, ROOT/cirr/image_splits,
                  images ROOT/dev/...
* `clip4cir_raw`  ROOT/cirr/captions, ..., images ROOT/cirr/img_raw/dev/... (the release cloned
                  into ROOT/cirr)

`resolve_layout` picks the first whose annotation files exist and whose first image of the
split is on disk; `layout=` forces one. When none matches, the error lists every layout tried
and the first file it missed.
"""

from __future__ import annotations

import os
from pathlib import Path

from cirjax.data import records
from cirjax.data.records import CIRSplit, DataError, ImageRef, Query

SPLITS = ("train", "val", "test1")


LAYOUTS = {  # name: (annotation folder, image base), relative to the root
    "flat": (".", "."),
    "release": (".", "img_raw"),
    "clip4cir": ("cirr", "."),
    "clip4cir_raw": ("cirr", "cirr/img_raw"),
}


def _annotation_files(ann: Path, split: str) -> tuple[Path, Path]:
  return ann / "captions" / f"cap.rc2.{split}.json", ann / "image_splits" / f"split.rc2.{split}.json"


def resolve_layout(root: str | os.PathLike, split: str, layout: str | None = None
                   ) -> tuple[str, Path, Path]:
  """(layout name, annotation folder, image base) of a CIRR root; see the module docstring."""
  root = Path(root)
  if layout is not None:
    if layout not in LAYOUTS:
      raise DataError(f"CIRR layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    ann, img = LAYOUTS[layout]
    return layout, root / ann, root / img
  misses = []
  for name, (ann, img) in LAYOUTS.items():
    caps, split_file = _annotation_files(root / ann, split)
    missing = next((p for p in (caps, split_file) if not p.is_file()), None)
    if missing is None:
      first = _first_image(split_file)
      if first is None or (root / img / first).is_file():
        return name, root / ann, root / img
      missing = root / img / first
    misses.append(f"{name}: {missing}")
  raise DataError(f"CIRR {split}: {root} matches none of the known layouts (the first file "
                  "each one misses):\n  " + "\n  ".join(misses)
                  + "\n(docs/data.md shows each layout; --layout NAME forces one)")


def _first_image(split_file: Path) -> str | None:
  data = records.load_json(split_file, "CIRR image split")
  if isinstance(data, dict):
    for rel in data.values():
      if isinstance(rel, str) and rel:
        return rel
  return None  # malformed: read_image_split names the problem


def read_image_split(ann: Path, split: str, image_base: Path | None = None
                     ) -> dict[str, ImageRef]:
  """name -> image of `split.rc2.<split>.json` in `ann`, its paths taken relative to
  `image_base` (default: `ann`)."""
  path = Path(ann) / "image_splits" / f"split.rc2.{split}.json"
  base = Path(ann) if image_base is None else Path(image_base)
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
    out[name] = ImageRef(base / rel)
  return out


def read_cirr(root: str | os.PathLike, split: str = "val", on_missing: str = "error",
              check_images: bool = True, layout: str | None = None) -> CIRSplit:
  """Reads one CIRR split with its `img_set` members; validates every entry.

  `layout`: one of `LAYOUTS`, or None to detect it (see the module docstring).
  """
  root = Path(root)
  if split not in SPLITS:
    raise DataError(f"CIRR split must be one of {SPLITS}, got {split!r}")
  try:
    _, ann, image_base = resolve_layout(root, split, layout)
  except DataError:
    if layout is not None or (check_images and on_missing != "skip"):
      raise
    # Images not checked, or missing ones to be skipped: the first layout whose annotation
    # files exist (a missing annotation file is then named by the reads below).
    ann = next((root / a for a, _ in LAYOUTS.values()
                if all(p.is_file() for p in _annotation_files(root / a, split))), root)
    image_base = ann
  images = read_image_split(ann, split, image_base)
  cap_path = ann / "captions" / f"cap.rc2.{split}.json"
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

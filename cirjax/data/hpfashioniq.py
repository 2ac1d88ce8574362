"""HP-FashionIQ reader (QuRe §4, appendix C): FashionIQ validation queries, each judged by a
person between two retrieved sets of five images.

The release is one JSON object, `HP_FashionIQ/hpfiq.json` in the QuRe authors' repository:

```
{"user_1": {"question_set_1": {
    "ref_img_paths":  [25 paths],          # the reference image of each query
    "targ_img_paths": [25 paths],          # its FashionIQ target
    "sentences":      [25 strings],        # the modification text, captions already joined
    "retrieved_set1": [25 x {"img_path": [5 paths], "user_score": "1".."5"}],
    "retrieved_set2": [25 x {"img_path": [5 paths], "user_score": "1".."5"}],
    "preferred set":  [25 x "1" or "2"]},
  "question_set_2": {...}},
 "user_2": ...}                            # 61 users x 2 question sets x 25 = 3,050 queries
```
Paths look like `/-/image_data/shirt/B000LUIBH8.jpg`, where `-` stands for the user's FashionIQ
root (the release asks users to substitute it). cirjax maps each path onto `fashioniq_root`
without editing the file: `/-/` or any absolute prefix up to `image_data/` is dropped, and the
image is `ROOT/image_data/<category>/<asin>.jpg` when that exists (the layout of the release's
paths), else the FashionIQ reader's `ROOT/images/<asin>.png|.jpg`. A path whose file exists as
written (a user who did substitute `-`) is used as is. Images are named by ASIN.

One judged query per (user, question set, index): `Query.query_id` is
`"<user>/<question set>/<index>"`, `Query.extra` holds `set1`, `set2` (image names), `preferred`
(1 or 2), `user`, `question_set`, `category` and the two sets' `user_score`s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cirjax.data import fashioniq, records
from cirjax.data.records import CIRSplit, DataError, ImageRef, Query

FILE_NAME = "hpfiq.json"
_KEYS = ("ref_img_paths", "targ_img_paths", "sentences", "retrieved_set1", "retrieved_set2",
         "preferred set")


def find_file(root: str | os.PathLike) -> Path:
  """`root` itself when it is a file, else `hpfiq.json` in `root` or `root/HP_FashionIQ/`."""
  root = Path(root)
  if root.is_file():
    return root
  tried = [root / FILE_NAME, root / "HP_FashionIQ" / FILE_NAME]
  for p in tried:
    if p.is_file():
      return p
  raise DataError(f"HP-FashionIQ: no {FILE_NAME} found; tried " + ", ".join(map(str, tried))
                  + " (give the file with --hp-file)")


def _relative(path: str) -> str | None:
  """The part of a release path below the FashionIQ root, or None when it has no known form."""
  if path.startswith("/-/"):
    return path[3:]
  if path.startswith("-/"):
    return path[2:]
  i = path.rfind("image_data/")
  return path[i:] if i >= 0 else None


def image_ref(path: str, root: Path, where: str) -> tuple[str, ImageRef]:
  """(image name, where the file is) for one release path; see the module docstring."""
  if not isinstance(path, str) or not path:
    raise DataError(f"{where}: image path must be a non-empty string, got {path!r}")
  name = Path(path).stem
  if os.path.isabs(path) and not path.startswith("/-/") and Path(path).is_file():
    return name, ImageRef(Path(path))
  rel = _relative(path)
  if rel is not None and (root / rel).is_file():
    return name, ImageRef(root / rel)
  return name, ImageRef(fashioniq.image_path(root, name, _category(path)))


def _category(path: str) -> str | None:
  parts = Path(path).parts
  for cat in fashioniq.CATEGORIES:
    if cat in parts:
      return cat
  return None


def _retrieved(entry: Any, where: str) -> tuple[list[str], int]:
  if not isinstance(entry, dict) or "img_path" not in entry:
    raise DataError(f"{where}: expected {{'img_path': [5 paths], 'user_score': ...}}, "
                    f"got {entry!r:.120}")
  paths = entry["img_path"]
  if not isinstance(paths, list) or len(paths) != 5:
    raise DataError(f"{where}: 'img_path' must list 5 image paths, got {paths!r:.200}")
  try:
    score = int(entry.get("user_score"))
  except (TypeError, ValueError):
    raise DataError(f"{where}: 'user_score' must be 1..5, got {entry.get('user_score')!r}")
  return paths, score


def _question_set(qs: Any, where: str) -> dict[str, list]:
  if not isinstance(qs, dict):
    raise DataError(f"{where}: expected an object with {list(_KEYS)}, got {type(qs).__name__}")
  records.require(qs, list(_KEYS), where)
  n = len(qs["ref_img_paths"])
  for k in _KEYS:
    if not isinstance(qs[k], list) or len(qs[k]) != n:
      raise DataError(f"{where}: '{k}' must be a list of {n} entries (as 'ref_img_paths'), "
                      f"got {type(qs[k]).__name__} of length {len(qs[k]) if isinstance(qs[k], list) else '-'}")
  return qs


def read_hpfashioniq(path: str | os.PathLike, fashioniq_root: str | os.PathLike | None = None,
                     on_missing: str = "error", check_images: bool = True) -> CIRSplit:
  """Reads the released `hpfiq.json` (see the module docstring).

  Args:
    path: the JSON file, or a directory holding it (`hpfiq.json` or `HP_FashionIQ/hpfiq.json`).
    fashioniq_root: the FashionIQ root the image paths refer to; default: `path` when it is a
      directory, else the file's directory (its parent for `HP_FashionIQ/hpfiq.json`).
  """
  file = find_file(path)
  if fashioniq_root is not None:
    root = Path(fashioniq_root)
  elif Path(path).is_dir():
    root = Path(path)
  else:  # the file beside the images, or in the release's HP_FashionIQ/ folder of the root
    root = file.parent.parent if file.parent.name == "HP_FashionIQ" else file.parent
  data = records.load_json(file, "HP-FashionIQ")
  if not isinstance(data, dict):
    raise DataError(f"{file}: HP-FashionIQ's release is a JSON object "
                    f"{{user: {{question set: {{...}}}}}}, got {type(data).__name__}")
  images: dict[str, ImageRef] = {}

  def add(p: str, where: str) -> str:
    name, ref = image_ref(p, root, where)
    images.setdefault(name, ref)
    return name

  queries = []
  for user, sets in data.items():
    if not isinstance(sets, dict):
      raise DataError(f"{file} [{user!r}]: expected an object of question sets, "
                      f"got {type(sets).__name__}")
    for qset, qs in sets.items():
      where = f"{file} [{user!r}][{qset!r}]"
      qs = _question_set(qs, where)
      for i in range(len(qs["ref_img_paths"])):
        w = f"{where} index {i}"
        pref = str(qs["preferred set"][i]).strip()
        if pref not in ("1", "2"):
          raise DataError(f"{w}: 'preferred set' must be \"1\" or \"2\", got "
                          f"{qs['preferred set'][i]!r}")
        text = qs["sentences"][i]
        if not isinstance(text, str):
          raise DataError(f"{w}: 'sentences' entry must be a string, got {text!r:.120}")
        p1, u1 = _retrieved(qs["retrieved_set1"][i], f"{w} retrieved_set1")
        p2, u2 = _retrieved(qs["retrieved_set2"][i], f"{w} retrieved_set2")
        ref_path = qs["ref_img_paths"][i]
        ref = add(ref_path, w)
        target = add(qs["targ_img_paths"][i], w)
        queries.append(Query(
            query_id=f"{user}/{qset}/{i}", reference=ref, text=text, target=target,
            relevant=(target,),
            extra={"set1": [add(p, w) for p in p1], "set2": [add(p, w) for p in p2],
                   "preferred": int(pref), "user_score": (u1, u2), "user": user,
                   "question_set": qset, "category": _category(ref_path)}))
  if not queries:
    raise DataError(f"{file}: no judged queries")
  out = CIRSplit("hpfashioniq", "val", queries, list(images), images)
  out = records.validate_split(out, require_in_corpus=False)
  if check_images:
    out = records.check_images_exist(out, on_missing)
  return out

"""Every reader on small files written in the exact published layouts, plus bad input."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cirjax.data import (DataError, read_circo, read_cirr, read_fashioniq, read_genecis,
                         read_hpfashioniq)
from cirjax.data import cirr as cirr_lib
from cirjax.data import instructcir


def _png(path: Path, color=(255, 0, 0), size=(8, 6)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, color).save(path)


def _dump(path: Path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


# ----------------------------------------------------------------------------- FashionIQ

def _fashioniq(root: Path, with_images=True):
  names = ["B001", "B002", "B003", "B004"]
  _dump(root / "image_splits" / "split.dress.val.json", names)
  _dump(root / "captions" / "cap.dress.val.json", [
      {"target": "B002", "candidate": "B001", "captions": ["is red.", "has no sleeves?"]},
      {"target": "B004", "candidate": "B003", "captions": ["  darker, ", "longer"]},
  ])
  if with_images:
    for n in names:  # published names carry no extension; files are <name>.png
      _png(root / "images" / f"{n}.png")
  return names


def test_fashioniq_reads_layout_and_joins_captions(tmp_path):
  names = _fashioniq(tmp_path)
  s = read_fashioniq(tmp_path, "dress", "val")
  assert s.corpus == names
  assert [q.reference for q in s.queries] == ["B001", "B003"]
  assert [q.target for q in s.queries] == ["B002", "B004"]
  # QuRe: c0.strip('.?, ').capitalize() + " and " + c1.strip('.?, ')
  assert s.queries[0].text == "Is red and has no sleeves"
  assert s.queries[1].text == "Darker and longer"
  assert s.images["B001"].path == tmp_path / "images" / "B001.png"


def test_fashioniq_bad_input(tmp_path):
  _fashioniq(tmp_path)
  (tmp_path / "images" / "B004.png").unlink()
  with pytest.raises(DataError, match="B004"):
    read_fashioniq(tmp_path, "dress", "val")
  s = read_fashioniq(tmp_path, "dress", "val", on_missing="skip")
  assert len(s.queries) == 1 and s.skipped["queries"] == 1 and s.skipped["missing_images"] == 1
  assert "B004" not in s.corpus
  # Target outside the corpus.
  _dump(tmp_path / "captions" / "cap.dress.val.json",
        [{"target": "B999", "candidate": "B001", "captions": ["a", "b"]}])
  with pytest.raises(DataError, match="B999"):
    read_fashioniq(tmp_path, "dress", "val", check_images=False)
  # One caption only.
  _dump(tmp_path / "captions" / "cap.dress.val.json",
        [{"target": "B002", "candidate": "B001", "captions": ["a"]}])
  with pytest.raises(DataError, match="entry 0.*two strings"):
    read_fashioniq(tmp_path, "dress", "val")
  # Malformed JSON names the file and the line.
  (tmp_path / "captions" / "cap.dress.val.json").write_text('[{"target": "B002",\n oops}]')
  with pytest.raises(DataError, match=r"cap\.dress\.val\.json at line 2"):
    read_fashioniq(tmp_path, "dress", "val")
  # Empty split.
  _dump(tmp_path / "captions" / "cap.dress.val.json", [])
  with pytest.raises(DataError, match="empty"):
    read_fashioniq(tmp_path, "dress", "val")
  # Duplicate image names in the corpus.
  _dump(tmp_path / "captions" / "cap.dress.val.json",
        [{"target": "B002", "candidate": "B001", "captions": ["a", "b"]}])
  _dump(tmp_path / "image_splits" / "split.dress.val.json", ["B001", "B002", "B002"])
  with pytest.raises(DataError, match="duplicate id 'B002'"):
    read_fashioniq(tmp_path, "dress", "val")


# ----------------------------------------------------------------------------- CIRR

def _cirr(root: Path):
  names = [f"dev-{i}-0-img{i % 2}" for i in range(8)]
  _dump(root / "image_splits" / "split.rc2.val.json", {n: f"./dev/{n}.png" for n in names})
  members = names[:6]
  _dump(root / "captions" / "cap.rc2.val.json", [
      {"pairid": 12063, "reference": names[0], "target_hard": names[3],
       "target_soft": {names[3]: 1.0, names[4]: 0.5},
       "caption": "make it blue", "img_set": {"id": 264, "members": members,
                                              "reference_rank": 0, "target_rank": 3}},
      {"pairid": 7, "reference": names[6], "target_hard": names[7],
       "target_soft": {names[7]: 1.0}, "caption": "zoom out",
       "img_set": {"id": 1, "members": names[2:8], "reference_rank": 4, "target_rank": 5}},
  ])
  _dump(root / "image_splits" / "split.rc2.test1.json", {n: f"./test1/{n}.png" for n in names})
  _dump(root / "captions" / "cap.rc2.test1.json", [
      {"pairid": 1, "reference": names[0], "caption": "x",
       "img_set": {"id": 0, "members": members, "reference_rank": 0}}])
  for n in names:
    _png(root / "dev" / f"{n}.png")
    _png(root / "test1" / f"{n}.png")
  return names


def test_cirr_reads_layout_subsets_and_soft_targets(tmp_path):
  names = _cirr(tmp_path)
  s = read_cirr(tmp_path, "val")
  assert s.corpus == names
  q = s.queries[0]
  assert q.query_id == "12063" and q.target == names[3] and q.relevant == (names[3],)
  assert q.subset == tuple(names[1:6])  # members minus the reference
  assert q.extra["target_soft"] == {names[3]: 1.0, names[4]: 0.5}
  assert s.images[names[0]].path == tmp_path / "dev" / f"{names[0]}.png"
  t = read_cirr(tmp_path, "test1")
  assert t.queries[0].target is None and not t.has_targets


def test_cirr_bad_input(tmp_path):
  names = _cirr(tmp_path)
  caps = json.loads((tmp_path / "captions" / "cap.rc2.val.json").read_text())
  caps[1]["target_hard"] = "nope"
  _dump(tmp_path / "captions" / "cap.rc2.val.json", caps)
  with pytest.raises(DataError, match=r"pairid 7.*target_hard 'nope'"):
    read_cirr(tmp_path, "val")
  caps[1]["target_hard"] = names[7]
  caps[1]["pairid"] = 12063
  _dump(tmp_path / "captions" / "cap.rc2.val.json", caps)
  with pytest.raises(DataError, match="duplicate id '12063'"):
    read_cirr(tmp_path, "val")
  del caps[1]["img_set"]
  _dump(tmp_path / "captions" / "cap.rc2.val.json", caps)
  with pytest.raises(DataError, match="entry 1: missing key 'img_set'"):
    read_cirr(tmp_path, "val")
  _dump(tmp_path / "image_splits" / "split.rc2.val.json", {})
  with pytest.raises(DataError, match="no images"):
    read_cirr(tmp_path, "val")


CIRR_EXCERPT = Path(__file__).parent / "data" / "cirr"  # the release's val/test1 files, cut short


def _cirr_release(tmp_path: Path, layout: str) -> Path:
  """The release's annotation files + placeholder images laid out as `layout`."""
  ann_rel, img_rel = cirr_lib.LAYOUTS[layout]
  root = tmp_path / layout
  for sub in ("captions", "image_splits"):
    shutil.copytree(CIRR_EXCERPT / sub, root / ann_rel / sub)
  for split in ("val", "test1"):
    for rel in json.loads((CIRR_EXCERPT / "image_splits" / f"split.rc2.{split}.json")
                          .read_text()).values():
      _png(root / img_rel / rel)
  return root


@pytest.mark.parametrize("layout", list(cirr_lib.LAYOUTS))
def test_cirr_release_layouts_are_detected(tmp_path, layout):
  root = _cirr_release(tmp_path, layout)
  assert cirr_lib.resolve_layout(root, "val")[0] == layout
  s = read_cirr(root, "val")
  assert [q.query_id for q in s.queries] == ["12060", "12062", "12081"]  # file order
  q = s.queries[0]
  assert q.reference == "dev-244-0-img0" and q.target == "dev-1028-1-img1"
  assert s.images[q.reference].path == root / cirr_lib.LAYOUTS[layout][1] / "dev" / "dev-244-0-img0.png"
  assert all(ref.path.is_file() for ref in s.images.values())
  t = read_cirr(root, "test1", layout=layout)
  assert not t.has_targets and len(t.queries) == 2


def test_cirr_no_layout_lists_what_each_missed(tmp_path):
  root = _cirr_release(tmp_path, "release")
  shutil.rmtree(root / "img_raw")
  with pytest.raises(DataError) as e:
    read_cirr(root, "val")
  msg = str(e.value)
  for name in cirr_lib.LAYOUTS:
    assert f"{name}: " in msg
  assert str(root / "img_raw" / "dev" / "dev-244-0-img0.png") in msg  # release: the image
  assert str(root / "cirr" / "captions" / "cap.rc2.val.json") in msg  # clip4cir: the captions
  with pytest.raises(DataError, match="layout must be one of"):
    read_cirr(root, "val", layout="nope")
  # A forced layout reads the annotations and reports the missing images as usual.
  with pytest.raises(DataError, match="image file"):
    read_cirr(root, "val", layout="release")


# ----------------------------------------------------------------------------- CIRCO

def _circo(root: Path):
  ids = [85932, 9761, 489535, 57541, 11]
  info = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]}
  _dump(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", info)
  for i in ids:
    _png(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg")
  _dump(root / "annotations" / "val.json", [
      {"reference_img_id": 85932, "target_img_id": 9761,
       "relative_caption": "is held by a little girl", "shared_concept": "a teddy bear",
       "gt_img_ids": [9761, 489535, 57541], "id": 0}])
  _dump(root / "annotations" / "test.json", [
      {"reference_img_id": 85932, "relative_caption": "is blue", "shared_concept": "x", "id": 0}])
  return ids


def test_circo_reads_multiple_ground_truths(tmp_path):
  ids = _circo(tmp_path)
  s = read_circo(tmp_path, "val")
  assert s.corpus == [str(i) for i in ids]
  q = s.queries[0]
  assert q.target == "9761" and q.relevant == ("9761", "489535", "57541")
  assert q.extra["blip2_text"] == "a photo of $ that is held by a little girl"
  t = read_circo(tmp_path, "test")
  assert t.queries[0].relevant == () and t.queries[0].target is None


def test_circo_bad_input(tmp_path):
  _circo(tmp_path)
  ann = json.loads((tmp_path / "annotations" / "val.json").read_text())
  ann[0]["gt_img_ids"] = [489535, 9761]
  _dump(tmp_path / "annotations" / "val.json", ann)
  with pytest.raises(DataError, match="not the first of gt_img_ids"):
    read_circo(tmp_path, "val")
  ann[0]["gt_img_ids"] = [9761, 424242]
  _dump(tmp_path / "annotations" / "val.json", ann)
  with pytest.raises(DataError, match="'424242'"):
    read_circo(tmp_path, "val")


# ----------------------------------------------------------------------------- GeneCIS

def test_genecis_attribute_and_object_tasks(tmp_path):
  vg = lambda i, b: {"image_id": i, "instance_bbox": b}
  _dump(tmp_path / "genecis" / "change_attribute.json", [
      {"reference": vg(1, [0, 0, 4, 4]), "target": vg(2, [1, 1, 3, 3]),
       "gallery": [vg(3, [0, 0, 2, 2]), vg(1, [2, 2, 4, 3])], "condition": "color"}])
  coco = lambda i: {"val_image_id": i}
  _dump(tmp_path / "genecis" / "focus_object.json", [
      {"reference": coco(139), "target": coco(285), "gallery": [coco(632), coco(724)],
       "condition": "dog"}])
  for i in (1, 2, 3):
    _png(tmp_path / "VG_100K" / f"{i}.jpg")
  for i in (139, 285, 632, 724):
    _png(tmp_path / "val2017" / f"{i:012d}.jpg")
  a = read_genecis(tmp_path, "change_attribute")
  q = a.queries[0]
  assert q.text == "color" and len(q.gallery) == 2
  assert a.images[q.target].bbox == (1.0, 1.0, 3.0, 3.0)
  assert q.reference != q.gallery[1]  # same VG image, different box: different crops
  o = read_genecis(tmp_path, "focus_object")
  assert o.queries[0].target == "285"
  assert o.images["285"].path == tmp_path / "val2017" / "000000000285.jpg"
  _dump(tmp_path / "genecis" / "focus_object.json", [
      {"reference": coco(139), "target": coco(285), "gallery": [], "condition": "dog"}])
  with pytest.raises(DataError, match="gallery must be a non-empty list"):
    read_genecis(tmp_path, "focus_object")


def test_genecis_target_copies_in_the_gallery_are_dropped(tmp_path):
  """Official change_object entries 18-20; entry 19 lists its target in its gallery too."""
  entries = json.loads((Path(__file__).parent / "data" / "genecis" / "change_object.json")
                       .read_text())
  (tmp_path / "genecis").mkdir()
  (tmp_path / "genecis" / "change_object.json").write_text(json.dumps(entries))
  coco = tmp_path / "coco"
  for e in entries:
    for item in [e["reference"], e["target"], *e["gallery"]]:
      _png(coco / f"{item['val_image_id']:012d}.jpg")
  s = read_genecis(tmp_path, "change_object", coco_root=coco)
  q = s.queries[1]
  assert q.target == "175364" and q.target not in q.gallery
  assert len(q.gallery) == len(entries[1]["gallery"]) - 1
  assert [len(x.gallery) for x in (s.queries[0], s.queries[2])] == [
      len(entries[0]["gallery"]), len(entries[2]["gallery"])]
  assert s.skipped == {"gallery_copies_of_target": 1}
  assert s.images["175364"].path == coco / "000000175364.jpg"


# ----------------------------------------------------------------------------- HP-FashionIQ

HP_EXCERPT = Path(__file__).parent / "data" / "hpfiq_excerpt.json"  # the release, 2 users x 2 x 3


def _hp_images(root: Path, data: dict, layout: str) -> set[str]:
  """Placeholder images for every path in `data`, in the release's `image_data/<cat>/` layout or
  the FashionIQ reader's `images/<asin>.png`."""
  paths = set()
  for sets in data.values():
    for qs in sets.values():
      paths |= set(qs["ref_img_paths"]) | set(qs["targ_img_paths"])
      for k in ("retrieved_set1", "retrieved_set2"):
        for r in qs[k]:
          paths |= set(r["img_path"])
  for p in paths:
    rel = p[len("/-/"):]
    _png(root / rel if layout == "release" else root / "images" / f"{Path(p).stem}.png")
  return {Path(p).stem for p in paths}


@pytest.mark.parametrize("layout", ["release", "images"])
def test_hpfashioniq_official_release(tmp_path, layout):
  data = json.loads(HP_EXCERPT.read_text())
  names = _hp_images(tmp_path, data, layout)
  (tmp_path / "HP_FashionIQ").mkdir()
  (tmp_path / "HP_FashionIQ" / "hpfiq.json").write_text(HP_EXCERPT.read_text())
  s = read_hpfashioniq(tmp_path)  # the FashionIQ root, file in its HP_FashionIQ/ folder
  assert len(s.queries) == 2 * 2 * 3 and set(s.images) == names
  q = s.queries[0]
  qs = data["user_1"]["question_set_1"]
  assert q.query_id == "user_1/question_set_1/0" and q.reference == "B000LUIBH8"
  assert q.text == qs["sentences"][0] and q.target == "B007RJG5BU"
  assert q.extra["set1"] == [Path(p).stem for p in qs["retrieved_set1"][0]["img_path"]]
  assert q.extra["set2"] == [Path(p).stem for p in qs["retrieved_set2"][0]["img_path"]]
  assert q.extra["preferred"] == int(qs["preferred set"][0]) and q.extra["category"] == "shirt"
  assert q.extra["user"] == "user_1" and q.extra["question_set"] == "question_set_1"
  assert q.extra["user_score"] == (int(qs["retrieved_set1"][0]["user_score"]),
                                   int(qs["retrieved_set2"][0]["user_score"]))
  want = tmp_path / ("image_data/shirt/B000LUIBH8.jpg" if layout == "release"
                     else "images/B000LUIBH8.png")
  assert s.images["B000LUIBH8"].path == want
  # The file elsewhere, given explicitly with the FashionIQ root; and with `-` substituted by
  # an absolute root, as the release's README asks users to do.
  other = tmp_path / "elsewhere.json"
  other.write_text(HP_EXCERPT.read_text().replace('"/-/', f'"{tmp_path}/'))
  t = read_hpfashioniq(other, tmp_path)
  assert [x.query_id for x in t.queries] == [x.query_id for x in s.queries]
  assert t.images["B000LUIBH8"].path.name == want.name


def test_hpfashioniq_errors_name_the_culprit(tmp_path):
  data = json.loads(HP_EXCERPT.read_text())
  _hp_images(tmp_path, data, "images")
  with pytest.raises(DataError, match="no hpfiq.json found"):
    read_hpfashioniq(tmp_path)
  _dump(tmp_path / "hpfiq.json", [{"candidate": "x"}])
  with pytest.raises(DataError, match="JSON object"):
    read_hpfashioniq(tmp_path)
  data["user_2"]["question_set_2"]["preferred set"][1] = "3"
  _dump(tmp_path / "hpfiq.json", data)
  with pytest.raises(DataError, match=r"\['user_2'\]\['question_set_2'\] index 1: 'preferred set'"):
    read_hpfashioniq(tmp_path)
  data["user_2"]["question_set_2"]["preferred set"][1] = "1"
  data["user_1"]["question_set_1"]["retrieved_set2"][2]["img_path"].pop()
  _dump(tmp_path / "hpfiq.json", data)
  with pytest.raises(DataError, match="retrieved_set2: 'img_path' must list 5"):
    read_hpfashioniq(tmp_path)
  data["user_1"]["question_set_1"]["retrieved_set2"][2]["img_path"].append("/-/image_data/x/gone.jpg")
  _dump(tmp_path / "hpfiq.json", data)
  with pytest.raises(DataError, match="gone"):
    read_hpfashioniq(tmp_path)


# ----------------------------------------------------------------------------- InstructCIR

def test_instructcir_jsonl(tmp_path):
  _png(tmp_path / "img" / "a.jpg")
  (tmp_path / "pairs.jsonl").write_text(
      json.dumps({"image": "a.jpg", "caption": "a dog"}) + "\n\n" +
      json.dumps({"image": "a.jpg", "conversations": [
          {"from": "human", "value": "<image>\nDescribe"}, {"from": "gpt", "value": "a cat"}]}))
  pairs, skipped = instructcir.read_caption_pairs(tmp_path / "pairs.jsonl", tmp_path / "img")
  assert [p.caption for p in pairs] == ["a dog", "a cat"] and skipped == 0
  trip = {"image": "a.jpg", "instruction": "make it run", "modified_caption": "a dog running",
          "original_caption": "a dog"}
  missing = dict(trip, image="b.jpg")
  (tmp_path / "trip.jsonl").write_text(json.dumps(trip) + "\n" + json.dumps(missing))
  with pytest.raises(DataError, match="b.jpg"):
    instructcir.read_instruct_triplets(tmp_path / "trip.jsonl", tmp_path / "img")
  t, skipped = instructcir.read_instruct_triplets(tmp_path / "trip.jsonl", tmp_path / "img",
                                                  on_missing="skip")
  assert len(t) == 1 and skipped == 1 and t[0].modified_caption == "a dog running"
  (tmp_path / "trip.jsonl").write_text(json.dumps(trip) + "\n{bad json\n")
  with pytest.raises(DataError, match="line 2"):
    instructcir.read_instruct_triplets(tmp_path / "trip.jsonl", tmp_path / "img")
  (tmp_path / "trip.jsonl").write_text(json.dumps({"image": "a.jpg", "instruction": "x"}))
  with pytest.raises(DataError, match="record 1: missing key 'modified_caption'"):
    instructcir.read_instruct_triplets(tmp_path / "trip.jsonl", tmp_path / "img")

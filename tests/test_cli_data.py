"""`cirjax data check` on the released annotation files: counts, layouts, undecodable images."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirjax import cli
from tests.test_data_readers import _cirr_release


def _check(capsys, *args):
  code = cli.main(["data", "check", *args])
  out, err = capsys.readouterr()
  return code, out, err


def test_check_counts_and_detects_layout(tmp_path, capsys):
  root = _cirr_release(tmp_path, "clip4cir")
  code, out, _ = _check(capsys, "--dataset", "cirr", "--root", str(root), "--split", "val")
  stats = json.loads(out)
  assert code == 0 and stats["queries"] == 3 and stats["corpus_images"] == 12
  code, _, err = _check(capsys, "--dataset", "cirr", "--root", str(root), "--layout", "release")
  assert code == 1 and str(root / "image_splits" / "split.rc2.val.json") in err


def test_check_decodes_every_image(tmp_path, capsys):
  root = _cirr_release(tmp_path, "release")
  imgs = sorted((root / "img_raw" / "dev").glob("*.png"))
  noisy = io.BytesIO()  # big enough that 60 bytes end inside the pixel data
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(noisy, "PNG")
  bad = {imgs[0]: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,  # random bytes after a PNG magic
         imgs[1]: b"",                                             # zero bytes
         imgs[2]: b"this is a text file, not an image\n",
         imgs[3]: noisy.getvalue()[:60]}                           # a PNG cut after 60 bytes
  for p, data in bad.items():
    p.write_bytes(data)
  code, out, err = _check(capsys, "--dataset", "cirr", "--root", str(root), "--num-workers", "2")
  assert code == 1 and "4 image file(s) cannot be decoded" in err and out == ""
  for p in bad:
    assert str(p) in err
  assert "Traceback" not in err
  # Existence alone passes them; --skip-missing drops them and every query that uses one.
  code, out, _ = _check(capsys, "--dataset", "cirr", "--root", str(root), "--no-decode")
  assert code == 0
  # --skip-missing: one broken image, not used by the first query, drops only what uses it.
  caps = json.loads((root / "captions" / "cap.rc2.val.json").read_text())
  first = {caps[0]["reference"], caps[0]["target_hard"], *caps[0]["img_set"]["members"]}
  other = next(p for p in sorted((root / "img_raw" / "dev").glob("*.png")) if p.stem not in first)
  for p in bad:
    Image.new("RGB", (8, 6)).save(p)
  other.write_bytes(b"")
  code, out, err = _check(capsys, "--dataset", "cirr", "--root", str(root), "--skip-missing")
  stats = json.loads(out)
  assert code == 0 and stats["skipped"]["undecodable_images"] == 1
  assert 1 <= stats["queries"] < 3 and stats["corpus_images"] == 11


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_check_rejects_bad_worker_counts(tmp_path, capsys, workers):
  root = _cirr_release(tmp_path, "flat")
  with pytest.raises(SystemExit) as e:
    cli.main(["data", "check", "--dataset", "cirr", "--root", str(root), "--num-workers", workers])
  assert e.value.code == 2 and "--num-workers" in capsys.readouterr().err


FIQ_EXCERPT = Path(__file__).parent / "data" / "fashioniq"  # the release's files, cut short


def _fiq_release(tmp_path: Path, layout: str) -> Path:
  """The release's annotation files + placeholder images as `images/<asin>.png` (CLIP4Cir,
  SPRC, QuRe) or `image_data/<category>/<asin>.jpg` (the official download scripts)."""
  root = tmp_path / layout
  for sub in ("captions", "image_splits"):
    shutil.copytree(FIQ_EXCERPT / sub, root / sub)
  for f in (root / "image_splits").glob("split.*.json"):
    cat, split = f.name.split(".")[1:3]
    names = set(json.loads(f.read_text()))
    for e in json.loads((root / "captions" / f"cap.{cat}.{split}.json").read_text()):
      names |= {e["candidate"], e.get("target")} - {None}
    for n in names:
      p = (root / "images" / f"{n}.png" if layout == "images"
           else root / "image_data" / cat / f"{n}.jpg")
      p.parent.mkdir(parents=True, exist_ok=True)
      Image.new("RGB", (8, 6)).save(p)
  return root


@pytest.mark.parametrize("layout", ["images", "image_data"])
def test_check_fashioniq_split_means_all_categories(tmp_path, capsys, layout):
  root = _fiq_release(tmp_path, layout)
  code, out, _ = _check(capsys, "--dataset", "fashioniq", "--root", str(root))
  report = json.loads(out)
  assert code == 0
  assert [s["split"] for s in report["splits"]] == [
      "fashioniq/dress.val", "fashioniq/shirt.val", "fashioniq/toptee.val"]
  assert report["total"]["queries"] == 6
  code, out, _ = _check(capsys, "--dataset", "fashioniq", "--root", str(root), "--split", "train")
  assert code == 0 and len(json.loads(out)["splits"]) == 3
  code, out, _ = _check(capsys, "--dataset", "fashioniq", "--root", str(root),
                        "--split", "shirt.test")
  stats = json.loads(out)
  assert code == 0 and stats["split"] == "fashioniq/shirt.test" and stats["with_target"] == 0
  code, _, err = _check(capsys, "--dataset", "fashioniq", "--root", str(root), "--split", "dev")
  assert code == 1 and "must be one of" in err and "'dev'" in err


def test_check_genecis_needs_a_task(tmp_path, capsys):
  code, _, err = _check(capsys, "--dataset", "genecis", "--root", str(tmp_path))
  assert code == 1 and "--split" in err and "change_object" in err


@pytest.mark.parametrize("argv", [
    ["eval", "--dataset", "synthetic", "--root", ".", "--baseline", "random", "--batch-size", "0"],
    ["eval", "--dataset", "synthetic", "--root", ".", "--baseline", "random", "--image-size", "-3"],
    ["search", "--checkpoint", ".", "--corpus", ".", "--reference", "r.png", "--text", "x",
     "--k", "0"],
])
def test_counts_must_be_positive(capsys, argv):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and "must be a positive integer" in err and "Traceback" not in err

"""The pixel store: uint8 pixels normalise to the decoded float32 bits; built once, reused,
rebuilt when an image file changes or the store is damaged (never used damaged); 'auto'
decodes when the disk lacks the space; both tasks' batches are the same with and without it."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from cirjax.data import images, loader, pixel_store, row_store, synth
from cirjax.data.records import DataError, ImageRef


def _write_images(d, n=7):
  """Images of several sizes and aspect ratios (some padded by targetpad, some not)."""
  d.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  refs = {}
  for i in range(n):
    w, h = [(40, 30), (30, 41), (64, 20), (25, 25), (50, 37), (18, 60), (33, 29)][i % 7]
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    p = d / f"im{i}.png"
    Image.fromarray(arr).save(p)
    refs[f"im{i}"] = ImageRef(str(p))
  return refs


def _pixels(refs, name="targetpad", dim=16):
  return loader.Pixels(images.make_transform(name, dim),
                       lambda n: images.load_image(refs[n]))


def _open(px, refs, tmp_path, mode="on", logs=None, **kw):
  return px.open_store({"pixel_store": mode, "workers": 2, **kw}, str(tmp_path / "wd"),
                       list(refs), refs, reads_per_image=1.0,
                       log=(logs.append if logs is not None else lambda m: None))


@pytest.mark.parametrize("name", ["targetpad", "squarepad", "clip"])
def test_stored_uint8_normalises_to_the_decoded_bits(tmp_path, name):
  refs = _write_images(tmp_path / "img")
  tf = images.make_transform(name, 16)
  want = np.stack([tf(images.load_image(r)) for r in refs.values()])
  u8 = np.stack([tf.pixels(images.load_image(r)) for r in refs.values()])
  assert u8.dtype == np.uint8 and u8.shape == (7, 16, 16, 3)
  got = images.normalize_pixels(u8)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)  # bit for bit, batched or not


def test_build_reuse_and_batches_identical_to_decoding(tmp_path):
  refs = _write_images(tmp_path / "img")
  decoded = _pixels(refs)
  names = ["im3", "im0", "im3", "im6"]
  want = decoded(names)
  px = _pixels(refs)
  stats = _open(px, refs, tmp_path)
  assert stats["pixel_store_built"] and stats["pixel_store_shape"] == [7, 16, 16, 3]
  assert stats["pixel_store_bytes"] == 7 * 16 * 16 * 3
  assert px.store.dtype == np.uint8 and "pixel store" in px.store.describe()
  px.source = None  # from now on nothing is decoded
  np.testing.assert_array_equal(px(names), want)
  again = _pixels(refs)
  stats = _open(again, refs, tmp_path)
  assert not stats["pixel_store_built"]  # a resumed run reuses it
  again.source = None
  np.testing.assert_array_equal(again(names), want)


def test_a_changed_image_file_rebuilds_the_store(tmp_path):
  refs = _write_images(tmp_path / "img")
  first = _pixels(refs)
  _open(first, refs, tmp_path)
  old = first.store.path
  Image.new("RGB", (41, 30), (200, 10, 10)).save(refs["im2"].path)  # another size, mtime
  px = _pixels(refs)
  assert _open(px, refs, tmp_path)["pixel_store_built"]
  assert px.store.path != old and not old.exists()  # the stale store of this run is gone
  np.testing.assert_array_equal(px(["im2"]), _pixels(refs)(["im2"]))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_store_is_detected_and_rebuilt_never_used(tmp_path, damage):
  refs = _write_images(tmp_path / "img")
  px = _pixels(refs)
  _open(px, refs, tmp_path)
  path = px.store.path
  want = _pixels(refs)(list(refs))
  del px
  b = bytearray(path.read_bytes())
  if damage == "flip":
    b[100] ^= 0xFF
  else:
    b = b[:-5]
  path.write_bytes(bytes(b))
  logs = []
  px = _pixels(refs)
  assert _open(px, refs, tmp_path, logs=logs)["pixel_store_built"]
  assert any("not usable, rebuilding" in m and ("checksum" in m or "truncated" in m)
             for m in logs)
  np.testing.assert_array_equal(px(list(refs)), want)


def test_auto_modes_space_and_a_shared_directory(tmp_path, monkeypatch):
  refs = _write_images(tmp_path / "img")
  assert not pixel_store.wanted("auto", 1.0) and pixel_store.wanted("auto", 2.0)
  assert pixel_store.wanted("on", 0.5) and not pixel_store.wanted("off", 9.0)
  with pytest.raises(ValueError, match="config.data.pixel_store='yes'"):
    pixel_store.mode({"pixel_store": "yes"})
  assert _open(_pixels(refs), refs, tmp_path, mode="off") == {}
  assert _open(_pixels(refs), refs, tmp_path, mode="auto") == {}  # read once: decode
  Usage = type("Usage", (), {"free": 10})
  monkeypatch.setattr(row_store.shutil, "disk_usage", lambda _: Usage)
  px, logs = _pixels(refs), []
  stats = px.open_store({"pixel_store": "auto"}, str(tmp_path / "wd"), list(refs), refs,
                        reads_per_image=3.0, log=logs.append)
  assert stats == {} and px.store is None and "free" in logs[-1]
  with pytest.raises(row_store.NoSpaceError, match="GiB free"):
    _open(_pixels(refs), refs, tmp_path)
  d = tmp_path / "wd" / "pixel_store"  # nothing written but the (released, empty) build lock
  assert not d.exists() or [(p.name, p.stat().st_size) for p in d.iterdir()] == \
      [(".pixels.lock", 0)]
  monkeypatch.undo()
  # A given directory may hold other runs' stores: a new store leaves them.
  shared = str(tmp_path / "shared")
  _open(_pixels(refs), refs, tmp_path, pixel_store_dir=shared)
  other = {k: refs[k] for k in list(refs)[:3]}
  _open(_pixels(other), other, tmp_path, pixel_store_dir=shared)
  assert len(list((tmp_path / "shared").glob("pixels_*.bin"))) == 2
  with pytest.raises(DataError, match="image file not found"):
    pixel_store.image_identity("x", str(tmp_path / "nope.png"))


def test_process_shares_cover_every_row_once():
  for n in (0, 1, 7, 100):
    for p in (1, 2, 3, 8):
      spans = [row_store.share(n, p, i) for i in range(p)]
      assert spans[0][0] == 0 and spans[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


# ------------------------------------------------------------------------------ the tasks

def _mesh1():
  from cirjax.train import sharding as shd
  return shd.make_mesh((("data", -1), ("fsdp", 1)), jax.devices()[:1])


def _qure(root, wd, *overrides):
  from pathlib import Path
  from cirjax.train import config_utils, qure
  repo = Path(__file__).resolve().parents[1]
  cfg = config_utils.load_config(str(repo / "configs/synthetic.py") + ":tiny",
                                 [f"data.root={root}", "qure.cache_features=False",
                                  *overrides])
  return qure.QuReTask(cfg, _mesh1(), str(wd))


def test_qure_batches_are_identical_with_the_store_and_it_is_reused(tmp_path):
  root = tmp_path / "data"
  synth.generate(root, synth.SynthConfig(seed=0, resolution=32, num_images=(60, 60, 20),
                                         num_queries=(64, 32, 16)), progress=None)
  task = _qure(root, tmp_path / "wd")  # 'auto': uncached QuRe reads every image repeatedly
  task.begin_epoch(0, None)
  stats = task.images.pixel_store_stats
  assert stats["pixel_store_built"] and stats["pixel_store_shape"][0] == len(task.image_names)
  px = task.images.decoded
  source, px.source = px.source, None  # nothing is decoded while the store is open
  every = np.arange(len(task.image_names))
  stored = [task.batch(0, i) for i in range(2)] + [task.images.pixels(every)]
  px.source, px.store, px._row = source, None, {}  # pylint: disable=protected-access  (decode)
  decoded = [task.batch(0, i) for i in range(2)] + [task.images.pixels(every)]
  assert "ref_pixels" in decoded[0]
  jax.tree.map(np.testing.assert_array_equal, stored, decoded)
  # Cached features: each image is read once, for the feature store.
  assert task.images.open_pixel_store(cached=True) == {}
  again = task.images.open_pixel_store(cached=False)  # as a resumed run
  assert not again["pixel_store_built"]
  assert again["pixel_store_path"] == stats["pixel_store_path"]


def _triplets(root):
  (root / "img").mkdir(parents=True)
  rng = np.random.default_rng(1)
  with open(root / "triplets.jsonl", "w") as f:
    for i in range(24):
      Image.fromarray(rng.integers(0, 256, size=(30, 40 + i, 3), dtype=np.uint8)).save(
          root / "img" / f"{i}.jpg")
      f.write(json.dumps({"image": f"{i}.jpg", "instruction": f"make it number {i + 1}",
                          "modified_caption": f"a dog number {i + 1}",
                          "original_caption": f"a dog number {i}"}) + "\n")


def test_instructcir_batches_are_identical_with_the_store(tmp_path):
  from pathlib import Path
  from cirjax.train import config_utils
  from cirjax.train.instructcir import InstructCIRTask
  _triplets(tmp_path / "d")
  repo = Path(__file__).resolve().parents[1]

  def task(wd, *overrides):
    cfg = config_utils.load_config(
        str(repo / "configs/instructcir_stage2.py") + ":tiny",
        ["data.source=jsonl", f"data.train_file={tmp_path / 'd' / 'triplets'}.jsonl",
         f"data.image_root={tmp_path / 'd' / 'img'}", "train.batch_size=8",
         "allow_scratch_stage2=True", *overrides])
    t = InstructCIRTask(cfg, _mesh1(), str(tmp_path / wd))
    t.begin_epoch(0, None)
    return t

  off = task("off", "train.epochs=2", "data.pixel_store=off")
  on = task("on", "train.epochs=2")  # 'auto': two epochs read each image twice
  once = task("once")                # 'auto', one epoch: decoding overlaps the steps
  assert off.pixel_store_stats == {} and once.pixel_store_stats == {}
  assert on.pixel_store_stats["pixel_store_built"]
  on._images.source = None  # pylint: disable=protected-access
  for i in range(3):
    a, b = off.batch(1, i), on.batch(1, i)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_build_reports_progress(tmp_path, monkeypatch):
  refs = _write_images(tmp_path / "img")
  logs = []
  _open(_pixels(refs), refs, tmp_path, logs=logs)
  assert any(m.startswith("pixel store: 7/7 rows in ") for m in logs), logs
  # Lines come every `every_s` seconds while a long build runs, with the rate and time left.
  msgs = []
  progress = row_store.BuildProgress("feature store", 4, msgs.append, every_s=0.0)
  for done in range(1, 5):
    progress(done)
  assert msgs[0].startswith("feature store: 1/4 rows (") and "s left)" in msgs[0]
  assert msgs[-1].startswith("feature store: 4/4 rows in ")

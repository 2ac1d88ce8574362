"""TFDS builders (ArrayRecord, no TensorFlow): the built split reads back identical to the
on-disk reader, feeds the loader and the evaluator, and bad input fails the build clearly.
TFDS and array_record are the optional `tfds` extra (the `test` extra includes it): without
them every test but the missing-extra one skips, and the commands fail with one clear error."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirjax.data import images, loader, read_fashioniq, synth, tfds_builders
from cirjax.data.tokenizer import load_tokenizer
from cirjax.data.records import DataError
from cirjax.eval import evaluate, retrieval

NEEDS_TFDS = pytest.mark.skipif(
    not tfds_builders.installed(),
    reason="the optional `tfds` extra (tensorflow-datasets, array_record) is not installed")

TINY = synth.SynthConfig(seed=4, resolution=16, num_images=(120, 90, 40),
                         num_queries=(20, 12, 6))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("synth_tfds")
  synth.generate(root, TINY, progress=None)
  data_dir = tmp_path_factory.mktemp("tfds_data")
  tfds_builders.build("synthetic", root, data_dir)
  return root, data_dir


def test_tensorflow_is_not_needed():
  import importlib.util
  # The whole point of the ArrayRecord path: these tests pass without TensorFlow installed.
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("tensorflow is installed here; nothing to check")


@NEEDS_TFDS
def test_built_split_reads_back_identical(built):
  root, data_dir = built
  for split in synth.SPLITS:
    want = synth.read_synthetic(root, split)
    got, source = tfds_builders.load_split(data_dir, "synthetic", split)
    assert got.corpus == want.corpus
    assert [q.query_id for q in got.queries] == [q.query_id for q in want.queries]
    for a, b in zip(got.queries, want.queries):
      assert (a.reference, a.text, a.target, a.relevant, a.subset) == \
             (b.reference, b.text, b.target, b.relevant, b.subset)
      assert a.extra == json.loads(json.dumps(b.extra))
    for n in want.corpus[:5] + [want.queries[0].reference]:
      np.testing.assert_array_equal(np.asarray(source(n)),
                                    np.asarray(images.load_image(want.images[n])))
  with pytest.raises(DataError, match="no split 'nope'"):
    tfds_builders.load_split(data_dir, "synthetic", "nope")


@NEEDS_TFDS
def test_loader_and_eval_from_tfds(built):
  root, data_dir = built
  tok = load_tokenizer(root / "vocab.txt", "blip2")
  tf = images.make_transform("clip", 16)
  tk = loader.bert_tokenize_fn(tok, 12)
  s_tfds, source = tfds_builders.load_split(data_dir, "synthetic", "train")
  s_file = synth.read_synthetic(root, "train")
  targets = [q.target for q in s_file.queries[:8]]
  pairs = [(loader.image_batches(s_tfds, targets, tf, 4, image_source=source),
            loader.image_batches(s_file, targets, tf, 4)),
           (loader.query_batches(s_tfds, tf, tk, 4, image_source=source),
            loader.query_batches(s_file, tf, tk, 4))]
  for from_tfds, from_files in pairs:
    for a, b in zip(from_tfds, from_files):
      for x, y in zip(a if isinstance(a, tuple) else [a], b if isinstance(b, tuple) else [b]):
        np.testing.assert_array_equal(x, y)
  v, _ = tfds_builders.load_split(data_dir, "synthetic", "val")
  res = evaluate.evaluate_split(v, evaluate.baseline_scorer("oracle", v), retrieval.make_mesh())
  assert res.metrics["R@1"] == 100.0 and res.metrics["mAP@5"] == pytest.approx(100.0)


@NEEDS_TFDS
def test_generated_synthetic_and_not_built_error(tmp_path):
  cfg = synth.SynthConfig(seed=1, resolution=8, num_images=(100, 80, 40), num_queries=(5, 5, 5))
  tfds_builders.build("synthetic", None, tmp_path / "gen", synth_config=cfg)
  s, _ = tfds_builders.load_split(tmp_path / "gen", "synthetic", "val")
  assert len(s.queries) == 5 and len(s.corpus) == 80
  with pytest.raises(DataError, match="is not built"):
    tfds_builders.load_split(tmp_path / "empty", "cirr", "val")


@NEEDS_TFDS
def test_fashioniq_build_and_bad_input(tmp_path):
  root = tmp_path / "fiq"
  names = ["B001", "B002", "B003"]
  (root / "image_splits").mkdir(parents=True)
  (root / "captions").mkdir()
  (root / "images").mkdir()
  (root / "image_splits" / "split.shirt.val.json").write_text(json.dumps(names))
  (root / "captions" / "cap.shirt.val.json").write_text(json.dumps(
      [{"candidate": "B001", "target": "B003", "captions": ["is blue.", "longer"]}]))
  for i, n in enumerate(names):
    Image.new("RGB", (10, 14), (i * 60, 0, 0)).save(root / "images" / f"{n}.png")
  assert tfds_builders.available_splits("fashioniq", root) == ["shirt_val"]
  tfds_builders.build("fashioniq", root, tmp_path / "d")
  s, src = tfds_builders.load_split(tmp_path / "d", "fashioniq", "shirt_val")
  want = read_fashioniq(root, "shirt", "val")
  assert s.name == want.name and s.corpus == names
  assert s.queries[0].text == "Is blue and longer"
  assert np.asarray(src("B002")).shape == (14, 10, 3)
  # A malformed caption file fails the build, naming the file.
  (root / "captions" / "cap.shirt.val.json").write_text("[{oops")
  with pytest.raises(DataError, match=r"cap\.shirt\.val\.json"):
    tfds_builders.build("fashioniq", root, tmp_path / "d2")
  with pytest.raises(DataError, match="no split files"):
    tfds_builders.available_splits("cirr", tmp_path / "nothing")


@NEEDS_TFDS
def test_cli_eval_from_a_tfds_build(built, tmp_path):
  from cirjax import cli
  root, data_dir = built
  for src, out in ((["--root", str(root)], "a.json"), (["--tfds-dir", str(data_dir)], "b.json")):
    assert cli.main(["eval", "--dataset", "synthetic", *src, "--baseline", "random",
                     "--out", str(tmp_path / out)]) == 0
  a = json.loads((tmp_path / "a.json").read_text())["splits"]["synthetic/val"]["metrics"]
  b = json.loads((tmp_path / "b.json").read_text())["splits"]["synthetic/val"]["metrics"]
  assert a == b
  assert cli.main(["eval", "--dataset", "synthetic", "--baseline", "random"]) == 1


@NEEDS_TFDS
def test_registered_with_tfds(built):
  import tensorflow_datasets as tfds
  root, data_dir = built
  for name in tfds_builders.BUILDERS.values():
    assert name in tfds.list_builders(with_community_datasets=False)
  src = tfds.data_source("cirjax_synthetic/images", split="val", data_dir=str(data_dir),
                         decoders={"image": tfds.decode.SkipDecoding()})
  assert len(src) == len(synth.read_synthetic(root, "val").images)


def test_without_the_tfds_extra_commands_fail_with_one_clear_error(tmp_path):
  # A fresh interpreter in which neither optional package can be imported (a None entry in
  # sys.modules blocks an import): importing cirjax's commands still works, and both commands
  # that need the extra exit 1 naming it, before anything is written.
  script = textwrap.dedent("""
      import sys
      sys.modules["tensorflow_datasets"] = None
      sys.modules["array_record"] = None
      from cirjax import cli
      from cirjax.data import tfds_builders
      assert not tfds_builders.installed()
      out = sys.argv[1]
      print("RC", cli.main(["data", "tfds", "--dataset", "synthetic", "--root", out,
                            "--data-dir", out + "/tfds"]))
      print("RC", cli.main(["eval", "--dataset", "synthetic", "--tfds-dir", out + "/tfds",
                            "--baseline", "random"]))
      """)
  env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
  r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["RC", "1", "RC", "1"], r.stdout
  errors = [l for l in r.stderr.splitlines() if "error:" in l]
  assert len(errors) == 2, r.stderr
  for line in errors:
    assert "tensorflow_datasets, array_record" in line and "'.[tfds]'" in line, line
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "tfds").exists()

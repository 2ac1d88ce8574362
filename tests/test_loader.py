"""The batched loader: seed-deterministic, resumable at a step, process-sharded, ordered eval."""

import numpy as np
import pytest

from cirjax.data import images, loader, synth, text
from cirjax.data.records import DataError

TINY = synth.SynthConfig(seed=2, resolution=16, num_images=(120, 90, 40),
                         num_queries=(26, 10, 5))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth_loader")
  synth.generate(out, TINY, progress=None)
  return out, synth.read_synthetic(out, "train")


def _loader(root, split, seed=0, **kw):
  tok = text.load_bert_tokenizer(root / "vocab.txt")
  return loader.TripletLoader(split, images.make_transform("clip", 16),
                              loader.bert_tokenize_fn(tok, 12), batch_size=4, seed=seed,
                              num_threads=2, **kw)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_are_deterministic_and_cover_the_epoch(split):
  root, s = split
  ld = _loader(root, s, seed=7)
  assert ld.steps_per_epoch == 26 // 4
  b = ld.batch(0, 0)
  assert b["reference_pixels"].shape == (4, 16, 16, 3) and b["input_ids"].shape == (4, 12)
  assert b["reference_pixels"].dtype == np.float32 and b["input_ids"].dtype == np.int32
  _same(b, _loader(root, s, seed=7).batch(0, 0))
  assert not np.array_equal(ld.indices(0, 0), _loader(root, s, seed=8).indices(0, 0))
  assert not np.array_equal(ld.order(0), ld.order(1))  # a fresh order every epoch
  seen = np.concatenate([ld.indices(0, i) for i in range(ld.steps_per_epoch)])
  assert len(set(seen.tolist())) == len(seen) == 24
  # The targets point into the mining corpus and match the query's target name.
  for qi, ti in zip(b["query_index"], b["target_index"]):
    assert s.corpus[ti] == s.queries[qi].target


def test_resume_at_a_step_gives_the_same_batches(split):
  root, s = split
  ld = _loader(root, s, seed=3)
  full = list(ld.epoch(1))
  assert len(full) == ld.steps_per_epoch
  resumed = list(_loader(root, s, seed=3).epoch(1, start_step=4))
  assert len(resumed) == ld.steps_per_epoch - 4
  for a, b in zip(full[4:], resumed):
    _same(a, b)
  with pytest.raises(IndexError):
    ld.batch(0, ld.steps_per_epoch)


def test_process_shards_partition_the_global_batch(split):
  root, s = split
  whole = _loader(root, s, seed=1).indices(2, 3)
  parts = [_loader(root, s, seed=1, process_index=i, process_count=2).indices(2, 3)
           for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  with pytest.raises(ValueError, match="does not split"):
    _loader(root, s, process_count=3)
  with pytest.raises(ValueError, match="drop_remainder=True"):
    _loader(root, s, process_count=2, drop_remainder=False)
  # Without dropping, the last batch is partial and nothing is lost.
  ld = _loader(root, s, drop_remainder=False)
  assert ld.steps_per_epoch == 7 and len(ld.indices(0, 6)) == 26 - 24


def test_eval_batches_are_in_order(split):
  root, s = split
  tf = images.make_transform("clip", 16)
  got = np.concatenate(list(loader.image_batches(s, s.corpus[:9], tf, 4, num_threads=2)))
  want = np.stack([tf(images.load_image(s.images[n])) for n in s.corpus[:9]])
  np.testing.assert_array_equal(got, want)
  tok = text.load_bert_tokenizer(root / "vocab.txt")
  qb = list(loader.query_batches(s, tf, loader.bert_tokenize_fn(tok, 12), 8, num_threads=2))
  assert sum(b[0].shape[0] for b in qb) == len(s.queries)
  ids, _ = text.tokenize(tok, [s.queries[9].text], 12)
  np.testing.assert_array_equal(qb[1][1][1], ids[0])
  with pytest.raises(DataError, match="no images"):
    next(loader.image_batches(s, [], tf, 4))


def test_too_few_queries_for_a_batch(split):
  root, s = split
  import dataclasses
  small = dataclasses.replace(s, queries=s.queries[:3])
  with pytest.raises(DataError, match="fewer than one batch"):
    _loader(root, small)


def test_record_loader_for_instructcir_records(tmp_path):
  """InstructCIR triplets through the generic loader: deterministic, resumable, complete."""
  import json
  from PIL import Image
  from cirjax.data import instructcir
  lines = []
  for i in range(10):
    Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "instruction": f"make it {i}",
                             "modified_caption": f"m{i}", "original_caption": f"o{i}"}))
  (tmp_path / "t.jsonl").write_text("\n".join(lines))
  recs, skipped = instructcir.read_instruct_triplets(tmp_path / "t.jsonl", tmp_path)
  assert skipped == 0
  tf = images.make_transform("clip", 8)

  def collate(rs):
    return {"pixels": np.stack([tf(images.open_rgb(r.image)) for r in rs]),
            "n": np.array([int(r.modified_caption[1:]) for r in rs])}

  ld = loader.RecordLoader(recs, collate, batch_size=3, seed=5, num_threads=2)
  assert ld.steps_per_epoch == 3
  full = list(ld.epoch(0))
  again = list(loader.RecordLoader(recs, collate, 3, seed=5).epoch(0, start_step=1))
  for a, b in zip(full[1:], again):
    np.testing.assert_array_equal(a["pixels"], b["pixels"])
    np.testing.assert_array_equal(a["record_index"], b["record_index"])
  seen = np.concatenate([b["n"] for b in full])
  assert len(set(seen.tolist())) == 9
  np.testing.assert_array_equal(seen, np.concatenate([b["record_index"] for b in full]))
  with pytest.raises(DataError, match="empty"):
    loader.RecordLoader([], collate, 3)
  with pytest.raises(IndexError):
    next(ld.epoch(0, start_step=9))

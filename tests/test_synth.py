"""The synthetic benchmark: deterministic, readable as CIRR, relevant sets verified by
recomputing them from the attributes file, vocabulary covering every word."""

import filecmp
import json

import numpy as np
import pytest

from cirjax.data import read_cirr, synth, text
from cirjax.data.tokenizer import load_tokenizer

TINY = synth.SynthConfig(seed=3, resolution=32, num_images=(120, 90, 40),
                         num_queries=(60, 40, 20))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth")
  synth.generate(out, TINY, progress=None)
  return out


def test_deterministic_for_a_seed(root, tmp_path):
  synth.generate(tmp_path / "again", TINY, progress=None)
  for rel in ["captions/cap.rc2.val.json", "annotations/train.json", "attributes/test1.json",
              "vocab.txt", "images/val/val-00007.png"]:
    assert filecmp.cmp(root / rel, tmp_path / "again" / rel, shallow=False), rel
  other = synth.SynthConfig(**{**TINY.__dict__, "seed": 4})
  synth.generate(tmp_path / "other", other, progress=None)
  assert not filecmp.cmp(root / "captions/cap.rc2.val.json",
                         tmp_path / "other/captions/cap.rc2.val.json", shallow=False)


def test_cirr_layout_and_relevant_sets_recomputed_from_attributes(root):
  for split in synth.SPLITS:
    plain = read_cirr(root, split)  # the CIRR reader reads it as CIRR
    assert len(plain.corpus) == TINY.num_images[synth.SPLITS.index(split)]
    s = synth.read_synthetic(root, split)
    ann = {str(a["id"]): a for a in json.loads((root / "annotations" / f"{split}.json").read_text())}
    attrs = json.loads((root / "attributes" / f"{split}.json").read_text())["attributes"]
    for q in s.queries:
      mod = ann[q.query_id]["modification"]
      assert 1 <= len(mod) <= 2
      expected = synth.recompute_relevant(root, split, q.reference, mod)
      assert sorted(q.relevant) == expected
      assert q.relevant[0] == q.target and q.reference not in q.relevant
      assert attrs[q.target] != attrs[q.reference]
      # img_set: reference + target + non-relevant others.
      assert q.target in q.subset and len(q.subset) == TINY.set_size - 1
      assert not set(q.subset) - {q.target} & set(q.relevant)
      for a, v in mod.items():
        if a in ("colour", "background"):
          assert v in q.text, (q.text, mod)
    if split == "test1":
      assert all("target_hard" not in e for e in
                 json.loads((root / "captions" / "cap.rc2.test1.json").read_text()))


def test_queries_have_several_relevant_images(root):
  s = synth.read_synthetic(root, "train")
  sizes = np.array([len(q.relevant) for q in s.queries])
  assert 2.0 <= sizes.mean() <= 5.0 and sizes.max() <= TINY.max_duplicates


def test_vocab_covers_every_word(root):
  tok = load_tokenizer(root, "blip2")
  unk = tok.convert_tokens_to_ids("[UNK]")
  for split in synth.SPLITS:
    caps = [q.text for q in synth.read_synthetic(root, split).queries]
    ids, _ = text.tokenize(tok, caps)
    assert not (ids == unk).any()


def test_render_shows_the_attributes():
  j = {"dx": 0.0, "dy": 0.0, "scale": 1.0, "rot": 0.0, "tint": [0, 0, 0], "bg_tint": 0}
  a = {"shape": "square", "colour": "blue", "size": "large", "position": "left",
       "pattern": "solid", "background": "white"}
  im = np.asarray(synth.render(a, j, 64)).astype(int)
  assert np.abs(im[32, 16] - synth._RGB["blue"]).max() < 10    # object at the left
  assert np.abs(im[32, 48] - synth._BG["white"]).max() < 10    # background on the right
  small = np.asarray(synth.render(dict(a, size="small"), j, 64)).astype(int)
  area = lambda x: (np.abs(x - synth._BG["white"]).sum(-1) > 30).sum()
  assert area(im) > 2 * area(small)

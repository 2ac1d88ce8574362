"""Image pipelines reproduce the reference semantics; BERT tokenization from an offline vocab."""

import numpy as np
import pytest
from PIL import Image

from cirjax.data import images, text
from cirjax.data.tokenizer import load_tokenizer
from cirjax.data.records import DataError, ImageRef


def _gradient(w, h):
  x = np.arange(w)[None, :, None] * 7 + np.arange(h)[:, None, None] * 3
  arr = np.concatenate([x % 256, (x * 2) % 256, (255 - x) % 256], axis=2).astype(np.uint8)
  return Image.fromarray(arr)


def test_target_pad_follows_reference_arithmetic():
  # 300x100: ratio 3 >= 1.25 -> scaled = 240; hp = max(int(-30), 0) = 0, vp = int(70) = 70.
  out = images.target_pad(_gradient(300, 100), 1.25)
  assert out.size == (300, 240)
  arr = np.asarray(out)
  assert (arr[:70] == 0).all() and (arr[-70:] == 0).all() and arr[70:170].any()
  # Ratio below the target: untouched.
  im = _gradient(120, 100)
  assert images.target_pad(im, 1.25) is im
  # Tall image: pads left/right.
  assert images.target_pad(_gradient(100, 250), 1.25).size == (200, 250)


def test_resize_and_center_crop_match_torchvision_rules():
  im = _gradient(300, 240)
  r = images.resize_shortest(im, 224)
  assert r.size == (int(224 * 300 / 240), 224)  # (280, 224)
  c = images.center_crop(r, 224)
  assert c.size == (224, 224)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(r)[:, 28:252])


def test_targetpad_transform_end_to_end():
  im = _gradient(300, 100)
  x = images.targetpad_transform(1.25, 224)(im)
  assert x.shape == (224, 224, 3) and x.dtype == np.float32
  # Manual pipeline: pad -> resize (bicubic) -> crop -> /255 -> CLIP normalise.
  p = images.target_pad(im, 1.25).resize((280, 224), Image.BICUBIC)
  ref = np.asarray(p, np.float32)[:, 28:252] / 255.0
  ref = (ref - np.array(images.CLIP_MEAN, np.float32)) / np.array(images.CLIP_STD, np.float32)
  np.testing.assert_allclose(x, ref, rtol=0, atol=1e-6)
  # Black padding normalises to -mean/std.
  np.testing.assert_allclose(x[0, 0], -np.array(images.CLIP_MEAN) / np.array(images.CLIP_STD),
                             rtol=1e-6)


def test_clip_transform_square_input_is_plain_resize():
  im = _gradient(64, 64)
  x = images.clip_transform(32)(im)
  ref = images.normalize(im.resize((32, 32), Image.BICUBIC))
  np.testing.assert_allclose(x, ref, atol=1e-6)


def test_missing_and_corrupt_images_name_the_file(tmp_path):
  with pytest.raises(DataError, match="nope.png"):
    images.load_image(tmp_path / "nope.png")
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(DataError, match="cannot decode.*bad.png"):
    images.load_image(tmp_path / "bad.png")


def test_genecis_crop(tmp_path):
  _gradient(100, 80).save(tmp_path / "1.jpg")
  im = images.load_image(ImageRef(tmp_path / "1.jpg", bbox=(10, 10, 20, 10)))
  assert im.size[0] == im.size[1] == 34  # 20*1.7 wide, 10*1.7 tall, padded square


def test_fashioniq_caption_join():
  assert text.fashioniq_caption(["is red.", "has sleeves?"]) == "Is red and has sleeves"
  with pytest.raises(ValueError):
    text.fashioniq_caption(["one"])


def test_bert_tokenizer_from_vocab_adds_dec(tmp_path):
  words = list(text.SPECIAL_TOKENS) + ["make", "it", "red", "a", "circle", "."]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  tok = load_tokenizer(tmp_path, "blip2")
  assert len(tok) == len(words) + 1 and "[DEC]" in tok.get_vocab()
  ids, mask = text.tokenize(tok, ["Make it RED.", "a circle " * 40])
  assert ids.shape == (2, 32) and ids.dtype == np.int32
  v = tok.get_vocab()
  assert v["[PAD]"] == 0 and v["make"] == 5 and v["."] == 10  # line order = token id
  assert list(ids[0, :6]) == [v["[CLS]"], v["make"], v["it"], v["red"], v["."], v["[SEP]"]]
  assert mask[0].sum() == 6 and mask[1].sum() == 32  # truncated to max_length
  assert ids[1, -1] == v["[SEP]"]
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match="special tokens"):
    load_tokenizer(tmp_path / "bad", "blip2")


def test_one_loader_for_both_families(tmp_path):
  """`load_tokenizer` reads a LLaVA run's HF tokenizer (left padding) and a BLIP-2 vocab;
  a directory without one is FileNotFoundError, or None when not required."""
  from cirjax.data.tokenizer import build_word_tokenizer
  tok = build_word_tokenizer(["Make it red"], tmp_path / "llava")
  again = load_tokenizer(tmp_path / "llava", "llava")
  assert again.padding_side == tok.padding_side == "left" and len(again) == len(tok)
  assert again("make it red")["input_ids"] == tok("make it red")["input_ids"]
  (tmp_path / "empty").mkdir()
  assert load_tokenizer(tmp_path / "empty", "llava", required=False) is None
  assert load_tokenizer(tmp_path / "empty", "blip2", required=False) is None
  for family in ("llava", "blip2"):
    with pytest.raises(FileNotFoundError, match="empty"):
      load_tokenizer(tmp_path / "empty", family)
  with pytest.raises(ValueError, match="'bert'"):
    load_tokenizer(tmp_path / "llava", "bert")


def test_tokenizer_coverage_warns_naming_the_source(tmp_path):
  words = list(text.SPECIAL_TOKENS) + ["make", "it", "red", "a", "circle", "."]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  tok = load_tokenizer(tmp_path, "blip2")
  share, n = text.unknown_token_share(tok, ["make it red.", "a circle"])
  assert (share, n) == (0.0, 6)
  warned = []
  texts = ["make it blue", "remove the dog", "a circle"]  # 4 of 8 words unknown
  share = text.check_tokenizer_coverage(tok, texts, source=str(tmp_path), what="cirr/val queries",
                                        warn=warned.append)
  assert share == pytest.approx(4 / 8)
  assert len(warned) == 1 and "50.0%" in warned[0] and str(tmp_path) in warned[0]
  assert "cirr/val queries" in warned[0]
  warned.clear()
  text.check_tokenizer_coverage(tok, ["make it red"], source="x", what="y", warn=warned.append)
  assert not warned

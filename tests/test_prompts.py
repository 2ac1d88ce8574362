"""InstructCIR templates, rendering with the chat template, and left-padded encoding with the
right number of image tokens (checked against transformers' LlavaProcessor)."""

import random

import numpy as np
import pytest
import transformers
from PIL import Image

from cirjax import prompts
from tests import llava_fixtures as fx


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return fx.make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_templates_as_data():
  assert len(prompts.STAGE2_IMAGE_TEMPLATES) == 10
  assert len(prompts.STAGE2_CAPTION_TEMPLATES) == 5
  for t in prompts.STAGE2_IMAGE_TEMPLATES:
    assert t.startswith("<image>\n") and prompts.template_fields(t) == {"modifier"}
  for t in prompts.STAGE2_CAPTION_TEMPLATES:
    assert prompts.IMAGE not in t and prompts.template_fields(t) == {"caption"}
  assert prompts.template_fields(prompts.inference_template("fashioniq", "query")) == {
      "category", "modifier"}
  assert prompts.inference_template("circo", "query") == prompts.inference_template("cirr",
                                                                                   "query")
  assert set(prompts.INFERENCE_TEMPLATES["genecis"]) == {
      "image", "focus_attribute", "change_attribute", "focus_object", "change_object"}
  with pytest.raises(prompts.PromptError, match="no inference templates for dataset 'coco'"):
    prompts.inference_template("coco", "query")
  with pytest.raises(prompts.PromptError, match="no 'focus' template"):
    prompts.inference_template("genecis", "focus")


def test_num_image_tokens():
  assert prompts.num_image_tokens(224) == 256
  assert prompts.num_image_tokens(336) == 576
  assert prompts.num_image_tokens(336, strategy="full") == 577
  with pytest.raises(prompts.PromptError, match="not a multiple"):
    prompts.num_image_tokens(225)


def test_render(tok):
  q = prompts.render(prompts.inference_template("cirr", "query"), tok, image=True,
                     modifier=" make it {red} ")
  assert q == ("<|user|>\n<image>\nModify this image with make it {red}, describe the modified "
               "image in one word:<|end|>\n<|assistant|>\n<|endoftext|>")
  plain = prompts.render(prompts.STAGE1_CAPTION, tok, caption="a dog", use_chat_template=False,
                         append_eos=False)
  assert plain == "a dog\nSummarize the caption in one word:"
  with pytest.raises(prompts.PromptError, match="no image was given"):
    prompts.render(prompts.STAGE1_IMAGE, tok, image=False)
  with pytest.raises(prompts.PromptError, match="no <image> placeholder"):
    prompts.render(prompts.STAGE1_CAPTION, tok, image=True, caption="x")
  with pytest.raises(prompts.PromptError, match=r"needs \['category'\]"):
    prompts.render(prompts.inference_template("fashioniq", "query"), tok, modifier="longer")
  with pytest.raises(prompts.PromptError, match="non-empty string"):
    prompts.render(prompts.STAGE1_CAPTION, tok, caption="  ")


def test_stage2_sampling(tok):
  rng = random.Random(0)
  seen = set()
  for _ in range(60):
    q, t, n = prompts.stage2_prompts(rng, "make it red", "a red dog", "a dog", tok)
    assert "<image>" in q and "<image>" not in t and t.endswith("<|endoftext|>")
    assert t.replace("a red dog", "a dog") == n  # same caption template for both captions
    seen.add(q.split("make it red")[0])
  assert len(seen) >= 8  # templates really are drawn from the set
  fixed = {prompts.stage2_prompts(rng, "m", "c", "o", tok, fixed=True) for _ in range(5)}
  assert len(fixed) == 1


def test_batch_encode_left_padding_and_image_tokens(tok):
  enc = prompts.encode(tok, [prompts.inference_template("cirr", "query"),
                             prompts.STAGE2_CAPTION_TEMPLATES[0]],
                       [{"modifier": "make it blue"}, {"caption": "a cat"}],
                       num_image_tokens=4, pad_to_multiple_of=8)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert ids.dtype == np.int32 and ids.shape[1] % 8 == 0
  assert np.all(mask[:, -1] == 1) and np.all(ids[:, -1] == tok.eos_token_id)
  assert list(enc["num_images"]) == [1, 0]
  assert (ids[0] == fx.IMAGE_TOKEN).sum() == 4 and (ids[1] == fx.IMAGE_TOKEN).sum() == 0
  assert np.all(ids[mask == 0] == tok.pad_token_id)
  # left padding only: masks are 0...0 1...1
  for row in mask:
    assert np.all(np.diff(row) >= 0)
  assert (ids[mask > 0] == tok.bos_token_id).sum() == 2  # one BOS each, none doubled


def test_batch_encode_errors(tok, tmp_path):
  long = prompts.render(prompts.STAGE1_IMAGE, tok)
  with pytest.raises(prompts.PromptError, match=r"exceed max_length=10 tokens \(row, length\): "
                     r"\[\(0, 2[0-9]\)\]"):
    prompts.batch_encode(tok, [long], num_image_tokens=16, max_length=10)
  with pytest.raises(prompts.PromptError, match="pad_to=5"):
    prompts.batch_encode(tok, [long], num_image_tokens=4, pad_to=5)
  with pytest.raises(prompts.PromptError, match="a run of 2 image tokens"):
    prompts.batch_encode(tok, ["<image><image> a"], num_image_tokens=4)
  bare = transformers.PreTrainedTokenizerFast(tokenizer_file=str(_no_image_tokenizer(tmp_path)),
                                              unk_token="<unk>", eos_token="</s>")
  with pytest.raises(prompts.PromptError, match="has no '<image>' token"):
    prompts.batch_encode(bare, ["<image> a"], num_image_tokens=4)


def _no_image_tokenizer(tmp_path):
  import tokenizers
  t = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2},
                                                       unk_token="<unk>"))
  t.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  f = tmp_path / "bare.json"
  t.save(str(f))
  return f


def test_matches_llava_processor(tok):
  """Our image-token expansion = transformers' LlavaProcessor on the same prompt."""
  # The torchvision-free processor by name: without torchvision (the tests' CPU install),
  # `CLIPImageProcessor` falls back to it with a warning (transformers 5.23-5.24). Older
  # releases (constraints/oldest.txt) have no `...Pil` class: their `CLIPImageProcessor` is it.
  processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
  proc = transformers.LlavaProcessor(
      image_processor=processor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
      tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
      num_additional_image_tokens=1, image_token="<image>")
  p = prompts.render(prompts.inference_template("cirr", "query"), tok, modifier="make it red")
  want = proc(images=[Image.new("RGB", (28, 28))], text=[p], return_tensors="np")["input_ids"]
  got = prompts.batch_encode(tok, [p], num_image_tokens=prompts.num_image_tokens(28))
  np.testing.assert_array_equal(got["input_ids"], want)

"""The LLaVA tokenizer of a training run: loaded from a model directory, or (random-init runs
without one) a lower-casing word-level tokenizer built over the data and the prompt templates."""

from __future__ import annotations

import os
import re
from typing import Sequence

from cirjax import prompts
from cirjax.models import llava


def _words(text: str) -> list[str]:
  return re.findall(r"\w+|[^\w\s]", text.lower())


def template_texts() -> list[str]:
  """Every prompt template's text (their words go into a built tokenizer)."""
  out = [prompts.STAGE1_IMAGE, prompts.STAGE1_CAPTION, *prompts.STAGE2_IMAGE_TEMPLATES,
         *prompts.STAGE2_CAPTION_TEMPLATES]
  for kinds in prompts.INFERENCE_TEMPLATES.values():
    out += list(kinds.values())
  out += list(prompts.FASHIONIQ_CATEGORY_WORDS.values())
  return out


def build_word_tokenizer(texts: Sequence[str], out_dir: str | os.PathLike):
  """A lower-casing word-level tokenizer (`prompts.save_word_level_tokenizer`) over the words
  of `texts` and every template, saved to `out_dir` and loaded back. For random-init runs
  without a checkpoint; words outside the texts become `<unk>`."""
  words = set()
  for t in list(texts) + template_texts():
    words.update(_words(t.replace(prompts.IMAGE, " ")))
  prompts.save_word_level_tokenizer(sorted(words), out_dir)
  return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer of a LLaVA model or tokenizer directory; FileNotFoundError if none."""
  tok = llava.load_tokenizer(path)
  if tok is None:
    raise FileNotFoundError(f"{path}: no tokenizer (tokenizer.json / tokenizer_config.json)")
  return tok

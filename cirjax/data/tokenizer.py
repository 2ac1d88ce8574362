"""Tokenizers: the one loader (`load_tokenizer`) for both families, and the word-level
tokenizer a random-init LLaVA run builds over its data.

* BLIP-2 (`family="blip2"`) reads BERT uncased WordPiece plus LAVIS' `[DEC]` token
  (`init_tokenizer`: `add_special_tokens({"bos_token": "[DEC]"})`, vocab 30522 + 1).
* LLaVA (`family="llava"`) reads the HF tokenizer saved with the model (`tokenizer.json` /
  `tokenizer_config.json`), padding on the left so a prompt's last position is its EOS token.

Everything is offline: paths only (a hub id is resolved by the caller, `cirjax.convert.hub`).
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Sequence

from cirjax import prompts
from cirjax.data.records import DataError
from cirjax.data.text import SPECIAL_TOKENS

FAMILIES = ("blip2", "llava")


def has_hf_tokenizer(path: str | os.PathLike) -> bool:
  """Whether directory `path` holds a tokenizer saved by transformers."""
  p = Path(path)
  return (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()


def find_vocab(path: str | os.PathLike) -> Path:
  """`vocab.txt` in a checkpoint/tokenizer directory (or the file itself)."""
  p = Path(path)
  if p.is_file():
    return p
  for cand in (p / "vocab.txt", p / "tokenizer" / "vocab.txt", p / "bert" / "vocab.txt"):
    if cand.is_file():
      return cand
  raise FileNotFoundError(
      f"no BERT vocab.txt in {p} (looked at vocab.txt, tokenizer/vocab.txt, bert/vocab.txt); "
      "copy bert-base-uncased's vocab.txt next to the checkpoint")


def load_tokenizer(path: str | os.PathLike, family: str, *, required: bool = True):
  """The tokenizer `family`'s model reads, from a model or tokenizer directory.

  blip2: a directory with an HF tokenizer loads with `AutoTokenizer` (it already carries
  whatever tokens were added); otherwise `vocab.txt` (`find_vocab`, or the file itself)
  builds an uncased `BertTokenizerFast`. `[DEC]` is added as the BOS token when absent, so
  `len(tokenizer)` is the Q-Former's vocabulary size (30523 for bert-base-uncased).
  llava: the HF tokenizer of the directory, left padding.
  No tokenizer there: FileNotFoundError naming the path, or None when not `required`.
  """
  if family not in FAMILIES:
    raise ValueError(f"tokenizer family {family!r}: use one of {FAMILIES}")
  p = Path(path)
  hf = p.is_dir() and has_hf_tokenizer(p)
  if family == "llava" and not hf:
    if required:
      raise FileNotFoundError(f"{path}: no tokenizer (tokenizer.json / tokenizer_config.json)")
    return None
  # transformers is heavy (and optional for some installs): imported only to load one.
  from transformers import AutoTokenizer, BertTokenizerFast  # pylint: disable=g-import-not-at-top
  if hf:
    tok = AutoTokenizer.from_pretrained(str(p))
  else:
    try:
      vocab = find_vocab(p)
    except FileNotFoundError:
      if required:
        raise
      return None
    with open(vocab, encoding="utf-8") as f:
      words = [w.rstrip("\n") for w in f]
    missing = [t for t in SPECIAL_TOKENS if t not in words]
    if missing:
      raise DataError(f"{vocab}: BERT vocab lacks the special tokens {missing}")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
      # transformers 5 takes the vocabulary itself (line order = token id).
      tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    else:
      tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
  if family == "llava":
    tok.padding_side = "left"
  elif "[DEC]" not in tok.get_vocab():
    tok.add_special_tokens({"bos_token": "[DEC]"})
  return tok


# ------------------------------------------------------------- a run's own word-level tokenizer

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
  """A lower-casing word-level LLaVA tokenizer (`prompts.save_word_level_tokenizer`) over
  the words of `texts` and every template, saved to `out_dir` and loaded back. For random-init
  runs without a checkpoint; words outside the texts become `<unk>`."""
  words = set()
  for t in list(texts) + template_texts():
    words.update(_words(t.replace(prompts.IMAGE, " ")))
  prompts.save_word_level_tokenizer(sorted(words), out_dir)
  return load_tokenizer(out_dir, "llava")

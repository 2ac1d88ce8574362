"""Query text as the reference code writes it, and BERT tokenization for BLIP-2.

* FashionIQ's two captions are joined as QuRe/SPRC do:
  `c0.strip('.?, ').capitalize() + " and " + c1.strip('.?, ')`.
* CIRCO queries are phrased `"a photo of $ that {caption}"`
  (docs/reference_semantics.md#qure-model).
* BLIP-2's tokenizer is BERT (uncased) plus the added `[DEC]` token (LAVIS
  `init_tokenizer`: `add_special_tokens({"bos_token": "[DEC]"})`, vocab 30522 + 1), texts padded
  to `max_length=32` and truncated.

LLaVA-Phi prompts belong to `cirjax.prompts` (the LLaVA issue): pass its formatting function
as `text_fn` to the loader/evaluator (see `cirjax.data.loader`), nothing here builds them.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from cirjax.data.records import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BLIP2_MAX_LENGTH = 32


def fashioniq_caption(captions: Sequence[str]) -> str:
  """QuRe/SPRC's join of FashionIQ's two relative captions."""
  if len(captions) != 2:
    raise ValueError(f"FashionIQ entries carry two captions, got {len(captions)}: {captions!r}")
  c0, c1 = captions
  return f"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"


def circo_caption(relative_caption: str) -> str:
  """CIRCO query text as the reference evaluation phrases it."""
  return f"a photo of $ that {relative_caption}"


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


def load_bert_tokenizer(path: str | os.PathLike, add_dec_token: bool = True):
  """A BERT WordPiece tokenizer from a directory's vocab (offline), as BLIP-2 uses it.

  A directory with a `tokenizer.json`/`tokenizer_config.json` is loaded with
  `AutoTokenizer` (it already carries whatever tokens were added); otherwise `vocab.txt`
  builds an uncased `BertTokenizerFast`. `[DEC]` is added as the BOS token when absent, so
  `len(tokenizer)` is the Q-Former's vocabulary size (30523 for bert-base-uncased).
  """
  # transformers is heavy: imported only when a tokenizer is loaded.
  from transformers import AutoTokenizer, BertTokenizerFast  # pylint: disable=g-import-not-at-top
  p = Path(path)
  if p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
    tok = AutoTokenizer.from_pretrained(str(p))
  else:
    vocab = find_vocab(p)
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
  if add_dec_token and "[DEC]" not in tok.get_vocab():
    tok.add_special_tokens({"bos_token": "[DEC]"})
  return tok


def tokenize(tokenizer, texts: Sequence[str], max_length: int = BLIP2_MAX_LENGTH
             ) -> tuple[np.ndarray, np.ndarray]:
  """Pads to `max_length` and truncates: (input_ids, attention_mask), int32 [B, max_length]."""
  enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="np")
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


UNK_WARN_SHARE = 0.01  # above 1 % of the tokens unknown, the vocabulary does not fit the data


def unknown_token_share(tokenizer, texts: Sequence[str]) -> tuple[float, int]:
  """(share of `texts`' tokens that the tokenizer maps to its unknown token, tokens counted),
  special tokens (CLS, SEP, padding) excluded."""
  unk = tokenizer.unk_token_id
  if unk is None or not texts:
    return 0.0, 0
  ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  n = sum(len(x) for x in ids)
  bad = sum(int(t == unk) for x in ids for t in x)
  return (bad / n if n else 0.0), n


def check_tokenizer_coverage(tokenizer, texts: Sequence[str], source: str, what: str,
                             warn=None, threshold: float = UNK_WARN_SHARE) -> float:
  """Warns (through `warn`, default stderr) when more than `threshold` of `texts`' tokens are
  unknown to the tokenizer, naming where the tokenizer came from: a vocabulary built on other
  data (the synthetic set's, say) silently turns a real dataset's words into [UNK]. Returns the
  share."""
  share, n = unknown_token_share(tokenizer, texts)
  if share > threshold:
    msg = (f"warning: {share:.1%} of the {n} tokens of {what} are unknown to the tokenizer from "
           f"{source} (above {threshold:.0%}): its vocabulary does not fit this data; give the "
           "tokenizer the model was trained with (e.g. bert-base-uncased's vocab.txt)")
    (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)
  return share

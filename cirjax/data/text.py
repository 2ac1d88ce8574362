"""Query text as the reference code writes it, and BERT tokenization for BLIP-2.

* FashionIQ's two captions are joined as QuRe/SPRC do:
  `c0.strip('.?, ').capitalize() + " and " + c1.strip('.?, ')`.
* CIRCO queries are phrased `"a photo of $ that {caption}"`
  (docs/reference_semantics.md#qure-model).
* BLIP-2's texts are padded to `max_length=32` and truncated; its tokenizer (BERT uncased
  plus `[DEC]`) is loaded by `cirjax.data.tokenizer.load_tokenizer`.

LLaVA-Phi prompts belong to `cirjax.prompts` (the LLaVA issue): pass its formatting function
as `text_fn` to the loader/evaluator (see `cirjax.data.loader`), nothing here builds them.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

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

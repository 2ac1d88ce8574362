"""Model + split -> features: the one assembly `cirjax eval`, `mine`, `search` and the study
encode through.

`encode(model, split, options)` gives a split's corpus and query features under a loaded
`cirjax.eval.model.Model` (any family, from any `--checkpoint`: `cirjax.load`); `encoder(...)`
gives what that takes (the model's retrieval functions, tokenizer, image preprocessing) for a
caller that encodes something other than a split (`cirjax search`'s corpus and query). One
set of options (`EncodeOptions`, the commands' `--tokenizer`, `--transform`, `--image-size`,
`--max-length`, `--batch-size`, `--num-workers`) decides:

* the tokenizer: `--tokenizer` (a path or hub id), else the model's own (found beside it, or
  the run's for a training checkpoint), else the dataset's `vocab.txt` (the synthetic set);
  a vocabulary that leaves over 1 % of a split's query tokens unknown is warned about;
* the images: `--transform`, else the family's (`Family.image_transform`), at
  `--image-size`, else the model's resolution.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

from cirjax.convert import hub, registry
from cirjax.data import images, loader, text
from cirjax.eval import evaluate, retrieval
from cirjax.data.tokenizer import load_tokenizer
from cirjax.eval.model import Model, RetrievalFns, retrieval_fns


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
  """How a split is encoded (the commands' encoding flags; defaults = theirs)."""
  tokenizer: str | None = None      # a vocab.txt / tokenizer dir / hub id
  transform: str | None = None      # 'targetpad' | 'squarepad' | 'clip'; None: the family's
  image_size: int | None = None     # None: the model's
  max_length: int = text.BLIP2_MAX_LENGTH
  batch_size: int = 64
  num_workers: int = 4

  @classmethod
  def from_args(cls, args: Any) -> "EncodeOptions":
    """From a command's parsed arguments (the fields it lacks keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if getattr(args, f.name, None) is not None})


class Encoder(NamedTuple):
  """What encoding with a model takes, for one split."""
  fns: RetrievalFns
  tokenize: Callable                 # texts -> (input_ids, attention_mask)
  text_fn: Callable | None           # query -> its text (None: `loader.default_text`)
  transform: images.Transform
  tokenizer_source: str              # where the tokenizer came from (for messages)


def with_tokenizer(model: Model, options: EncodeOptions, root: str | os.PathLike | None
                   ) -> tuple[Model, str]:
  """(the model holding the tokenizer to encode with, where it came from); see the module
  docstring for the order."""
  if options.tokenizer:
    src = hub.resolve(options.tokenizer, weights=False)
    tok = load_tokenizer(src, model.family)
    return dataclasses.replace(model, tokenizer=tok), str(src)
  if model.tokenizer is not None:
    return model, model.source
  vocab = Path(root) / "vocab.txt" if root is not None else None
  if vocab is not None and vocab.is_file() and not registry.family(model.family).prompted:
    return dataclasses.replace(model, tokenizer=load_tokenizer(vocab, "blip2")), str(vocab)
  return model, ""   # retrieval_fns names what is missing


def encoder(model: Model, split: Any, options: EncodeOptions = EncodeOptions(),
            root: str | os.PathLike | None = None) -> Encoder:
  """The retrieval functions, tokenizer and preprocessing that encode `split` (None: a
  dataset-less corpus, `cirjax search --corpus`) with `model`."""
  model, tok_src = with_tokenizer(model, options, root)
  fns, tokenize, text_fn = retrieval_fns(model, split, max_length=options.max_length)
  if split is not None and not registry.family(model.family).prompted:
    # a vocabulary built on other data turns words into [UNK]
    text.check_tokenizer_coverage(model.tokenizer,
                                  [(text_fn or loader.default_text)(q) for q in split.queries],
                                  tok_src, f"the {split.name} queries")
  return Encoder(fns, tokenize, text_fn, model.transform(options.transform, options.image_size),
                 tok_src)


def encode(model: Model, split: Any, options: EncodeOptions = EncodeOptions(), *,
           root: str | os.PathLike | None = None, mesh=None, image_source: Callable | None = None,
           log: Callable[[str], None] | None = print
           ) -> tuple[retrieval.FeatureScorer, dict[str, float]]:
  """`split`'s corpus and query features under `model` (a scorer whose features stay on
  `mesh`) and the encoding timings. `root`: the dataset root (its vocab.txt is the last
  tokenizer tried); `image_source` replaces reading the split's image files (TFDS builds)."""
  enc = encoder(model, split, options, root)
  if log:
    log(f"[encode] {split.name}: model {model.source}, tokenizer {enc.tokenizer_source}, "
        f"images {enc.transform.name} {enc.transform.dim}px")
  return evaluate.encode_split(enc.fns, split, enc.transform, enc.tokenize, options.batch_size,
                               text_fn=enc.text_fn, mesh=mesh, num_threads=options.num_workers,
                               log=log, image_source=image_source)

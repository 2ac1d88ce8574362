"""InstructCIR's training and held-out records as one type: image-caption pairs (stage 1)
and instruction triplets (stage 2), from InstructCIR JSON lines or the synthetic benchmark
(`read_examples` reads a training config's `data` block), the texts a run's built tokenizer
must cover and the images a run reads."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import jax

from cirjax.data import images as images_lib
from cirjax.data import instructcir as ic
from cirjax.data import synth
from cirjax.data.records import CIRSplit, DataError
from cirjax.data.training_splits import ensure_synthetic


class Example:
  """One training or evaluation record: an image and its texts."""
  __slots__ = ("image", "caption", "instruction", "original")

  def __init__(self, image: Any, caption: str, instruction: str = "", original: str = ""):
    self.image, self.caption, self.instruction, self.original = image, caption, instruction, original


_POSITION = {"left": "on the left", "center": "in the center", "right": "on the right"}


def synthetic_caption(a: dict[str, str]) -> str:
  """The synthetic image's attribute description, e.g. 'a large red striped circle on the
  left on a gray background'."""
  return (f"a {a['size']} {a['colour']} {a['pattern']} {a['shape']} "
          f"{_POSITION[a['position']]} on a {a['background']} background")


def synthetic_examples(root: str, split: str, stage: int) -> tuple[list[Example], CIRSplit]:
  """Stage 1: one pair per corpus image; stage 2: one triplet per query. Also the split."""
  s = synth.read_synthetic(root, split)
  attrs = json.loads((Path(root) / "attributes" / f"{split}.json").read_text())["attributes"]
  cap = {n: synthetic_caption(attrs[n]) for n in s.corpus}
  if stage == 1:
    return [Example(s.images[n].path, cap[n]) for n in s.corpus], s
  return [Example(s.images[q.reference].path, cap[q.target], q.text, cap[q.reference])
          for q in s.queries], s


def jsonl_examples(path: str, image_root: str, stage: int, on_missing: str) -> list[Example]:
  """Stage 1: `cirjax.data.instructcir` caption pairs; stage 2: its instruction triplets."""
  if stage == 1:
    pairs, skipped = ic.read_caption_pairs(path, image_root, on_missing)
    out = [Example(p.image, p.caption) for p in pairs]
  else:
    trips, skipped = ic.read_instruct_triplets(path, image_root, on_missing)
    out = [Example(t.image, t.modified_caption, t.instruction, t.original_caption)
           for t in trips]
  if skipped and jax.process_index() == 0:
    print(f"[cirjax] {path}: skipped {skipped} records whose image is missing", file=sys.stderr,
          flush=True)
  if not out:
    raise DataError(f"{path}: no usable records")
  return out


def read_examples(dc: Any, stage: int
                  ) -> tuple[list[Example], list[Example], CIRSplit | None, str | None]:
  """(training records, held-out records, the synthetic evaluation split or None, the
  synthetic data root or None) of `config.data`."""
  source = dc.get("source", "jsonl")
  if source == "synthetic":
    root = os.path.expanduser(dc.root)
    ensure_synthetic(root, dc.get("synth"))
    train, _ = synthetic_examples(root, dc.get("train_split", "train"), stage)
    ev_examples, split = synthetic_examples(root, dc.get("eval_split", "val"), stage)
    return train, ev_examples, split, root
  if source != "jsonl":
    raise DataError(f"config.data.source={source!r}: use 'jsonl' or 'synthetic'")
  if not dc.get("train_file"):
    raise DataError("config.data.train_file is empty: give the InstructCIR JSON lines "
                    f"({'image-caption pairs' if stage == 1 else 'CC3M-Instruct triplets'})"
                    " and config.data.image_root")
  on_missing = dc.get("on_missing", "skip")
  train = jsonl_examples(os.path.expanduser(dc.train_file),
                         os.path.expanduser(dc.get("image_root", "")), stage, on_missing)
  held_out = []
  if dc.get("eval_file"):
    held_out = jsonl_examples(
        os.path.expanduser(dc.eval_file),
        os.path.expanduser(dc.get("eval_image_root") or dc.get("image_root", "")), stage,
        on_missing)
  return train, held_out, None, None


def tokenizer_texts(examples: Sequence[Example], eval_split: CIRSplit | None,
                    synthetic: bool) -> list[str]:
  """Every text a built word-level tokenizer must cover."""
  out = []
  for e in examples:
    out += [e.caption, e.instruction, e.original]
  if eval_split is not None:
    out += [q.text for q in eval_split.queries]
  if synthetic:
    # Stage 1 sees only captions; the words of stage 2's instructions must still have ids
    # when stage 2 inherits this tokenizer, or they all read as <unk>.
    out += [w for w in synth.vocabulary() if w not in synth.SPECIAL_TOKENS]
  return out


def run_images(train: Sequence[Example], held_out: Sequence[Example],
               eval_split: CIRSplit | None, limit: int | None, evaluate: bool, reads: int
               ) -> tuple[list[str], float]:
  """(every image path a run reads: training, then evaluation of at most `limit` held-out
  records and queries when `evaluate`; how many times training reads each training image on
  average, over `reads` training records read in all)."""
  names = list(dict.fromkeys(str(e.image) for e in train))
  n_train = len(names)
  if evaluate:
    names += [str(e.image) for e in held_out[:limit]]
    if eval_split is not None:
      s = eval_split
      names += [str(s.images[n].path) for n in s.corpus]
      names += [str(s.images[q.reference].path) for q in s.queries[:limit]]
  return list(dict.fromkeys(names)), reads / max(1, n_train)


def open_image(path: str):
  """An example's image (RGB); an unreadable file is a DataError naming it."""
  try:
    return images_lib.load_image(path)
  except OSError as e:
    raise DataError(f"cannot read image {path}: {e}") from e

"""InstructCIR's training and held-out records as one type: image-caption pairs (stage 1)
and instruction triplets (stage 2), from InstructCIR JSON lines or the synthetic benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax

from cirjax.data import instructcir as ic
from cirjax.data import synth
from cirjax.data.records import CIRSplit, DataError


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

"""A training run's queries as tables, and the feed of each step's rows (the prefetch
pipeline's tables, or the grain pipeline's reads of the TFDS ArrayRecords)."""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from cirjax.data import text
from cirjax.data.loader import default_text
from cirjax.data.records import CIRSplit
from cirjax.data.training_splits import train_split_names


class TrainingQueries:
  """A run's training queries as tables -- each query's reference and target image (global
  indices, `image_index`) and its text's token ids and mask -- and the feed of a step's rows:
  from the tables, or (`read_with_grain`) read from the TFDS ArrayRecords by grain
  (docs/data.md#grain) and checked to be those rows."""

  def __init__(self, train_splits: list[CIRSplit], image_index: dict[str, int], tokenizer,
               max_length: int, *, tokenizer_source: str, dataset: str, warn=None):
    self.queries = [q for s in train_splits for q in s.queries]
    self.ref = np.array([image_index[q.reference] for q in self.queries], np.int32)
    self.tgt = np.array([image_index[q.target] for q in self.queries], np.int32)
    texts = [default_text(q) for q in self.queries]
    self.ids, self.mask = text.tokenize(tokenizer, texts, max_length)
    text.check_tokenizer_coverage(tokenizer, texts, tokenizer_source,
                                  f"the {dataset} training queries", warn=warn)
    self.tokenizer, self.max_length, self.image_index = tokenizer, max_length, image_index
    self.feed = None

  def __len__(self) -> int:
    return len(self.queries)

  def read_with_grain(self, dc: ml_collections.ConfigDict, *, seed: int, epochs: int,
                      steps_per_epoch: int, global_batch: int) -> None:
    """Feeds the steps through grain from `config.data.tfds_dir` (`dc`)."""
    from cirjax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
    train, _ = train_split_names(dc)
    self.feed = grain_pipeline.GrainFeed(
        os.path.expanduser(dc.tfds_dir), dc.dataset, train, tokenizer=self.tokenizer,
        max_length=self.max_length, image_index=self.image_index, seed=seed, epochs=epochs,
        steps_per_epoch=steps_per_epoch, global_batch=global_batch,
        workers=int(dc.get("grain_workers", 0) or 0))

  def rows(self, step: int, rows: np.ndarray):
    """(token ids and mask, reference and target image indices) of this process's `rows` of
    global step `step`."""
    if self.feed is None:
      return ({"input_ids": self.ids[rows], "attention_mask": self.mask[rows]},
              self.ref[rows], self.tgt[rows])
    ex = self.feed.next(step)
    if not np.array_equal(ex["row"], rows):
      raise RuntimeError(f"grain fed rows {ex['row'][:4]}... for step {step}, whose rows are "
                         f"{rows[:4]}...")
    return ({"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]},
            ex["reference"], ex["target"])

  def start(self, step: int) -> None:
    """The grain pipeline's workers start, and read `step`'s batch, at an epoch's start."""
    if self.feed is not None:
      self.feed.start(step)

  def state(self) -> dict:
    """The feed's checkpointed state (`{}` without grain)."""
    return {} if self.feed is None else {"grain": self.feed.state()}

  def load_state(self, host: dict) -> None:
    if self.feed is not None:
      self.feed.load_state(host.get("grain"))

  def close(self) -> None:
    if self.feed is not None:
      self.feed.close()

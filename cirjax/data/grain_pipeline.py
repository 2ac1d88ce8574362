"""Training queries read through grain from the ArrayRecord files of a `cirjax data tfds` build.

The `grain` input pipeline (`config.data.pipeline = 'grain'`, `config.data.tfds_dir`) feeds
QuRe training from the `<builder>/queries` ArrayRecords (docs/data.md#grain):

* Order: the run's whole stream of steps, epoch after epoch, each epoch the permutation
  `epoch_rows(seed, epoch, ...)` of the training queries, the same one the `prefetch`
  pipeline uses: both pipelines feed the same examples in the same order for one seed.
* Per-host sharding: each process reads only its rows of every global batch (the contiguous
  block `shard_index * B/n : (shard_index + 1) * B/n`, as `cirjax.train.sharding.process_rows`
  places them), from grain's `ShardOptions` (default `ShardByJaxProcess`: `jax.process_index()`
  of `jax.process_count()`).
* Workers: `workers > 0` decode records and tokenize texts in that many grain worker
  processes (`mp_prefetch`); 0 does it in the calling thread.
* Start-up: `GrainFeed.start(step)` (QuRe's `begin_epoch`) starts the workers and reads the
  epoch's first batch before the loop waits for it.
* State: `GrainFeed.state()` is grain's iterator state (JSON) as of the last batch taken, plus
  the position the iterator started from and its worker count. The trainer checkpoints it
  with each step's host state; `load_state` puts a resumed run's iterator at the next batch
  exactly. A state saved with another worker count (grain's state is per worker layout), or
  none, restarts the stream at the step asked for.

Every element carries its step, and `GrainFeed.next(step)` refuses an element of another
step, so a feed out of step with the trainer fails loudly instead of training on other data.
"""

from __future__ import annotations

import collections
import json
from typing import Sequence

import grain
import numpy as np

from cirjax.data import text as text_lib
from cirjax.data import tfds_builders
from cirjax.data.records import DataError
from cirjax.data.training_splits import epoch_rows


class QueryRecords:
  """Random access to the training queries of one or more splits, in the run's row order
  (split after split, each in its published order), decoded from their ArrayRecords by
  grain's `ArrayRecordDataSource`. TFDS stores records in hashed order: the position of
  each query's record is read once from the records' `index` field."""

  def __init__(self, data_dir: str, dataset: str, splits: Sequence[str]):
    files = [tfds_builders.split_files(data_dir, dataset, "queries", s) for s in splits]
    self.features = tfds_builders.builder_class(dataset)(
        config="queries", data_dir=str(data_dir)).info.features
    self.sources, self.positions, self.offsets = [], [], [0]
    for split_files in files:
      src = grain.sources.ArrayRecordDataSource(split_files)
      index = np.array([int(self._decode(src[i])["index"]) for i in range(len(src))])
      pos = np.empty(len(src), np.int64)
      pos[index] = np.arange(len(src))
      self.sources.append(src)
      self.positions.append(pos)
      self.offsets.append(self.offsets[-1] + len(src))

  def _decode(self, record: bytes) -> dict:
    return self.features.deserialize_example_np(record)

  def __len__(self) -> int:
    return self.offsets[-1]

  def __getitem__(self, row: int) -> dict:
    s = int(np.searchsorted(self.offsets, row, side="right")) - 1
    rec = self._decode(self.sources[s][int(self.positions[s][row - self.offsets[s]])])
    return {"row": int(row), **rec}


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class ToExample:
  """A query record -> the arrays of one training example: its row, token ids and mask
  (the BLIP-2 text: CIRCO's `blip2_text` where the record has one, as
  `cirjax.data.loader.default_text`) and the run's image index of its reference and target."""

  def __init__(self, tokenizer, max_length: int, image_index: dict[str, int]):
    self.tokenizer, self.max_length, self.image_index = tokenizer, max_length, image_index

  def __call__(self, rec: dict) -> dict[str, np.ndarray]:
    extra = json.loads(_text(rec["extra_json"]) or "{}")
    ids, mask = text_lib.tokenize(self.tokenizer, [extra.get("blip2_text", _text(rec["text"]))],
                                  self.max_length)
    names = (_text(rec["reference"]), _text(rec["target"]))
    missing = [n for n in names if n not in self.image_index]
    if missing:
      raise DataError(f"query record {int(rec['index'])}: image {missing[0]!r} is not in the "
                      "run's image table")
    return {"step": np.int64(rec["step"]), "row": np.int32(rec["row"]), "input_ids": ids[0],
            "attention_mask": mask[0], "reference": np.int32(self.image_index[names[0]]),
            "target": np.int32(self.image_index[names[1]])}


class RunOrder(grain.MapDataset):
  """This shard's examples for the whole run: element k is example k % (B/n) of this
  shard's rows of step k // (B/n) (`epoch_rows` order)."""

  def __init__(self, records: QueryRecords, *, seed: int, epochs: int, steps_per_epoch: int,
               global_batch: int, shard_index: int, shard_count: int):
    super().__init__(grain.MapDataset.source(records))
    self.num_queries, self.seed, self.epochs = len(records), seed, epochs
    self.steps_per_epoch, self.global_batch = steps_per_epoch, global_batch
    self.shard_index, self.per = shard_index, global_batch // shard_count
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self.epochs * self.steps_per_epoch * self.per

  def _rows(self, epoch: int) -> np.ndarray:
    if epoch not in self._cache:  # one epoch's order at a time (per worker)
      self._cache = {epoch: epoch_rows(self.seed, epoch, self.num_queries, self.steps_per_epoch,
                                       self.global_batch)}
    return self._cache[epoch]

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    step, j = divmod(int(k), self.per)
    epoch, index = divmod(step, self.steps_per_epoch)
    row = self._rows(epoch)[index * self.global_batch + self.shard_index * self.per + j]
    return dict(self._parent[int(row)], step=step)


def shard_of(shard_options=None) -> tuple[int, int]:
  """(index, count) of grain `ShardOptions`; default `ShardByJaxProcess`."""
  opts = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  return int(opts.shard_index), int(opts.shard_count)


class GrainFeed:
  """This process's training batches of QuRe queries, one per step, from the ArrayRecords of
  a TFDS build through grain (see the module docstring). `next(step)` returns the batch of
  global step `step` (steps are taken in order; a resumed run starts where `load_state` puts
  it); `state()` / `load_state()` are the checkpointed iterator state; `close()` stops the
  worker processes."""

  def __init__(self, data_dir: str, dataset: str, splits: Sequence[str], *, tokenizer,
               max_length: int, image_index: dict[str, int], seed: int, epochs: int,
               steps_per_epoch: int, global_batch: int, workers: int = 0,
               shard_options=None):
    self.index, self.count = shard_of(shard_options)
    if global_batch % self.count:
      raise DataError(f"global batch {global_batch} is not divisible by {self.count} shards")
    self.records = QueryRecords(data_dir, dataset, splits)
    self.per = global_batch // self.count
    examples = RunOrder(self.records, seed=seed, epochs=epochs,
                                  steps_per_epoch=steps_per_epoch, global_batch=global_batch,
                                  shard_index=self.index, shard_count=self.count)
    self.examples = examples.map(ToExample(tokenizer, max_length, image_index))
    self.workers = max(0, int(workers))
    self._it = None
    self._start = 0          # the step the open iterator started at
    self._next_step = None   # the step its next element holds
    self._pending: dict | None = None
    self._ahead: tuple[int, dict, dict] | None = None  # (step, batch, state before it)
    # (step, rows) of the batches taken, the latest 4096: what a test compares.
    self.yielded: collections.deque = collections.deque(maxlen=4096)

  def _open(self, step: int) -> None:
    self.close()
    state, self._pending = self._pending, None
    if state and int(state.get("workers", -1)) == self.workers and \
        int(state.get("next_step", -1)) == step:
      start = int(state["start"])
    else:
      state, start = None, step
    ds = self.examples[start * self.per:].to_iter_dataset()
    if self.workers:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():  # grain's worker options read absl flags; keep defaults
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
    # Batched here, not in the workers: a batch of a few hundred bytes is no reason for
    # shared-memory blocks (which grain leaks when the iterator closes with some in flight).
    ds = ds.batch(self.per, drop_remainder=True)
    self._it = iter(ds)
    if state:
      self._it.set_state(state["grain"])
    self._start, self._next_step = start, step

  def start(self, step: int) -> None:
    """Opens the iterator at `step` and reads its batch ahead, so that the worker processes
    start here (an epoch's start) and not while the first step waits; `next(step)` returns
    that batch, and `state()` stays the one before it until then."""
    if self._ahead is None or self._ahead[0] != step:
      if self._it is None or self._next_step != step:
        self._open(step)
      before = self.state()
      self._ahead = (step, self._read(step), before)

  def next(self, step: int) -> dict[str, np.ndarray]:
    ahead, self._ahead = self._ahead, None
    batch = ahead[1] if ahead is not None and ahead[0] == step else self._read(step)
    self.yielded.append((step, batch["row"].copy()))
    return batch

  def _read(self, step: int) -> dict[str, np.ndarray]:
    if self._it is None or self._next_step != step:
      self._open(step)
    try:
      batch = {k: np.array(v) for k, v in next(self._it).items()}
    except StopIteration:
      raise DataError(f"the grain stream ended before step {step}") from None
    got = int(batch.pop("step")[0])
    if got != step:
      raise RuntimeError(f"grain feed out of step: asked for step {step}, got {got}")
    self._next_step = step + 1
    return batch

  def state(self) -> dict | None:
    """The iterator state as of the last batch taken (JSON), or the restored one not yet used."""
    if self._ahead is not None:
      return self._ahead[2]
    if self._it is None:
      return self._pending
    return {"start": self._start, "next_step": self._next_step, "workers": self.workers,
            "shard": [self.index, self.count], "grain": self._it.get_state()}

  def load_state(self, state: dict | None) -> None:
    if state and list(state.get("shard", [])) != [self.index, self.count]:
      raise DataError(f"the checkpoint's grain state is of shard {state.get('shard')}, this "
                      f"process reads shard {[self.index, self.count]}")
    self.close()
    self._pending = state

  def close(self) -> None:
    self._ahead = None
    if self._it is not None:
      close = getattr(self._it, "close", None)
      if close is not None:
        close()
      self._it = None


__all__ = ["GrainFeed", "QueryRecords", "RunOrder", "ToExample", "image_source_for",
           "shard_of"]

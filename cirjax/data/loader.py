"""Batched, deterministic, resumable data loading on a `grain` thread pool.

Two things are fed from a `CIRSplit`:

* Training triplets (`TripletLoader`): `loader.batch(epoch, step)` is a pure function of
  (seed, epoch, step) — the epoch's order is a permutation seeded by (seed, epoch) — so a
  trainer resumes exactly by asking for the next step; `loader.epoch(epoch, start_step)`
  iterates an epoch from any step with batches prepared ahead by worker threads.
  Each batch is a dict of NumPy arrays:
    reference_pixels [B, H, W, 3] float32, input_ids [B, L] int32, attention_mask [B, L],
    target_pixels [B, H, W, 3], target_index [B] (position of the target in `split.corpus`,
    the mining corpus), query_index [B] (position in `split.queries`).
* Evaluation (`image_batches`, `query_batches`): the corpus images in order, and the queries
  (reference pixels + tokens) in order, for encoding.

Texts: `text_fn(query) -> str` picks the string to tokenize (default `query.text`; CIRCO's
BLIP-2 phrasing is in `query.extra["blip2_text"]`). For LLaVA-Phi prompts pass a `tokenize_fn`
built from `cirjax.prompts` (the LLaVA issue) instead of the BERT tokenizer: any callable
`list[str] -> (ids, mask)` works.

grain is pure Python and never touches an accelerator; images are decoded and preprocessed
in its worker threads (PIL releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import threading
from typing import Callable, Iterator, Sequence

import grain
import numpy as np

from cirjax.data import images as images_lib
from cirjax.data.records import CIRSplit, DataError, Query

TokenizeFn = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
# name -> PIL image; the default reads `split.images[name]` from disk. TFDS builds supply
# their own (`cirjax.data.tfds_builders.load_split`).
ImageSource = Callable[[str], "images_lib.Image.Image"]


def file_image_source(split: CIRSplit) -> ImageSource:
  """Reads a split's images from their files (GeneCIS boxes cropped)."""
  def load(name: str):
    ref = split.images.get(name)
    if ref is None:
      raise DataError(f"{split.name}: unknown image {name!r}")
    return images_lib.load_image(ref)
  return load


def default_text(query: Query) -> str:
  return query.extra.get("blip2_text", query.text)


class ImageCache:
  """Preprocessed images by name, shared by worker threads (only for small datasets)."""

  def __init__(self, split: CIRSplit, transform: Callable, enabled: bool = True,
               image_source: ImageSource | None = None):
    self.split, self.transform, self.enabled = split, transform, enabled
    self.source = image_source or file_image_source(split)
    self._cache: dict[str, np.ndarray] = {}
    self._lock = threading.Lock()

  def __call__(self, name: str) -> np.ndarray:
    if self.enabled:
      x = self._cache.get(name)
      if x is not None:
        return x
    x = self.transform(self.source(name))
    if self.enabled:
      with self._lock:
        self._cache[name] = x
    return x


def _bert_tokenize_fn(tokenizer, max_length: int) -> TokenizeFn:
  from cirjax.data.text import tokenize  # pylint: disable=g-import-not-at-top
  return lambda texts: tokenize(tokenizer, texts, max_length)


class RecordLoader:
  """Deterministic, resumable batches over any list of records, prepared by worker threads.

  `collate(records) -> dict of arrays` builds one batch (this process's share) from the
  records of a step. The epoch's order is a permutation seeded by (seed, epoch), so
  `batch(epoch, step)` is a pure function of (seed, epoch, step): a trainer resumes by asking
  for the next step. Used for CIR triplets (`TripletLoader`) and for InstructCIR's
  image-caption pairs and instruction triplets (`cirjax.data.instructcir` records).
  """

  def __init__(self, records: Sequence, collate: Callable[[list], dict[str, np.ndarray]],
               batch_size: int, seed: int = 0, drop_remainder: bool = True,
               num_threads: int = 4, prefetch: int = 4, process_index: int = 0,
               process_count: int = 1, name: str = "records"):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size % process_count:
      raise ValueError(f"global batch {batch_size} does not split over {process_count} processes")
    if process_count > 1 and not drop_remainder:
      raise ValueError("with several processes the last, partial batch cannot be split evenly: "
                       "use drop_remainder=True")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    self.records = list(records)
    if not self.records:
      raise DataError(f"{name}: nothing to load (empty)")
    self.collate, self.name = collate, name
    self.batch_size, self.seed, self.drop_remainder = batch_size, seed, drop_remainder
    self.num_threads, self.prefetch = num_threads, prefetch
    self.process_index, self.process_count = process_index, process_count
    n = len(self.records)
    self.steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
    if self.steps_per_epoch == 0:
      raise DataError(f"{name}: {n} records is fewer than one batch of {batch_size}")

  def order(self, epoch: int) -> np.ndarray:
    """The epoch's record order (a permutation seeded by (seed, epoch))."""
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

  def indices(self, epoch: int, step: int) -> np.ndarray:
    """Record indices of this process's share of global batch `step` of `epoch`."""
    if not 0 <= step < self.steps_per_epoch:
      raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
    idx = self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
    if self.process_count > 1:  # full batches only (checked in __init__)
      per = len(idx) // self.process_count
      idx = idx[self.process_index * per:(self.process_index + 1) * per]
    return idx

  def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """Batch `step` of `epoch`, computed from scratch (a pure function of seed, epoch, step)."""
    idx = self.indices(epoch, step)
    out = self.collate([self.records[i] for i in idx])
    out.setdefault("record_index", idx.astype(np.int32))
    return out

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Iterates steps start_step..steps_per_epoch-1, prepared ahead by worker threads."""
    if not 0 <= start_step <= self.steps_per_epoch:
      raise IndexError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
    ds = grain.MapDataset.range(start_step, self.steps_per_epoch).map(
        lambda s: self.batch(epoch, int(s)))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                              prefetch_buffer_size=self.prefetch))
    return iter(it)


class TripletLoader(RecordLoader):
  """Deterministic, resumable (reference, text, target) batches for training."""

  def __init__(self, split: CIRSplit, transform: Callable, tokenize_fn: TokenizeFn,
               batch_size: int, seed: int = 0, drop_remainder: bool = True,
               num_threads: int = 4, prefetch: int = 4, text_fn: Callable[[Query], str] = default_text,
               cache_images: bool = False, process_index: int = 0, process_count: int = 1,
               image_source: ImageSource | None = None):
    missing = [q.query_id for q in split.queries if q.target is None]
    if missing:
      raise DataError(f"{split.name}: {len(missing)} queries have no target (e.g. {missing[0]}); "
                      "cannot train on them")
    if not split.queries:
      raise DataError(f"{split.name}: no training queries")
    self.queries = list(split.queries)
    cidx = split.corpus_index()
    self.target_index = np.array([cidx.get(q.target, -1) for q in self.queries], np.int32)
    self.split, self.tokenize_fn, self.text_fn = split, tokenize_fn, text_fn
    self.images = ImageCache(split, transform, cache_images, image_source)
    super().__init__(range(len(self.queries)), self._collate, batch_size, seed, drop_remainder,
                     num_threads, prefetch, process_index, process_count,
                     name=f"{split.name} queries")

  def _collate(self, idx: list[int]) -> dict[str, np.ndarray]:
    idx = np.asarray(idx)
    qs = [self.queries[i] for i in idx]
    ids, mask = self.tokenize_fn([self.text_fn(q) for q in qs])
    return {"reference_pixels": np.stack([self.images(q.reference) for q in qs]),
            "input_ids": ids, "attention_mask": mask,
            "target_pixels": np.stack([self.images(q.target) for q in qs]),
            "target_index": self.target_index[idx], "query_index": idx.astype(np.int32)}

  def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    return self._collate(list(self.indices(epoch, step)))


def image_batches(split: CIRSplit, names: Sequence[str], transform: Callable, batch_size: int,
                  num_threads: int = 4, image_source: ImageSource | None = None
                  ) -> Iterator[np.ndarray]:
  """Preprocessed [B, H, W, 3] batches of the named images, in order (corpus encoding)."""
  names = list(names)
  source = image_source or file_image_source(split)
  if not names:
    raise DataError(f"{split.name}: no images to load")

  def load(i):
    chunk = names[i * batch_size:(i + 1) * batch_size]
    return np.stack([transform(source(n)) for n in chunk])

  n_batches = -(-len(names) // batch_size)
  ds = grain.MapDataset.range(n_batches).map(lambda i: load(int(i)))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)))


def query_batches(split: CIRSplit, transform: Callable, tokenize_fn: TokenizeFn, batch_size: int,
                  text_fn: Callable[[Query], str] = default_text, num_threads: int = 4,
                  image_source: ImageSource | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(reference pixels, input_ids, attention_mask) batches of every query, in order."""
  qs = split.queries
  source = image_source or file_image_source(split)
  if not qs:
    raise DataError(f"{split.name}: no queries")

  def load(i):
    chunk = qs[i * batch_size:(i + 1) * batch_size]
    ids, mask = tokenize_fn([text_fn(q) for q in chunk])
    pix = np.stack([transform(source(q.reference)) for q in chunk])
    return pix, ids, mask

  n_batches = -(-len(qs) // batch_size)
  ds = grain.MapDataset.range(n_batches).map(lambda i: load(int(i)))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)))


def bert_tokenize_fn(tokenizer, max_length: int = 32) -> TokenizeFn:
  """The BLIP-2 text path: BERT tokenizer, padded to `max_length`, truncated."""
  return _bert_tokenize_fn(tokenizer, max_length)

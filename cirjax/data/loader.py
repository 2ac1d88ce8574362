"""Data feeding: a prefetcher that builds batches ahead of their use, and the eval feeds.

* `Prefetcher(fn, indices, workers, depth)`: the results of `fn(i)` in the order of
  `indices`, computed ahead by worker threads with at most `depth` waiting (bounded memory).
  The trainer feeds each epoch through it from its task's `batch(epoch, i)`, so images are
  decoded and preprocessed while the previous step runs; a batch stays a pure function of
  (seed, epoch, i) and the state set at the epoch's start, so a resumed run asks for the same
  batches. Threads suffice: PIL decodes and resizes outside the GIL, and nothing here
  touches an accelerator.
* `Pixels(transform, source)`: a batch's preprocessed pixels by image name, gathered from
  the run's pixel store (`cirjax.data.pixel_store`, opened by `Pixels.open_store`) and
  normalised, or decoded when there is none: the training tasks read every image through
  it, so with a store no step waits for a decode.
* Evaluation (`image_batches`, `query_batches`): the corpus images in order, and the queries
  (reference pixels + tokens) in order, for encoding.

Texts: `text_fn(query) -> str` picks the string to tokenize (default `query.text`; CIRCO's
BLIP-2 phrasing is in `query.extra["blip2_text"]`). `tokenize_fn` is any callable
`list[str] -> (ids, mask)` (`bert_tokenize_fn` for BLIP-2's BERT tokenizer).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from cirjax.data import images as images_lib
from cirjax.data import pixel_store
from cirjax.data import row_store
from cirjax.data import text as text_lib
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


class Pixels:
  """Preprocessed float32 pixels of named images, [B, dim, dim, 3]: rows of the run's pixel
  store once `open_store` found or built one (names it does not hold are decoded), else
  decoded and preprocessed by the calling thread. The same bits either way: the store keeps
  the transform's uint8 output and both paths normalise it with `normalize_pixels`."""

  def __init__(self, transform: images_lib.Transform, source: ImageSource):
    self.transform, self.source = transform, source
    self.store: pixel_store.PixelStore | None = None
    self._row: dict[str, int] = {}

  def __call__(self, names: Sequence[str]) -> np.ndarray:
    d = self.transform.dim
    out = np.empty((len(names), d, d, 3), np.uint8)
    rows = [self._row.get(n) for n in names]
    hit = [i for i, r in enumerate(rows) if r is not None]
    if hit:
      out[hit] = self.store[[rows[i] for i in hit]]
    for i, r in enumerate(rows):
      if r is None:
        out[i] = self.transform.pixels(self.source(names[i]))
    return images_lib.normalize_pixels(out)

  def open_store(self, dc, workdir: str, names: Sequence[str], refs: dict[str, Any],
                 reads_per_image: float, log: Callable[[str], None] | None = None) -> dict:
    """Opens (or builds) the pixel store of `names` when `config.data.pixel_store` (`dc`)
    asks for one for a run reading each image `reads_per_image` times on average (see
    `pixel_store.wanted`); call it on every process, outside worker threads (a build
    synchronises the processes). Returns the store's facts for the run's records ({} when
    the run decodes)."""
    log = log or row_store.log_line
    m = pixel_store.mode(dc)
    if self.store is not None or not pixel_store.wanted(m, reads_per_image):
      return {}
    directory, owned = pixel_store.store_dir(dc, workdir)
    workers = int(dc.get("workers", -1)) if dc is not None else -1
    t0 = time.perf_counter()
    try:
      store = pixel_store.open_or_build(
          directory, names, refs, self.transform, self.source,
          workers=default_workers() if workers <= 0 else workers, drop_stale=owned, log=log)
    except row_store.NoSpaceError as e:
      if m == "on":
        raise
      log(f"pixel store off, images are decoded at every use: {e}")
      return {}
    self.store, self._row = store, {n: i for i, n in enumerate(names)}
    log(store.describe())
    meta = store.meta
    return {"pixel_store_path": str(store.path), "pixel_store_bytes": store.nbytes,
            "pixel_store_shape": list(store.shape), "pixel_store_built": store.built,
            "pixel_store_open_s": time.perf_counter() - t0,
            **{f"pixel_store_{k}": meta[k] for k in ("build_s", "decode_s", "images_per_s")
               if k in meta}}


def default_workers() -> int:
  """Worker threads when the config does not say: the machine's cores, at most 8."""
  return max(1, min(8, os.cpu_count() or 1))


class Prefetcher:
  """Yields `fn(i)` for each `i` of `indices`, in order, computed ahead by worker threads.

  At most `depth` results are queued or in progress at any time (default 2 x workers).
  `workers=0` calls `fn` lazily in the caller's thread; `workers=1` calls it in index order,
  one call at a time, so an `fn` that advances state of its own stays deterministic. An
  exception raised by `fn(i)` is re-raised by the `next()` that reaches `i`, with a note
  naming `i`. `close()` (also on leaving a `with` block or when the iteration ends) cancels
  the calls not yet started and waits for the running ones.
  """

  def __init__(self, fn: Callable[[Any], Any], indices: Iterable, *, workers: int = 4,
               depth: int | None = None, name: str = "prefetch"):
    if workers < 0:
      raise ValueError(f"workers must be >= 0, got {workers}")
    self.fn, self.workers = fn, int(workers)
    self.depth = max(1, int(depth) if depth else 2 * self.workers)
    self._indices = iter(indices)
    self._pending: collections.deque = collections.deque()
    self._closed = False
    self._pool = (concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix=name)
                  if self.workers else None)
    self._fill()

  def _fill(self) -> None:
    while self._pool is not None and len(self._pending) < self.depth:
      try:
        i = next(self._indices)
      except StopIteration:
        return
      self._pending.append((i, self._pool.submit(self.fn, i)))

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self):
    if self._closed:
      raise StopIteration
    if self._pool is None:
      return self.fn(next(self._indices))
    if not self._pending:
      self.close()
      raise StopIteration
    i, future = self._pending.popleft()
    try:
      out = future.result()
    except Exception as e:
      e.add_note(f"(raised by item {i!r} of a {type(self).__name__} worker thread)")
      self.close()
      raise
    self._fill()
    return out

  def close(self) -> None:
    self._closed = True
    if self._pool is not None:
      for _, future in self._pending:
        future.cancel()
      self._pending.clear()
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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

  return iter(Prefetcher(load, range(-(-len(names) // batch_size)), workers=num_threads))


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

  return iter(Prefetcher(load, range(-(-len(qs) // batch_size)), workers=num_threads))


def bert_tokenize_fn(tokenizer, max_length: int = 32) -> TokenizeFn:
  """The BLIP-2 text path: BERT tokenizer, padded to `max_length`, truncated."""
  return lambda texts: text_lib.tokenize(tokenizer, texts, max_length)

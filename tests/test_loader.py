"""The prefetcher (ordered, bounded, errors named, clean shutdown) and the ordered eval feeds."""

import dataclasses
import threading
import time

import numpy as np
import pytest

from cirjax.data import images, loader, synth, text
from cirjax.data.tokenizer import load_tokenizer
from cirjax.data.records import DataError

TINY = synth.SynthConfig(seed=2, resolution=16, num_images=(120, 90, 40),
                         num_queries=(26, 10, 5))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth_loader")
  synth.generate(out, TINY, progress=None)
  return out, synth.read_synthetic(out, "train")


class _Recorder:
  """fn(i) -> i * i after a jittered sleep; records call order and the most in flight."""

  def __init__(self):
    self.calls, self.running, self.most = [], 0, 0
    self.lock = threading.Lock()

  def __call__(self, i):
    with self.lock:
      self.calls.append(i)
      self.running += 1
      self.most = max(self.most, self.running)
    time.sleep(0.002 * ((i * 7) % 3))
    with self.lock:
      self.running -= 1
    return i * i


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_results_in_order_whatever_the_workers(workers):
  fn = _Recorder()
  got = list(loader.Prefetcher(fn, range(5, 30), workers=workers, depth=3))
  assert got == [i * i for i in range(5, 30)]
  assert sorted(fn.calls) == list(range(5, 30))
  if workers <= 1:  # one call at a time, in index order: stateful fns stay deterministic
    assert fn.calls == list(range(5, 30)) and fn.most == 1
  else:
    assert fn.most <= 3


def test_bounded_lookahead_and_close_cancels_the_rest():
  fn = _Recorder()
  with loader.Prefetcher(fn, range(10_000), workers=2, depth=4) as it:
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    assert len(fn.calls) <= 3 + 4
  n = len(fn.calls)
  time.sleep(0.05)
  assert len(fn.calls) == n <= 7
  with pytest.raises(StopIteration):
    next(it)
  lazy = _Recorder()
  it = loader.Prefetcher(lazy, range(100), workers=0)
  assert next(it) == 0 and lazy.calls == [0]   # synchronous: nothing computed ahead


def test_an_error_is_raised_in_the_caller_naming_the_item():
  def fn(i):
    if i == 3:
      raise DataError("cannot read image x.png")
    return i

  for workers in (0, 2):
    it = loader.Prefetcher(fn, range(8), workers=workers)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(DataError, match="x.png") as e:
      next(it)
    if workers:
      assert "item 3" in "".join(e.value.__notes__)
  with pytest.raises(ValueError, match="workers"):
    loader.Prefetcher(fn, range(2), workers=-1)


def test_eval_batches_are_in_order(split):
  root, s = split
  tf = images.make_transform("clip", 16)
  got = np.concatenate(list(loader.image_batches(s, s.corpus[:9], tf, 4, num_threads=2)))
  want = np.stack([tf(images.load_image(s.images[n])) for n in s.corpus[:9]])
  np.testing.assert_array_equal(got, want)
  tok = load_tokenizer(root / "vocab.txt", "blip2")
  qb = list(loader.query_batches(s, tf, loader.bert_tokenize_fn(tok, 12), 8, num_threads=2))
  assert sum(b[0].shape[0] for b in qb) == len(s.queries)
  ids, _ = text.tokenize(tok, [s.queries[9].text], 12)
  np.testing.assert_array_equal(qb[1][1][1], ids[0])
  with pytest.raises(DataError, match="no images"):
    next(loader.image_batches(s, [], tf, 4))
  with pytest.raises(DataError, match="no queries"):
    next(loader.query_batches(dataclasses.replace(s, queries=[]), tf, None, 4))

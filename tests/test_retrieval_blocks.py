"""Retrieval's corpus blocking is a speed knob: the default (a cache-sized score tile: one
feature per image, and multi-token features on CPU) ranks exactly as small blocks do."""

import jax
import numpy as np
import pytest

from cirjax.eval import retrieval


@pytest.mark.parametrize("tokens", [1, 3])
def test_default_corpus_block_ranks_as_small_blocks(tokens):
  rng = np.random.default_rng(3)
  q = rng.standard_normal((21, 8)).astype(np.float32)
  c = rng.standard_normal((300, tokens, 8)).astype(np.float32)
  c[50:60] = c[40]           # exact ties: lower corpus index first
  scorer = retrieval.FeatureScorer(q, c[:, 0] if tokens == 1 else c)
  mesh = retrieval.make_mesh()
  exclude = rng.integers(-1, 300, 21)
  s1, i1 = retrieval.top_k(scorer, 25, exclude, mesh)
  s2, i2 = retrieval.top_k(scorer, 25, exclude, mesh, query_block=8, corpus_block=37)
  np.testing.assert_array_equal(i1, i2)
  # GEMMs of other shapes may round the last bit differently.
  np.testing.assert_allclose(s1, s2, rtol=1e-6)


def test_default_corpus_block_sizes():
  one = retrieval.FeatureScorer(np.zeros((2, 4), np.float32), np.zeros((5, 4), np.float32))
  many = retrieval.FeatureScorer(np.zeros((2, 4), np.float32), np.zeros((5, 2, 4), np.float32))
  for path in ("buffered", "streamed"):
    assert retrieval.default_corpus_block(one, 256, path) == 8192    # 8 MiB fp32 score tile
    assert retrieval.default_corpus_block(one, 4096, path) == 4096
    assert retrieval.default_query_block(one, path) == 256
  # The host path keeps every score of a query block: one GEMM over the device's rows, and
  # query blocks of 16 MiB of scores (at least 256 rows).
  local = one.corpus_rows.shape[0] // one.mesh.devices.size
  assert retrieval.default_path(one) == "host"
  assert retrieval.default_corpus_block(one, 256) == local
  assert retrieval.default_query_block(one) == 2  # all queries: one block
  feats = lambda nq, n: retrieval.FeatureScorer(np.zeros((nq, 4), np.float32),
                                                np.zeros((n, 4), np.float32))
  assert retrieval.default_query_block(feats(2038, 6346)) == 510  # 661 at most: 4 even blocks
  assert retrieval.default_query_block(feats(5000, 40000)) == 250  # 256 at most: 20 blocks
  assert retrieval.default_query_block(many) == 256
  assert retrieval.default_corpus_block(many, 256) == 4096
  qure = retrieval.FeatureScorer(np.zeros((2, 4), np.float32), np.zeros((5, 32, 4), np.float32))
  assert retrieval.default_corpus_block(qure, 256) == 256     # 8 MiB of CPU token scores
  assert retrieval.default_corpus_block(qure, 128) == 512
  assert retrieval.default_corpus_block(qure, 4096) == 256    # the floor


def test_default_path_by_where_the_devices_are():
  """CPU devices of this process: host; CPU devices of several processes: buffered (the
  host path cannot read the other processes' scores); accelerators: streamed."""
  import types  # pylint: disable=import-outside-toplevel
  me = jax.process_index()

  def scorer(*devices):
    mesh = types.SimpleNamespace(devices=np.array(
        [types.SimpleNamespace(platform=p, process_index=i) for p, i in devices], object))
    return types.SimpleNamespace(mesh=mesh)

  assert retrieval.default_path(scorer(("cpu", me), ("cpu", me))) == "host"
  assert retrieval.default_path(scorer(("cpu", me), ("cpu", me), ("cpu", me + 1))) == "buffered"
  assert retrieval.default_path(scorer(("gpu", me), ("gpu", me + 1))) == "streamed"

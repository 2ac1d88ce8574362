"""Retrieval's three ranking paths rank alike: the CPU path ("host": one score row per query
block, ranked by `host_top_k` in NumPy), the multi-process CPU path ("buffered": the same
row, one `lax.top_k`) and the accelerator path ("streamed": a running `top_k` per corpus
block) give bit-identical scores and indices, exact ties and exclusions included, on one
device and on the 4-device mesh. Their flat-matmul scores are the einsum's (what retrieval
used before) at retrieval's default CPU tiles. NumPy features are laid out
for the CPU devices to use in place, and non-finite ones are refused wherever they sit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cirjax.data.records import DataError
from cirjax.eval import placement, retrieval
from cirjax.models.scoring import max_over_tokens


def _features(seed, nq, nc, tokens, d=16):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((nq, d)).astype(np.float32)
  c = rng.standard_normal((nc, tokens, d)).astype(np.float32)
  c[20:26] = c[7]  # repeated images: exact ties (lower corpus index first)
  exclude = rng.integers(-1, nc, nq).astype(np.int32)
  return q, (c if tokens > 1 else c[:, 0]), exclude


def _both(scorer, k, exclude, **kw):
  """The buffered and streamed rankings, once the host path's is checked equal to the
  buffered one."""
  b = retrieval.top_k(scorer, k, exclude, path="buffered", **kw)
  h = retrieval.top_k(scorer, k, exclude, path="host", **kw)
  np.testing.assert_array_equal(h[1], b[1])
  np.testing.assert_array_equal(h[0], b[0])
  return b, retrieval.top_k(scorer, k, exclude, path="streamed", **kw)


@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("tokens,query_block,corpus_block", [
    (1, 256, None), (1, 7, 13), (4, 256, None), (4, 9, 1), (4, 32, 50), (32, 16, None)])
def test_host_buffered_and_streamed_rank_bit_for_bit(devices, tokens, query_block, corpus_block):
  mesh = retrieval.make_mesh(jax.devices()[:devices])
  q, c, exclude = _features(tokens, 37, 203, tokens)  # 203: padded on 4 devices
  scorer = retrieval.FeatureScorer(q, c, mesh=mesh)
  (bs, bi), (ss, si) = _both(scorer, 25, exclude, query_block=query_block,
                             corpus_block=corpus_block)
  np.testing.assert_array_equal(bi, si)
  np.testing.assert_array_equal(bs, ss)
  # and both are the float64 ranking wherever fp32 rounding cannot reorder
  full = np.einsum("qd,ntd->qnt", q.astype(np.float64),
                   retrieval.as_tokens(c).astype(np.float64)).max(-1)
  full[np.arange(37)[exclude >= 0], exclude[exclude >= 0]] = -np.inf
  np.testing.assert_allclose(bs, -np.sort(-full, axis=1)[:, :25], rtol=1e-5, atol=1e-5)


def test_fewer_local_rows_than_k():
  """10 images on 4 devices (3 rows each, the last padded) and k = 8: each device's list is
  filled with -inf entries that never reach the result."""
  q, c, exclude = _features(5, 6, 10, 2)
  c[3] = c[8]
  scorer = retrieval.FeatureScorer(q, c, mesh=retrieval.make_mesh())
  (bs, bi), (ss, si) = _both(scorer, 8, exclude)
  np.testing.assert_array_equal(bi, si)
  np.testing.assert_array_equal(bs, ss)
  assert (bi >= 0).all() and np.isfinite(bs).all()


def test_flat_scores_are_the_einsum_scores_at_retrievals_blocks():
  """At the default CPU tiles of BLIP-2-sized features (256 queries x 256 items x 32 tokens,
  and 256 x 8,192 single vectors; 256-d) the flat matmul gives the einsum's bits. At other
  shapes the two GEMMs may round the last bit differently."""
  rng = np.random.default_rng(0)
  for b, n, t, d in ((256, 256, 32, 256), (256, 8192, 1, 256)):
    q = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((n, t, d)), jnp.float32)
    flat = jax.jit(lambda q, c: max_over_tokens(q, c, flat=True))(q, c)
    ein = jax.jit(max_over_tokens)(q, c)
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(ein), err_msg=str((b, n, t, d)))
  with pytest.raises(ValueError, match="all pairs only"):
    max_over_tokens(q, c[:, None], paired=True, flat=True)


def test_numpy_features_are_used_in_place_when_aligned_and_copied_otherwise():
  mesh = retrieval.make_mesh(jax.devices()[:1])
  c = placement.aligned_empty((300, 4, 8), np.float32)
  c[...] = np.random.default_rng(1).standard_normal(c.shape)
  q = np.ones((3, 8), np.float32)
  c.flags.writeable = False  # as NumPy views of fetched jax.Arrays are
  scorer = retrieval.FeatureScorer(q, c, mesh=mesh)
  assert scorer.corpus_rows.addressable_data(0).unsafe_buffer_pointer() == c.ctypes.data
  unaligned = np.frombuffer(np.concatenate([np.zeros(4, np.uint8), c.view(np.uint8).ravel()])
                            .tobytes()[4:], np.float32).reshape(c.shape)
  before = unaligned.copy()
  other = retrieval.FeatureScorer(q, unaligned, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(other.corpus_rows), c)
  np.testing.assert_array_equal(unaligned, before)
  np.testing.assert_array_equal(retrieval.top_k(other, 5)[1], retrieval.top_k(scorer, 5)[1])


@pytest.mark.parametrize("where", ["first_row", "last_row", "query"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_refused(where, bad):
  """Anywhere in the ranked rows (the check runs in chunks on threads: the last row is in the
  last chunk); rows past `num_corpus` are not ranked and not checked."""
  q = np.ones((4, 8), np.float32)
  c = np.ones((300000, 8), np.float32)  # 9.6 MB: two 8 MiB chunks
  if where == "query":
    q[2, 3] = bad
  else:
    c[0 if where == "first_row" else -1, 5] = bad
  with pytest.raises(DataError, match="non-finite"):
    retrieval.FeatureScorer(q, c)
  if where == "last_row":
    retrieval.FeatureScorer(q, c, num_corpus=len(c) - 1)  # the bad row is padding

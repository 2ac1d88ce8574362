"""The frozen-feature store (a store of the `cirjax.data.row_store` engine): built once,
reused by a resumed run, rebuilt when the vision parameters change or the file on disk is
damaged; stores of other kinds in its directory are left alone; encode's sink."""

import jax
import ml_dtypes
import numpy as np
import pytest

from cirjax.data import row_store
from cirjax.eval import encode as encode_lib
from cirjax.eval import retrieval
from cirjax.train import feature_store as fs

SHAPE = (10, 5, 4)


def _feats(seed=0):
  return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def _build(tmp_path, key, dtype="float16", data=None, calls=None):
  data = _feats() if data is None else data

  def fill(rows, lo, hi):
    if calls is not None:
      calls.append((lo, hi))
    rows[lo:hi] = data[lo:hi].astype(rows.dtype)

  return fs.open_or_build(tmp_path, key, SHAPE, dtype, fill, log=lambda m: None)


def test_build_then_reuse_and_rows_in_fp16(tmp_path):
  calls = []
  store = _build(tmp_path, "a" * 64, calls=calls)
  assert calls == [(0, 10)] and store.dtype == np.float16 and store.shape == SHAPE
  assert store.nbytes == 10 * 5 * 4 * 2 and "float16" in store.describe()
  np.testing.assert_array_equal(store[[3, 1, 3]], _feats()[[3, 1, 3]].astype(np.float16))
  again = _build(tmp_path, "a" * 64, calls=calls)
  assert calls == [(0, 10)]  # reused, not re-encoded
  np.testing.assert_array_equal(again[np.arange(10)], store[np.arange(10)])
  assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed


@pytest.mark.parametrize("dtype,np_dtype", [("bfloat16", ml_dtypes.bfloat16),
                                            ("float32", np.float32)])
def test_other_precisions(tmp_path, dtype, np_dtype):
  store = _build(tmp_path, "b" * 64, dtype=dtype)
  assert store.dtype == np.dtype(np_dtype)
  np.testing.assert_array_equal(store[[0, 9]], _feats()[[0, 9]].astype(np_dtype))


def test_changed_vision_params_give_a_new_store_and_drop_the_old(tmp_path):
  params = {"w": np.ones((3, 3), np.float32)}
  spec = {"transform": "targetpad", "images": ["x", "y"]}
  k1 = fs.store_key(params, spec)
  assert fs.store_key({"w": np.ones((3, 3), np.float32)}, spec) == k1
  k2 = fs.store_key({"w": np.full((3, 3), 1.5, np.float32)}, spec)
  assert k2 != k1 and fs.store_key(params, {**spec, "transform": "squarepad"}) != k1
  _build(tmp_path, k1)
  calls = []
  store = _build(tmp_path, k2, data=_feats(1), calls=calls)
  assert calls == [(0, 10)]
  np.testing.assert_array_equal(store[[2]], _feats(1)[[2]].astype(np.float16))
  # The old store is gone; the build lock file stays (docs/data.md#build-locks).
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [store.path.name, store.path.with_suffix(".json").name, ".vision.lock"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar"])
def test_a_damaged_store_is_detected_and_rebuilt(tmp_path, damage):
  key = "c" * 64
  store = _build(tmp_path, key)
  path = store.path
  del store
  if damage == "flip":
    b = bytearray(path.read_bytes())
    b[7] ^= 0xFF
    path.write_bytes(bytes(b))
    with pytest.raises(fs.StoreError, match="checksum"):
      fs.check(tmp_path, key, SHAPE, "float16")
  elif damage == "truncate":
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(fs.StoreError, match="truncated"):
      fs.check(tmp_path, key, SHAPE, "float16")
  else:
    path.with_suffix(".json").unlink()
  logs, calls = [], []

  def fill(rows, lo, hi):
    calls.append((lo, hi))
    rows[lo:hi] = _feats()[lo:hi].astype(rows.dtype)

  store = fs.open_or_build(tmp_path, key, SHAPE, "float16", fill, log=logs.append)
  assert calls == [(0, 10)]
  assert (damage == "no_sidecar") != any("rebuilding" in m for m in logs)
  np.testing.assert_array_equal(store[np.arange(10)], _feats().astype(np.float16))
  fs.check(tmp_path, key, SHAPE, "float16")


def test_bad_precision_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="feature_dtype='int8'"):
    fs.storage_dtype("int8")


def test_other_kinds_in_the_directory_stay(tmp_path):
  def fill(rows, lo, hi):
    rows[lo:hi] = 7

  other = row_store.open_or_build(tmp_path, "pixels", "d" * 64, (4, 2, 2, 3), "uint8", fill,
                                  log=lambda m: None)
  _build(tmp_path, "e" * 64)
  _build(tmp_path, "f" * 64)  # a new feature store drops the stale one, not the pixels
  assert other.path.is_file() and len(list(tmp_path.glob("vision_*.bin"))) == 1
  assert (other[[1]] == 7).all() and other.built


def _double(x):
  return 2 * x


def test_encode_streams_batches_to_a_sink():
  mesh = retrieval.make_mesh(jax.devices())
  x = np.arange(22 * 3, dtype=np.float32).reshape(22, 3)
  out = np.zeros((22, 3), np.float16)

  def sink(start, y):
    out[start:start + len(y)] = y

  got = encode_lib.encode(_double, None, x, mesh=mesh, batch_size=8, dtype=np.float16,
                          sink=sink)
  assert got is None
  np.testing.assert_array_equal(out, (2 * x).astype(np.float16))

"""How retrieval's features reach the devices and its results come back: features as rows
split over a mesh (NumPy rows for this process's CPU devices checked and laid out in 64-byte
aligned memory that XLA uses in place), small host arrays replicated, and the one way results
are read back (`to_host`, which tests count).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cirjax.data.records import DataError
from cirjax.eval import host_threads
from cirjax.eval.encode import row_sharding

_FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16))


def pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if x.shape[0] == n:
    return x
  pad = np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad], axis=0)


def round_up(n: int, m: int) -> int:
  return int(math.ceil(n / m) * m)


def to_host(x: jax.Array) -> np.ndarray:
  """The one way results leave the devices here (tests count what passes): a replicated
  array, read from this process's first copy, or (the host path's block scores) an array
  whose every shard is on this process's CPU devices, in the same memory."""
  if x.sharding.is_fully_replicated:
    return np.asarray(jax.device_get(x.addressable_data(0)))
  if not (x.is_fully_addressable and all(d.platform == "cpu" for d in x.sharding.device_set)):
    raise AssertionError(f"retrieval fetches replicated results only, got {x.sharding}")
  return np.asarray(jax.device_get(x))


def replicated(x: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """A small host array on every device of `mesh` (every process passes the same value)."""
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P()), lambda idx: x[idx])


def mesh_of(x) -> jax.sharding.Mesh | None:
  sh = getattr(x, "sharding", None)
  return sh.mesh if isinstance(sh, NamedSharding) else None


def feature_array(x):
  """NumPy features in a dtype the devices take (fp64 and integers become fp32)."""
  if isinstance(x, jax.Array):
    return x
  x = np.asarray(x)
  return x if x.dtype in _FEATURE_DTYPES else x.astype(np.float32)


def rows_on_mesh(x, n: int, mesh: jax.sharding.Mesh) -> jax.Array:
  """`x[:n]` with zero rows appended up to a multiple of the device count, rows split over
  every axis of `mesh`. An array already laid out so (what `encode(..., pad_rows=True)`
  returns) is used as it is; NumPy rows go straight to their devices."""
  rows = round_up(n, mesh.devices.size)
  sh = row_sharding(mesh, x.ndim)
  if isinstance(x, jax.Array):
    if x.shape[0] == rows and x.sharding.is_equivalent_to(sh, x.ndim):
      return x

    def fit(a):
      a = a[:n]
      return jnp.pad(a, [(0, rows - n)] + [(0, 0)] * (a.ndim - 1))

    return jax.jit(fit, out_shardings=sh)(x)

  def rows_of(idx):
    start, stop, _ = idx[0].indices(rows)
    part = np.asarray(x[min(start, n):min(stop, n)])
    return pad_rows(part, stop - start)[(slice(None),) + tuple(idx[1:])]

  return jax.make_array_from_callback((rows,) + x.shape[1:], sh, rows_of)


_ALIGN = 64  # XLA's CPU client aliases host memory this aligned instead of copying it
_CHUNK_BYTES = 8 << 20


def aligned_empty(shape, dtype) -> np.ndarray:
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  off = (-raw.ctypes.data) % _ALIGN
  return raw[off:off + nbytes].view(dtype).reshape(shape)


def cpu_host_rows(x: np.ndarray, n: int, rows: int) -> tuple[np.ndarray, bool]:
  """`x[:n]` and zero rows up to `rows`, in 64-byte aligned memory that the CPU devices use
  in place, and whether those `n` rows are finite. `x` itself when it is already laid out so;
  otherwise one copy, made with the finite check in cache-sized chunks on `host_threads`
  (a 268 MB corpus took 0.23 s to check and hand to `device_put`, which copies unaligned
  memory on one thread, and 0.05 s so; an 8 MB one is split in one chunk per thread)."""
  reuse = (rows == n == x.shape[0] and x.flags.c_contiguous and x.ctypes.data % _ALIGN == 0)
  out = x if reuse else aligned_empty((rows,) + x.shape[1:], x.dtype)
  row_bytes = max(1, x[:1].nbytes)
  step = max(1, min(_CHUNK_BYTES // row_bytes, -(-n // host_threads.count())))

  def chunk(a):
    b = min(a + step, n)
    if not reuse:
      np.copyto(out[a:b], x[a:b])
    return bool(np.isfinite(out[a:b]).all())

  finite = all(host_threads.run(chunk, range(0, n, step)))
  if not reuse:  # `x` may be read-only (a fetched jax.Array): written only when copied
    out[n:] = 0
  return out, finite


def checked_rows_on_mesh(x, n: int, mesh: jax.sharding.Mesh) -> jax.Array:
  """`rows_on_mesh` once the first `n` rows are known finite (else a DataError, before
  anything is placed). NumPy rows for this process's CPU devices are checked while they are
  laid out for the devices to use in place (`cpu_host_rows`)."""
  devices = mesh.devices.flat
  if not isinstance(x, jax.Array) and all(
      d.platform == "cpu" and d.process_index == jax.process_index() for d in devices):
    rows = round_up(n, mesh.devices.size)
    x, finite = cpu_host_rows(x, n, rows)
    n = rows
  else:
    finite = rows_finite(x, n)
  if not finite:
    raise DataError("non-finite (NaN/inf) features: refusing to rank")
  return rows_on_mesh(x, n, mesh)


def rows_finite(x, n: int) -> bool:
  """Whether the first `n` rows are finite: NumPy on the host, device arrays where they are
  (one flag comes back)."""
  if not isinstance(x, jax.Array):
    return bool(np.isfinite(x[:n]).all())
  return bool(to_host(_device_rows_finite(x, n=n)))


@functools.partial(jax.jit, static_argnames=("n",))
def _device_rows_finite(x, *, n):
  ok = jnp.isfinite(x).reshape(x.shape[0], -1).all(1) | (jnp.arange(x.shape[0]) >= n)
  return ok.all()

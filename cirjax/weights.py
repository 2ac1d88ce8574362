"""Reading and writing PyTorch-world weight files without trusting them.

* safetensors are parsed here directly (header + raw bytes), without torch, so bf16 and
  fp8 tensors load as `ml_dtypes` arrays and a truncated or corrupt file gets an error that
  names it.
* `.bin` / `.pt` / `.pth` pickles load only through `torch.load(weights_only=True)`: a pickle
  that would import or call anything beyond plain tensors is refused, never executed.
* `StateDictReader` hands tensors out by key with shape checks and keeps strict accounts:
  at the end one error lists every missing, unexpected and mis-shaped key by name.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64), "BOOL": np.dtype(np.bool_),
}
_NAME_OF_DTYPE = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Largest header we accept; real headers are a few MB at most.
_MAX_HEADER = 100 * 1024 * 1024


class WeightFileError(ValueError):
  """A weight file is missing, truncated, corrupt or unsafe. The message names the file."""


class KeyAccountingError(ValueError):
  """Source tensors and target parameters do not match one to one."""

  def __init__(self, source: str, missing=(), unexpected=(), mismatched=()):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    lines = [f"weights in {source} do not match the model:"]
    if self.missing:
      lines.append(f"  {len(self.missing)} missing key(s): " + ", ".join(self.missing))
    if self.unexpected:
      lines.append(f"  {len(self.unexpected)} unexpected key(s) (not used by any parameter): "
                   + ", ".join(self.unexpected))
    if self.mismatched:
      lines.append(f"  {len(self.mismatched)} shape mismatch(es): " + ", ".join(
          f"{k} has shape {got}, expected {want}" for k, got, want in self.mismatched))
    super().__init__("\n".join(lines))


# ------------------------------------------------------------------------------- safetensors

def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
  """Returns (header dict, byte offset of the data section); validates it against the file."""
  path = Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise WeightFileError(f"{path}: not a safetensors file (only {size} bytes, no header)")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
      raise WeightFileError(f"{path}: corrupt or truncated safetensors file (header length {n} "
                            f"bytes, file is {size} bytes)")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
      raise ValueError("header is not a JSON object")
  except (UnicodeDecodeError, ValueError) as e:
    raise WeightFileError(f"{path}: corrupt safetensors header ({e})") from None
  data_start = 8 + n
  data_len = size - data_start
  for key, info in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype = SAFETENSORS_DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      start, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise WeightFileError(f"{path}: corrupt safetensors entry for tensor {key!r}: {info!r}") from None
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - start != want or start < 0:
      raise WeightFileError(f"{path}: corrupt safetensors entry for tensor {key!r}: offsets "
                            f"{start}..{end} do not hold shape {shape} of {info['dtype']}")
    if end > data_len:
      raise WeightFileError(f"{path}: truncated safetensors file: tensor {key!r} ends at byte "
                            f"{data_start + end} but the file has {size} bytes")
  return header, data_start


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a safetensors file into numpy (bf16/fp8 as ml_dtypes)."""
  path = Path(path)
  header, data_start = read_safetensors_header(path)
  out = {}
  with open(path, "rb") as f:
    for key, info in header.items():
      if key == "__metadata__":
        continue
      start, end = info["data_offsets"]
      f.seek(data_start + start)
      buf = f.read(end - start)
      if len(buf) != end - start:
        raise WeightFileError(f"{path}: truncated while reading tensor {key!r}")
      dtype = SAFETENSORS_DTYPES[info["dtype"]]
      out[key] = np.frombuffer(buf, dtype=dtype).reshape(info["shape"]).copy()
  return out


def write_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes a flat dict of arrays as one safetensors file (atomically, via a temp file).

  `metadata` defaults to {"format": "pt"}, which `transformers.from_pretrained` expects.
  """
  path = Path(path)
  meta = {"format": "pt"} if metadata is None else dict(metadata)
  header: dict = {"__metadata__": {str(k): str(v) for k, v in meta.items()}}
  arrays = []
  offset = 0
  for key in sorted(state):
    a = np.ascontiguousarray(np.asarray(state[key]))
    if a.dtype not in _NAME_OF_DTYPE:
      raise ValueError(f"cannot write tensor {key!r}: dtype {a.dtype} has no safetensors name")
    header[key] = {"dtype": _NAME_OF_DTYPE[a.dtype], "shape": list(a.shape),
                   "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(struct.pack("<Q", len(raw)))
      f.write(raw)
      for a in arrays:
        f.write(a.tobytes())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_safetensors_sharded(state: Mapping[str, np.ndarray], directory: str | os.PathLike,
                              *, max_shard_bytes: int = 5 * 1024 ** 3,
                              basename: str = "model") -> list[str]:
  """Writes `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus
  `model.safetensors.index.json` (HF layout) when the state is larger than `max_shard_bytes`.
  Returns the file names written."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  shards: list[dict] = [{}]
  size = 0
  total = 0
  for key in sorted(state):
    nbytes = np.asarray(state[key]).nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = state[key]
    size += nbytes
    total += nbytes
  if len(shards) == 1:
    write_safetensors(shards[0], directory / f"{basename}.safetensors")
    return [f"{basename}.safetensors"]
  names = []
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(shard, directory / name)
    names.append(name)
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (directory / f"{basename}.safetensors.index.json").write_text(json.dumps(index, indent=2))
  return names + [f"{basename}.safetensors.index.json"]


# ------------------------------------------------------------------------------ torch pickles

def read_torch_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Loads a `.bin`/`.pt`/`.pth` state dict with `torch.load(weights_only=True)`.

  A file whose pickle would import or call anything beyond tensors and containers is refused
  (torch's restricted unpickler stops before running it). A `{'model': state_dict}` or
  `{'state_dict': ...}` wrapper (LAVIS, Lightning) is unwrapped.
  """
  path = Path(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightFileError(f"{path}: reading PyTorch pickles needs torch "
                          "(pip install -e '.[torch]'); safetensors files do not") from None
  import pickle  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()
    detail = next((l for l in first if "Unsupported" in l or "global" in l.lower()),
                  first[0] if first else "")
    raise WeightFileError(f"{path}: refused to load: the pickle asks to run code that a plain "
                          f"weights file never needs (loaded with weights_only=True, nothing "
                          f"was executed). {detail.strip()}") from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise WeightFileError(f"{path}: corrupt or truncated PyTorch file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
  for wrapper in ("model", "state_dict", "module"):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict) and not any(
        isinstance(v, torch.Tensor) for v in obj.values()):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise WeightFileError(f"{path}: expected a state dict (name -> tensor), got "
                          f"{type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      out[str(k)] = _torch_to_numpy(v)
  if not out:
    raise WeightFileError(f"{path}: contains no tensors")
  return out


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  if t.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
    target = ml_dtypes.float8_e4m3fn if t.dtype == torch.float8_e4m3fn else ml_dtypes.float8_e5m2
    return t.view(torch.uint8).numpy().view(target).copy()
  return t.numpy().copy()


# --------------------------------------------------------------------------- files and dirs

_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


def weight_files(path: str | os.PathLike) -> list[Path]:
  """The weight file(s) of a file or an HF model directory (sharded or not)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or directory")
  if path.is_file():
    return [path]
  for name in _INDEX_NAMES:
    idx = path / name
    if idx.exists():
      try:
        weight_map = json.loads(idx.read_text())["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise WeightFileError(f"{idx}: corrupt shard index ({e})") from None
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not (path / f).exists()]
      if missing:
        raise WeightFileError(f"{idx}: lists shard file(s) that do not exist: {missing}")
      return [path / f for f in files]
  for name in _SINGLE_NAMES:
    if (path / name).exists():
      return [path / name]
  cands = sorted(p for p in path.iterdir()
                 if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
  if len(cands) == 1:
    return cands
  if not cands:
    raise WeightFileError(f"{path}: no weights found (expected model.safetensors, sharded "
                          "model-*.safetensors with model.safetensors.index.json, "
                          "pytorch_model.bin or a .pt/.pth file)")
  raise WeightFileError(f"{path}: several weight files and no index to say which: "
                        f"{[c.name for c in cands]}")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads all tensors of a weight file or HF model directory into one flat numpy dict.

  Supports `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
  `pytorch_model.bin` (sharded or not) and `.pt`/`.pth` state dicts.
  """
  state: dict[str, np.ndarray] = {}
  for f in weight_files(path):
    if f.suffix == ".safetensors":
      part = read_safetensors(f)
    elif f.suffix in (".bin", ".pt", ".pth", ".ckpt"):
      part = read_torch_pickle(f)
    else:
      raise WeightFileError(f"{f}: unknown weight file type {f.suffix!r}")
    dup = sorted(set(part) & set(state))
    if dup:
      raise WeightFileError(f"{f}: tensor(s) also present in another shard: {dup[:10]}")
    state.update(part)
  return state


# ------------------------------------------------------------------------- key accounting

class StateDictReader:
  """Hands out source tensors by key and keeps strict accounts.

  `take(key, shape)` returns the tensor (numpy) after checking its shape. A missing key or a
  wrong shape is recorded (and a zero placeholder returned) so that one conversion pass can
  report every problem at once; `finish()` then raises a `KeyAccountingError` naming every
  missing, unexpected (never taken) and mis-shaped key. `ignore` holds regexes of source keys
  known to be unused (e.g. LAVIS's `Qformer.cls.*` language-model head); they are not
  reported, and the ignored keys actually seen are available as `.ignored`.
  """

  def __init__(self, state: Mapping[str, np.ndarray], *, source: str = "state dict",
               ignore: Iterable[str] = ()):
    self.state = state
    self.source = source
    self._ignore = [re.compile(p) for p in ignore]
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mismatched: list[tuple[str, tuple, tuple]] = []

  def __contains__(self, key: str) -> bool:
    return key in self.state

  def keys(self):
    return self.state.keys()

  def take(self, key: str, shape: Optional[Sequence[int]] = None,
           dtype=None) -> np.ndarray:
    if key in self.used:
      raise ValueError(f"{self.source}: key {key!r} taken twice (conversion table bug)")
    if key not in self.state:
      self.missing.append(key)
      return np.zeros(tuple(shape) if shape is not None else (), np.float32)
    self.used.add(key)
    value = np.asarray(self.state[key])
    if shape is not None and tuple(value.shape) != tuple(shape):
      self.mismatched.append((key, tuple(value.shape), tuple(shape)))
      return np.zeros(tuple(shape), np.float32)
    if dtype is not None:
      value = value.astype(dtype)
    return value

  def skip(self, key: str) -> None:
    """Marks a present key as deliberately unused."""
    if key in self.state:
      self.used.add(key)

  def is_ignored(self, key: str) -> bool:
    return any(p.search(key) for p in self._ignore)

  @property
  def ignored(self) -> list[str]:
    return sorted(k for k in self.state if k not in self.used and self.is_ignored(k))

  @property
  def unexpected(self) -> list[str]:
    return sorted(k for k in self.state if k not in self.used and not self.is_ignored(k))

  def finish(self) -> None:
    """Raises KeyAccountingError unless every parameter was filled and every key used."""
    if self.missing or self.mismatched or self.unexpected:
      raise KeyAccountingError(self.source, self.missing, self.unexpected, self.mismatched)


# ------------------------------------------------------------------------ conversion tables
#
# A conversion table is data: rows (target param path, source key, transform name). The
# transforms below map a source (PyTorch) tensor to the target (Flax) layout; INVERSE maps back.

TRANSFORMS = {
    "id": lambda w: np.asarray(w),
    "linear": lambda w: np.ascontiguousarray(np.asarray(w).T),  # [out, in] -> [in, out]
    "conv": lambda w: np.ascontiguousarray(np.transpose(np.asarray(w), (2, 3, 1, 0))),
}
INVERSE = {
    "id": lambda w: np.asarray(w),
    "linear": lambda w: np.ascontiguousarray(np.asarray(w).T),
    "conv": lambda w: np.ascontiguousarray(np.transpose(np.asarray(w), (3, 2, 0, 1))),
}


def source_shape(transform: str, target_shape: Sequence[int]) -> tuple:
  """The source tensor shape a transform expects, given the target shape."""
  s = tuple(target_shape)
  if transform == "linear":
    return tuple(reversed(s))
  if transform == "conv":
    return (s[3], s[2], s[0], s[1])
  return s


def flat_shapes(tree) -> dict[tuple, tuple]:
  """{path tuple: shape} of a (possibly abstract) nested-dict pytree."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[tuple(getattr(k, "key", k) for k in path)] = tuple(leaf.shape)
  return out


def set_path(tree: dict, path: Sequence[str], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def get_path(tree, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree


def fill_from_table(reader: StateDictReader, rows, prefix: str, shapes: Mapping[tuple, tuple],
                    params: Optional[dict] = None) -> dict:
  """Takes each row's source tensor (asserting its shape) and stores it transformed, as fp32."""
  params = {} if params is None else params
  for dst, src, tr in rows:
    w = reader.take(prefix + src, source_shape(tr, shapes[dst]))
    set_path(params, dst, np.asarray(TRANSFORMS[tr](w), np.float32))
  return params


def export_table(params, rows, prefix: str) -> dict[str, np.ndarray]:
  """The inverse of `fill_from_table`: {source key: tensor (fp32)}."""
  return {prefix + src: INVERSE[tr](np.asarray(get_path(params, dst), np.float32))
          for dst, src, tr in rows}

"""Files in and out: PyTorch-world weight files, and cirjax model directories.

Weight files are read without trusting them:
* safetensors are parsed here directly (header + raw bytes), without torch, so bf16 and
  fp8 tensors load as `ml_dtypes` arrays and a truncated or corrupt file gets an error that
  names it.
* `.bin` / `.pt` / `.pth` pickles load only through `torch.load(weights_only=True)`: a pickle
  that would import or call anything beyond plain tensors is refused, never executed.

A cirjax model directory (`save_model_dir`) is an Orbax checkpoint of the params plus
`cirjax_config.json`:

    DIR/cirjax_config.json   {"format": "cirjax", "format_version": 1,
                              "model_type": "blip2" | "llava", "config": {...}}
    DIR/params/              Orbax (StandardCheckpointer) checkpoint of the param pytree

Writes are atomic (`atomic_directory`): everything goes to a temporary directory beside the
destination, which is renamed into place only when complete. An existing destination is
never touched unless `overwrite=True`, and even then it is replaced only after the new one
is fully written.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import uuid
from pathlib import Path
from typing import Any, Collection, Mapping, Optional

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from cirjax.errors import CirjaxError

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


class WeightFileError(CirjaxError, ValueError):
  """A weight file is missing, truncated, corrupt or unsafe. The message names the file."""


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


def read_safetensors(path: str | os.PathLike, keys: Optional[Collection[str]] = None
                     ) -> dict[str, np.ndarray]:
  """Reads every tensor of a safetensors file (or only `keys`) into numpy (bf16/fp8 as
  ml_dtypes)."""
  path = Path(path)
  header, data_start = read_safetensors_header(path)
  out = {}
  with open(path, "rb") as f:
    for key, info in header.items():
      if key == "__metadata__" or (keys is not None and key not in keys):
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
    a = np.asarray(state[key], order="C")  # keeps a 0-d tensor 0-d (ascontiguousarray: (1,))
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
    # torch is heavy and optional: only pickled weight files need it
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightFileError(f"{path}: reading PyTorch pickles needs torch "
                          "(pip install -e '.[torch]'); safetensors files do not") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
  except pickle.UnpicklingError as e:
    first = str(e).strip().splitlines()
    detail = next((l for l in first if "Unsupported" in l or "global" in l.lower()),
                  first[0] if first else "")
    raise WeightFileError(f"{path}: refused to load: the pickle asks to run code that a plain "
                          f"weights file never needs (loaded with weights_only=True, nothing "
                          f"was executed). {detail.strip()}") from None
  except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
          AttributeError) as e:  # torch's restricted unpickler fails on garbage in many ways
    raise WeightFileError(f"{path}: corrupt or truncated PyTorch file, or not one "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                          ) from None
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
  import torch  # pylint: disable=g-import-not-at-top  # heavy, optional (as above)
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


def read_state_dict(path: str | os.PathLike, keys: Optional[Collection[str]] = None
                    ) -> dict[str, np.ndarray]:
  """Reads all tensors (or only `keys`, when present) of a weight file or HF model directory
  into one flat numpy dict.

  Supports `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
  `pytorch_model.bin` (sharded or not) and `.pt`/`.pth` state dicts. Only safetensors skip
  the bytes of unwanted tensors; a pickle is read whole.
  """
  state: dict[str, np.ndarray] = {}
  for f in weight_files(path):
    if f.suffix == ".safetensors":
      part = read_safetensors(f, keys)
    elif f.suffix in (".bin", ".pt", ".pth", ".ckpt"):
      part = read_torch_pickle(f)
      if keys is not None:
        part = {k: v for k, v in part.items() if k in keys}
    else:
      raise WeightFileError(f"{f}: unknown weight file type {f.suffix!r}")
    dup = sorted(set(part) & set(state))
    if dup:
      raise WeightFileError(f"{f}: tensor(s) also present in another shard: {dup[:10]}")
    state.update(part)
  return state


# --------------------------------------------------------------------- cirjax model dirs

CONFIG_NAME = "cirjax_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def is_cirjax_dir(path: str | os.PathLike) -> bool:
  """True if `path` is a directory written by `save_model_dir`."""
  p = Path(path)
  return p.is_dir() and (p / CONFIG_NAME).is_file()


def read_cirjax_config(path: str | os.PathLike) -> dict:
  """Reads and validates DIR/cirjax_config.json."""
  f = Path(path) / CONFIG_NAME
  if not f.is_file():
    raise FileNotFoundError(f"{path}: not a cirjax model directory (no {CONFIG_NAME})")
  try:
    meta = json.loads(f.read_text())
  except ValueError as e:
    raise WeightFileError(f"{f}: not valid JSON ({e})") from None
  if not isinstance(meta, dict):
    raise WeightFileError(f"{f}: holds a JSON {type(meta).__name__}, expected an object")
  for key in ("model_type", "config"):
    if key not in meta:
      raise WeightFileError(f"{f}: missing field {key!r}")
  if meta.get("format_version", 1) > FORMAT_VERSION:
    raise WeightFileError(f"{f}: format_version {meta['format_version']} is newer than this "
                          f"cirjax understands ({FORMAT_VERSION})")
  return meta


class atomic_directory:  # pylint: disable=invalid-name
  """Context manager: yields a fresh temp dir beside `dst`; on success renames it to `dst`.

  On an exception the temp dir is removed and `dst` is untouched. If `dst` exists and
  `overwrite` is False, raises FileExistsError before anything is written.
  """

  def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False):
    self.dst = Path(dst).absolute()
    self.overwrite = overwrite
    self.tmp: Optional[Path] = None

  def __enter__(self) -> Path:
    if self.dst.exists() and not self.overwrite:
      raise FileExistsError(f"{self.dst} already exists; pass overwrite=True (--overwrite) to "
                            "replace it")
    self.dst.parent.mkdir(parents=True, exist_ok=True)
    self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    assert self.tmp is not None
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return False
    if self.dst.exists():
      if not self.overwrite:  # appeared while we were writing
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise FileExistsError(f"{self.dst} appeared while writing; left it untouched")
      old = self.dst.parent / f".{self.dst.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(self.dst, old)
      try:
        os.rename(self.tmp, self.dst)
      except BaseException:
        os.rename(old, self.dst)
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise
      if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
      else:
        old.unlink()
    else:
      os.rename(self.tmp, self.dst)
    return False


def _to_host(params: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x) if not isinstance(x, jax.Array) else x, params)


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"config value {o!r} of type {type(o).__name__} is not JSON-serialisable")


def write_params(directory: str | os.PathLike, params: Any) -> None:
  """Writes an Orbax checkpoint of `params` to `directory` (which must not exist)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(Path(directory).absolute(), _to_host(params))
  ckptr.wait_until_finished()
  ckptr.close()


def read_params(directory: str | os.PathLike, target: Any = None) -> Any:
  """Restores an Orbax params checkpoint. `target` may be an abstract pytree (e.g. of
  `jax.ShapeDtypeStruct` with shardings) to restore straight into sharded arrays; without it
  the arrays land on the default device."""
  directory = Path(directory).absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: params checkpoint directory is missing")
  ckptr = ocp.StandardCheckpointer()
  try:
    if target is None:
      meta = ckptr.metadata(directory)
      tree = getattr(meta, "item_metadata", meta)
      tree = getattr(tree, "tree", tree)
      target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                         sharding=jax.sharding.SingleDeviceSharding(
                                             jax.devices()[0])), tree)
    return ckptr.restore(directory, target)
  except (ValueError, OSError, KeyError, TypeError) as e:  # Orbax / TensorStore on bad files
    reason = str(e).split(" [tensorstore_spec=")[0].splitlines()[0][:300]
    raise WeightFileError(
        f"{_damaged_file(directory, e)}: cannot restore the params checkpoint {directory} "
        f"({type(e).__name__}: {reason}); it is damaged or incomplete: write it again (convert "
        "or export the model) or use another checkpoint") from e
  finally:
    ckptr.close()


_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')


def _damaged_file(directory: Path, exc: BaseException) -> str:
  """The file a failed restore of `directory` points at, as far as can be told."""
  if isinstance(exc, ValueError) and not _TENSORSTORE_FILE.search(str(exc)):
    for name in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding"):  # Orbax's JSON files
      f = directory / name
      try:
        if f.is_file():
          json.loads(f.read_bytes().decode("utf-8"))
      except ValueError:  # UnicodeDecodeError and JSONDecodeError among them
        return str(f)
  if getattr(exc, "filename", None):
    return str(exc.filename)
  files = [m for m in _TENSORSTORE_FILE.findall(str(exc)) if not m.endswith("/")]
  return files[-1] if files else str(directory)


def save_model_dir(path: str | os.PathLike, params: Any, config: Mapping[str, Any],
                   model_type: str, *, overwrite: bool = False,
                   extra: Optional[Mapping[str, Any]] = None,
                   extra_files: Optional[Mapping[str, str | os.PathLike]] = None) -> Path:
  """Saves params (Orbax) and `cirjax_config.json` to `path`, atomically.

  Args:
    path: destination directory. Must not exist unless `overwrite`.
    params: the param pytree (nested dicts of arrays).
    config: JSON-serialisable model config (e.g. `Blip2Config.to_dict()`).
    model_type: 'blip2', 'llava', ...; `load_model_dir` returns it for dispatch.
    overwrite: replace an existing destination (only after the new one is complete).
    extra: more JSON fields for cirjax_config.json (e.g. where the weights came from).
    extra_files: {name in the directory: source file} copied along (e.g. the tokenizer).
  """
  meta = {"format": "cirjax", "format_version": FORMAT_VERSION, "model_type": model_type,
          "config": dict(config)}
  if extra:
    meta.update(dict(extra))
  text = json.dumps(meta, indent=2, default=_json_default)  # fail before writing anything
  with atomic_directory(path, overwrite=overwrite) as tmp:
    write_params(tmp / PARAMS_DIR, params)
    (tmp / CONFIG_NAME).write_text(text + "\n")
    for name, src in (extra_files or {}).items():
      shutil.copyfile(src, tmp / name)
  return Path(path)


def load_model_dir(path: str | os.PathLike, *, target: Any = None) -> tuple[str, dict, Any]:
  """Loads a directory written by `save_model_dir`: returns (model_type, config dict, params).

  `target`: optional abstract pytree (shapes, dtypes, shardings) to restore into.
  """
  meta = read_cirjax_config(path)
  params = read_params(Path(path) / PARAMS_DIR, target)
  return meta["model_type"], meta["config"], params

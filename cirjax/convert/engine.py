"""The conversion engine: row tables -> shape-checked two-way transforms, strictly accounted.

A conversion table is data: rows `(cirjax path, source key, transform name)`. A row may
also map several source keys to one parameter, or one key to several parameters (a tuple
of keys / a tuple of paths), e.g. LAVIS's `in_proj_weight` -> q/k/v kernels. Each model
keeps its tables beside it (`vit.vit_hf_table`, `qformer.qformer_table`,
`blip2_convert.hf_table` / `lavis_table`, `llava_convert.full_table`); this module runs
them:

* `convert(source, rows, target)` takes each row's source tensor(s) from a
  `StateDictReader`, asserting the shape the transform expects for the target's shape, and
  stores the transformed value. Given shape-only values (`jax.ShapeDtypeStruct`, e.g. from
  `abstract_state`) it checks every shape and builds a `ShapeDtypeStruct` tree without
  materialising a weight (the abstract mode).
* `export(params, rows)` is the inverse: cirjax params -> {source key: tensor}.
* `StateDictReader` keeps strict accounts: one `KeyAccountingError` names every missing,
  unexpected, mis-shaped and mistyped key (an integer or boolean tensor where a
  floating-point parameter is expected: a cast would silently make a model of garbage).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import numpy as np

from cirjax.errors import CirjaxError


class KeyAccountingError(CirjaxError, ValueError):
  """Source tensors and target parameters do not match one to one."""

  def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), mistyped=()):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    self.mistyped = list(mistyped)
    lines = [f"weights in {source} do not match the model:"]
    if self.missing:
      lines.append(f"  {len(self.missing)} missing key(s): " + ", ".join(self.missing))
    if self.unexpected:
      lines.append(f"  {len(self.unexpected)} unexpected key(s) (not used by any parameter): "
                   + ", ".join(self.unexpected))
    if self.mismatched:
      lines.append(f"  {len(self.mismatched)} shape mismatch(es): " + ", ".join(
          f"{k} has shape {got}, expected {want}" for k, got, want in self.mismatched))
    if self.mistyped:
      lines.append(f"  {len(self.mistyped)} dtype mismatch(es): " + ", ".join(
          f"{k} is {got}, expected a floating-point tensor" for k, got in self.mistyped))
    super().__init__("\n".join(lines))


def is_abstract(x: Any) -> bool:
  """True for shape-only stand-ins (`jax.ShapeDtypeStruct`), which the engine never reads."""
  return isinstance(x, jax.ShapeDtypeStruct)


def abstract_state(shapes: Mapping[str, Sequence[int]], dtype=np.float32) -> dict:
  """{key: shape} -> {key: ShapeDtypeStruct}: a state dict to convert in abstract mode."""
  return {k: jax.ShapeDtypeStruct(tuple(s), dtype) for k, s in shapes.items()}


class StateDictReader:
  """Hands out source tensors by key and keeps strict accounts.

  `take(key, shape, floating)` returns the tensor after checking its shape (and, for a
  floating-point parameter, that it is not an integer or boolean tensor). A missing key, a
  wrong shape or a wrong kind is recorded (and a shape-only placeholder returned) so that one
  conversion pass can report every problem at once; `finish()` then raises a
  `KeyAccountingError` naming every missing, unexpected (never taken), mis-shaped and
  mistyped key. `ignore` holds regexes of source keys
  known to be unused (e.g. LAVIS's `Qformer.cls.*` language-model head); they are not
  reported, and the ignored keys actually seen are available as `.ignored`.
  """

  def __init__(self, state: Mapping[str, Any], *, source: str = "state dict",
               ignore: Iterable[str] = ()):
    self.state = state
    self.source = source
    self._ignore = [re.compile(p) for p in ignore]
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.mismatched: list[tuple[str, tuple, tuple]] = []
    self.mistyped: list[tuple[str, str]] = []

  def __contains__(self, key: str) -> bool:
    return key in self.state

  def keys(self):
    return self.state.keys()

  def take(self, key: str, shape: Optional[Sequence[int]] = None, floating: bool = False) -> Any:
    if key in self.used:
      raise ValueError(f"{self.source}: key {key!r} taken twice (conversion table bug)")
    placeholder = jax.ShapeDtypeStruct(tuple(shape) if shape is not None else (), np.float32)
    if key not in self.state:
      self.missing.append(key)
      return placeholder
    self.used.add(key)
    value = self.state[key]
    if not is_abstract(value):
      value = np.asarray(value)
    if shape is not None and tuple(value.shape) != tuple(shape):
      self.mismatched.append((key, tuple(value.shape), tuple(shape)))
      return placeholder
    if floating and np.dtype(value.dtype).kind in "iub":  # bf16/fp8 are kind 'V': floating
      self.mistyped.append((key, str(value.dtype)))
      return placeholder
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
    """Raises KeyAccountingError unless every parameter was filled from a tensor of its shape
    and kind and every key was used."""
    if self.missing or self.mismatched or self.mistyped or self.unexpected:
      raise KeyAccountingError(self.source, self.missing, self.unexpected, self.mismatched,
                               self.mistyped)


# ----------------------------------------------------------------------------- transforms


class Transform(NamedTuple):
  """A named, shape-aware mapping between source tensors and cirjax leaves.

  forward(*sources) -> tuple of leaves; inverse(*leaves) -> tuple of sources (None: the
  source layout cannot be rebuilt, e.g. LAVIS's zero k-bias); source_shapes(*leaf shapes)
  -> tuple of source shapes (what `convert` asserts).
  """
  forward: Callable[..., tuple]
  inverse: Optional[Callable[..., tuple]]
  source_shapes: Callable[..., tuple]


def _qv_bias(q, v):  # EVA's fused qkv has q and v biases only; k's is zero
  return (np.concatenate([q, np.zeros_like(q), v]),)


TRANSFORMS = {
    "id": Transform(lambda w: (w,), lambda w: (w,), lambda s: (s,)),
    # torch Linear [out, in] <-> flax kernel [in, out]
    "linear": Transform(lambda w: (w.T,), lambda k: (k.T,), lambda s: (s[::-1],)),
    # torch Conv2d [D, C, p, p] <-> [p, p, C, D]
    "conv": Transform(lambda w: (w.transpose(2, 3, 1, 0),), lambda k: (k.transpose(3, 2, 0, 1),),
                      lambda s: ((s[3], s[2], s[0], s[1]),)),
    # leading singleton dims of HF's class/position embeddings ([1, N, D], [1, 1, D])
    "lead1": Transform(lambda w: (w[0],), lambda x: (x[None],), lambda s: ((1,) + s,)),
    "lead2": Transform(lambda w: (w[0, 0],), lambda x: (x[None, None],), lambda s: ((1, 1) + s,)),
    # (q_bias, v_bias) -> fused qkv bias
    "qv_bias": Transform(_qv_bias, None, lambda s: ((s[0] // 3,), (s[0] // 3,))),
    # torch MultiheadAttention in_proj_weight [3D, in] <-> q, k, v kernels [in, D]
    "split3_linear": Transform(lambda w: tuple(c.T for c in np.split(w, 3)),
                               lambda *ks: (np.concatenate([k.T for k in ks]),),
                               lambda a, b, c: ((a[1] + b[1] + c[1], a[0]),)),
    # in_proj_bias [3D] <-> q, k, v biases [D]
    "split3": Transform(lambda b: tuple(np.split(b, 3)), lambda *bs: (np.concatenate(bs),),
                        lambda a, b, c: ((a[0] + b[0] + c[0],),)),
}


def _as_tuple(x, is_single: Callable[[Any], bool]) -> tuple:
  return (x,) if is_single(x) else tuple(x)


def row_paths(row) -> tuple[tuple, ...]:
  """The cirjax path(s) of a row."""
  dst = row[0]
  return _as_tuple(dst, lambda d: not d or isinstance(d[0], str))


def row_keys(row) -> tuple[str, ...]:
  """The source key(s) of a row."""
  return _as_tuple(row[1], lambda s: isinstance(s, str))


def prefixed(rows, dst_prefix: tuple = (), src_prefix: str = "") -> list:
  """The rows with `dst_prefix` before each path and `src_prefix` before each key."""
  out = []
  for row in rows:
    dsts = tuple(dst_prefix + d for d in row_paths(row))
    srcs = tuple(src_prefix + k for k in row_keys(row))
    out.append((dsts[0] if len(dsts) == 1 else dsts, srcs[0] if len(srcs) == 1 else srcs,
                row[2]))
  return out


# ----------------------------------------------------------------------------- trees


def flat_shapes(tree) -> dict[tuple, tuple]:
  """{path tuple: shape} of a (possibly abstract) nested-dict pytree."""
  return {tuple(getattr(k, "key", k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def set_path(tree: dict, path: Sequence[str], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def get_path(tree, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree


def check_tree(params, target, source: str = "state dict") -> None:
  """AssertionError (a converter bug, not a checkpoint problem) unless `params` has exactly
  the paths and shapes of `target`."""
  got, want = flat_shapes(params), flat_shapes(target)
  if got != want:
    missing = sorted("/".join(k) for k in set(want) - set(got))
    extra = sorted("/".join(k) for k in set(got) - set(want))
    bad = sorted("/".join(k) for k in set(got) & set(want) if got[k] != want[k])
    raise AssertionError(f"{source}: converter bug: param tree differs (missing {missing}, "
                         f"extra {extra}, mis-shaped {bad})")


# ----------------------------------------------------------------------------- the engine


def convert(source: StateDictReader | Mapping[str, Any], rows, target, *,
            dtype=np.float32, out: Optional[dict] = None) -> dict:
  """Fills cirjax params from `source` by the table `rows`.

  Args:
    source: a `StateDictReader` (the caller calls `finish()` once every table has run), or
      a plain mapping, wrapped in a reader that is finished here.
    rows: the conversion table.
    target: the abstract param tree the rows fill (e.g. `abstract_params(cfg)` or a subtree).
    dtype: dtype of the stored leaves.
    out: a tree to fill (default: a new one).
  Returns:
    `out`: numpy leaves, or `jax.ShapeDtypeStruct`s where a source value was shape-only.
  """
  own = not isinstance(source, StateDictReader)
  reader = StateDictReader(source) if own else source
  shapes = flat_shapes(target)
  kinds = {tuple(getattr(k, "key", k) for k in path): leaf.dtype
           for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  out = {} if out is None else out
  for row in rows:
    dsts, keys, tr = row_paths(row), row_keys(row), TRANSFORMS[row[2]]
    unknown = [d for d in dsts if d not in shapes]
    if unknown:
      raise AssertionError(f"conversion table names unknown parameter(s) "
                           f"{['/'.join(d) for d in unknown]}")
    want = [shapes[d] for d in dsts]
    floating = all(np.dtype(kinds[d]).kind in "fV" for d in dsts)
    values = [reader.take(k, s, floating) for k, s in zip(keys, tr.source_shapes(*want))]
    if any(is_abstract(v) for v in values):
      leaves = [jax.ShapeDtypeStruct(s, dtype) for s in want]
    else:
      # order='C', not ascontiguousarray, which turns a 0-d tensor into shape (1,)
      leaves = [np.asarray(v, dtype, order="C") for v in tr.forward(*values)]
    for d, leaf in zip(dsts, leaves):
      set_path(out, d, leaf)
  if own:
    reader.finish()
  return out


def export(params, rows) -> dict[str, np.ndarray]:
  """The inverse of `convert`: {source key: fp32 numpy tensor}."""
  out = {}
  for row in rows:
    tr = TRANSFORMS[row[2]]
    if tr.inverse is None:
      raise ValueError(f"transform {row[2]!r} of {row_keys(row)} has no inverse; this "
                       "layout cannot be exported")
    leaves = [np.asarray(jax.device_get(get_path(params, d)), np.float32)
              for d in row_paths(row)]
    for k, v in zip(row_keys(row), tr.inverse(*leaves)):
      out[k] = np.asarray(v, order="C")
  return out

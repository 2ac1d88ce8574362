"""Device mesh and parameter/batch shardings from the config (big_vision style).

The mesh has a data-parallel axis and an FSDP axis. A batch is split over both (every
device gets a different slice of the global batch). Parameters follow regex -> rule pairs;
the `fsdp` rule shards the largest dimension of a tensor that divides the FSDP axis size,
for tensors with at least `fsdp_min_size` elements, and replicates the rest. Shardings are
derived from `jax.eval_shape` of the initialiser, so the parameters never exist unsharded.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cirjax.errors import ConfigError
from cirjax.eval.mesh import MeshError, build_mesh

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_spec: Sequence[tuple[str, int]] = (("data", -1), ("fsdp", 1)),
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a mesh from `(axis_name, size)` pairs; one size may be -1 (all the rest).

  Axes are Auto-typed: the step relies on the compiler to propagate shardings from the
  explicit in/out shardings.
  """
  names = [n for n, _ in mesh_spec]
  if sorted(names) != sorted(BATCH_AXES):
    raise MeshError(f"config.mesh must name exactly the axes {BATCH_AXES}, got {names}")
  # Canonical order (data, fsdp): FSDP innermost so its all-gathers stay within a node.
  spec = [tuple(mesh_spec[names.index(a)]) for a in BATCH_AXES]
  return build_mesh(spec, devices, what="config.mesh")


def path_str(path) -> str:
  """'a/b/c' for a pytree key path (dict keys, attributes or indices)."""
  parts = []
  for k in path:
    if hasattr(k, "key"):
      parts.append(str(k.key))
    elif hasattr(k, "name"):
      parts.append(str(k.name))
    elif hasattr(k, "idx"):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def fsdp_spec(shape: Sequence[int], axis_size: int, min_size: int, axis: str = "fsdp") -> P:
  """Shards the largest dimension divisible by `axis_size`; replicates small tensors."""
  if axis_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[d] % axis_size == 0:
      spec = [None] * len(shape)
      spec[d] = axis
      return P(*spec)
  return P()


def param_specs(abstract: Any, mesh: jax.sharding.Mesh,
                rules: Sequence[tuple[str, str]] = ((".*", "fsdp"),),
                fsdp_min_size: int = 2 ** 14, stacked: Sequence[str] = ()) -> Any:
  """PartitionSpecs for a pytree of ShapeDtypeStructs: first matching regex rule wins.

  Rules: `fsdp` (size rule above) or `replicate`. A rule's regex matches a parameter path
  ('qformer/layer_0/query/kernel') or any path ending in one, so the same rules shard the
  optimizer moments ('opt_state/.../mu/qformer/...') like their parameters.
  Unmatched leaves are replicated.

  `stacked`: paths ('vision/layers') of scanned runs of layers, whose leaves carry a leading
  layer axis: that axis stays whole (a scan step reads one layer on every device) and the rule
  applies to one layer's shape, so a layer is sharded as in the per-layer layout.
  """
  in_run = (re.compile(r"(?:^|/)(?:" + "|".join(map(re.escape, stacked)) + r")/")
            if stacked else None)
  compiled = [(re.compile(r"(?:^|.*/)(?:" + r + r")$"), rule) for r, rule in rules]
  for _, rule in rules:
    if rule not in ("fsdp", "replicate"):
      raise ConfigError(f"config.sharding_rules: unknown rule {rule!r} (use fsdp or replicate)")
  fsdp = mesh.shape["fsdp"]

  def one(path, leaf):
    name = path_str(path)
    shape = getattr(leaf, "shape", ())
    for rx, rule in compiled:
      if rx.match(name):
        if rule != "fsdp":
          return P()
        if in_run is not None and shape and in_run.search(name):
          return P(None, *fsdp_spec(shape[1:], fsdp, fsdp_min_size))
        return fsdp_spec(shape, fsdp, fsdp_min_size)
    return P()

  return jax.tree_util.tree_map_with_path(one, abstract)


def to_shardings(specs: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles a global batch from this process's rows (its contiguous share).

  In a single process this is just a sharded device_put; with several processes each one
  passes only the rows it loaded and JAX stitches the global array.
  """
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    sh = batch_sharding(mesh, v.ndim)
    if jax.process_count() == 1:
      out[k] = jax.device_put(v, sh)
    else:
      out[k] = jax.make_array_from_process_local_data(sh, v)
  return out


def process_rows(global_size: int) -> slice:
  """The contiguous rows of a global batch this process loads."""
  n, i = jax.process_count(), jax.process_index()
  if global_size % n:
    raise ValueError(f"global batch {global_size} is not divisible by {n} processes")
  per = global_size // n
  return slice(i * per, (i + 1) * per)

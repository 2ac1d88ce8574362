"""Per-layer and stacked (scan-over-layers) parameter layouts, and the transform between them.

A model with `scan_layers` runs its repeated blocks with `nn.scan`, whose parameters carry a
leading layer axis under one name (the stacked layout); without it each block has its own
subtree (`layers_0`, `layers_1`, ..., the per-layer layout the converters' tables name). A
`Stack` describes one such run of blocks; `stack` / `unstack` move a param (or LoRA) tree
between the layouts, leaving any run already in the target layout as it is, so the model
functions accept either layout and the HF converters always see per-layer trees.

With `group` > 1 (the Q-Former, whose layers alternate with and without cross-attention), one
scan step runs `group` consecutive layers: per-layer `layer_{g * group + j}` is member
`layer_{j}` of the stacked subtree, at index g.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cirjax.errors import ConfigError


class Stack(NamedTuple):
  """One run of repeated blocks.

  parent: path (tuple of names) of the module holding the blocks.
  per_layer: name format of one block in the per-layer layout ('layers_{}').
  stacked: name of the scanned module in the stacked layout ('layers').
  num_layers: blocks in the run.
  group: blocks per scan step (1, or the Q-Former's cross-attention frequency).
  member: name format of a block inside one scan step ('layer_{}', the Q-Former's group
    module, also when a group is one layer), or None: the scan step is the block itself.
  """
  parent: tuple
  per_layer: str
  stacked: str
  num_layers: int
  group: int = 1
  member: str | None = None


def prefixed(stacks: Sequence[Stack], prefix: tuple) -> list[Stack]:
  """The same runs, inside a sub-module at `prefix` (e.g. ('vision',))."""
  return [s._replace(parent=tuple(prefix) + s.parent) for s in stacks]


def _node(tree: Mapping, path: tuple):
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree if isinstance(tree, Mapping) else None


def _stack_leaves(leaves: list):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _index(x, i: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype)
  return x[i]


def _stack_trees(trees: list, where: str, combine: Callable | None = None):
  structs = {jax.tree.structure(t) for t in trees}
  if len(structs) != 1:
    raise ValueError(f"cannot stack the blocks of {where}: their parameter trees differ "
                     "(e.g. a LoRA adapter on some layers only); scan_layers needs every "
                     "block to hold the same parameters")
  if combine is None:
    return jax.tree.map(lambda *xs: _stack_leaves(list(xs)), *trees)
  return jax.tree_util.tree_map_with_path(
      lambda path, *xs: combine(list(xs), where + "/" + _path_str(path)), *trees)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def same_flag(flags: list, where: str) -> bool:
  """`combine` for a bool tree (which parameters train): one flag for a stacked parameter, so
  every layer of the run must agree."""
  if len(set(bool(f) for f in flags)) != 1:
    raise ConfigError(f"{where} is trained in some layers and frozen in others (config.freeze / "
                      "config.train_only), but scan_layers=True holds each parameter of a run "
                      "of layers as one stacked array: freeze whole runs or set "
                      "scan_layers=False")
  return bool(flags[0])


def _with(tree: Mapping, path: tuple, node: dict) -> dict:
  """A copy of `tree` with the subtree at `path` replaced by `node` (copies along the path)."""
  if not path:
    return node
  out = dict(tree)
  out[path[0]] = _with(tree[path[0]], path[1:], node)
  return out


def stack(tree: Mapping, stacks: Sequence[Stack], combine: Callable | None = None) -> Any:
  """Per-layer -> stacked for every run found per-layer in `tree` (others are left alone).

  `combine(leaves, path)` makes one stacked leaf of the layers' leaves (default: stack the
  arrays along a new leading axis; `same_flag` for a tree of bools)."""
  for s in stacks:
    node = _node(tree, s.parent)
    names = [s.per_layer.format(i) for i in range(s.num_layers)]
    if node is None or not all(n in node for n in names):
      continue
    if s.num_layers % s.group:
      raise ValueError(f"{'/'.join(s.parent) or 'model'}: {s.num_layers} layers do not "
                       f"form whole scan steps of {s.group}")
    where = "/".join(s.parent + (s.per_layer.format("*"),))
    if s.member is None:
      stacked = _stack_trees([node[n] for n in names], where, combine)
    else:
      steps = s.num_layers // s.group
      stacked = {s.member.format(j): _stack_trees(
          [node[names[g * s.group + j]] for g in range(steps)], where, combine)
          for j in range(s.group)}
    new = {k: v for k, v in node.items() if k not in names}
    new[s.stacked] = stacked
    tree = _with(tree, s.parent, new)
  return tree


def unstack(tree: Mapping, stacks: Sequence[Stack]) -> Any:
  """Stacked -> per-layer for every run found stacked in `tree` (others are left alone)."""
  for s in stacks:
    node = _node(tree, s.parent)
    if node is None or s.stacked not in node or s.per_layer.format(0) in node:
      continue
    stacked = node[s.stacked]
    new = {k: v for k, v in node.items() if k != s.stacked}
    for i in range(s.num_layers):
      g, j = divmod(i, s.group)
      sub = stacked if s.member is None else stacked[s.member.format(j)]
      new[s.per_layer.format(i)] = jax.tree.map(lambda x, g=g: _index(x, g), sub)
    tree = _with(tree, s.parent, new)
  return tree


def to_layout(tree: Mapping, stacks: Sequence[Stack], scan_layers: bool) -> Any:
  """The layout a model with (or without) `scan_layers` runs on."""
  return stack(tree, stacks) if scan_layers else unstack(tree, stacks)


def holds_run(tree: Any, stacks: Sequence[Stack]) -> bool:
  """Whether `tree` is a mapping holding one of the runs (in either layout)."""
  return isinstance(tree, Mapping) and any(_node(tree, s.parent) is not None for s in stacks)


def nested_to_layout(tree: Any, stacks: Sequence[Stack], scan_layers: bool) -> Any:
  """`to_layout` of every param-shaped mapping inside a container, e.g. a train state: its
  params and the optimizer moments that mirror them (the rest is left alone)."""
  if not stacks:
    return tree
  return jax.tree.map(lambda t: to_layout(t, stacks, scan_layers) if holds_run(t, stacks) else t,
                      tree, is_leaf=lambda t: holds_run(t, stacks))


def stacked_paths(stacks: Sequence[Stack]) -> list[str]:
  """'a/b/layers' paths of the stacked subtrees: every leaf under one has a leading layer axis."""
  return ["/".join(s.parent + (s.stacked,)) for s in stacks]

"""The one device-mesh builder: `(axis name, size)` pairs over all (or the given) devices.

Evaluation's 1-D `data` mesh (`retrieval.make_mesh`) and training's `(data, fsdp)` mesh
(`train.sharding.make_mesh`, from `config.mesh`) are both built here.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax

from cirjax.errors import UsageError


class MeshError(UsageError, ValueError):
  """A mesh shape the devices cannot fill (a bad `config.mesh`: exit status 2)."""


def build_mesh(axes: Sequence[tuple[str, int]] = (("data", -1),),
               devices: Sequence[jax.Device] | None = None,
               what: str = "mesh") -> jax.sharding.Mesh:
  """A mesh of the axes in the order given; one size may be -1 (all the devices left).

  Axes are Auto-typed: the jitted steps rely on the compiler to propagate shardings from
  their explicit in/out shardings. `what` names the setting in errors (`config.mesh`).
  """
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(n for n, _ in axes)
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1:
    raise MeshError(f"{what}: at most one axis may be -1, got {list(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise MeshError(f"{what} {list(axes)}: {len(devices)} devices are not divisible by "
                      f"{known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise MeshError(f"{what} {list(axes)} needs {math.prod(sizes)} devices, have "
                    f"{len(devices)}")
  return jax.make_mesh(tuple(sizes), names, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))

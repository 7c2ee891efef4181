"""Device mesh with named axes and logical-axis rules: parameters name their axes ("embed", "mlp", ...),
a table maps those names to mesh axes, so changing parallelism is a config change, never a model change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gptoss_jax.config import MESH_AXES, ConfigError

BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over all three: fsdp is data parallel with sharded
# weights, and expert parallelism data parallel outside the MoE layers (inside, the rows go to their experts)

# logical axis -> mesh axis, or mesh axes in turn (None: replicated). `embed` is split over `expert` too where
# the experts do not take it (the weights outside the experts, as MaxText does): that axis is data parallel there
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "embed": ("fsdp", "expert"),
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "expert": "expert",
    "norm": None,
}


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Sizes per MESH_AXES; one of them may be -1 to take the remaining devices."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"mesh: unknown axis {', '.join(unknown)} (axes: {', '.join(MESH_AXES)})")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"mesh: sizes must be >= 1 with at most one -1, got {dict(zip(MESH_AXES, shape))}")
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % fixed:
      raise ConfigError(f"mesh: {dict(zip(MESH_AXES, shape))} does not divide {n_devices} devices")
    shape[shape.index(-1)] = n_devices // fixed
  if math.prod(shape) != n_devices:
    raise ConfigError(f"mesh: {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                      f"there are {n_devices}")
  return tuple(shape)


def make_mesh(sizes, devices=None) -> Mesh:
  """sizes: a MeshConfig or a mapping {axis: devices}."""
  devices = jax.devices() if devices is None else devices
  sizes = dataclasses.asdict(sizes) if dataclasses.is_dataclass(sizes) else sizes
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh,
                    rules: Mapping[str, str | tuple[str, ...] | None] = LOGICAL_RULES) -> P:
  """PartitionSpec for an array whose dimensions carry logical names: each dimension split over its rule's mesh
  axes of more than one device, in turn, as long as they divide it and no earlier dimension uses them (one
  axis: its name; several: a tuple; none: replicated)."""
  if not axes:
    return P()
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    rule = rules.get(name) if name else None
    taken = []
    for mesh_axis in (rule,) if isinstance(rule, str) else rule or ():
      size = mesh.shape[mesh_axis] * math.prod(mesh.shape[a] for a in taken)
      if mesh_axis not in used and mesh.shape[mesh_axis] > 1 and dim % size == 0:
        taken.append(mesh_axis)
    used.update(taken)
    spec.append(None if not taken else taken[0] if len(taken) == 1 else tuple(taken))
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedSharding for every variable of an nnx state, from its `axes` metadata (replicated if none)."""
  def one(variable):
    value = variable.get_value()
    spec = logical_to_spec(variable.get_metadata().get("axes"), np.shape(value), mesh)
    return variable.replace(NamedSharding(mesh, spec))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_axes(mesh, n: int, among: tuple[str, ...] = BATCH_AXES) -> tuple[str, ...]:
  """The axes (of `among`, in order) of more than one device that split n rows, as many as divide them."""
  axes = [a for a in among if mesh.shape[a] > 1]
  while axes and n % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes)


def batch_split(x_BxN: jax.Array) -> jax.Array:
  """x [B, ...] held split over the batch axes where a mesh is in context (the residual stream between layers:
  left free, XLA follows the fsdp split of a projection's `embed` instead, and gathers the whole batch on every
  device of a data x fsdp group to compute it)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x_BxN
  return jax.lax.with_sharding_constraint(x_BxN, P(batch_axes(mesh, x_BxN.shape[0]) or None))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)

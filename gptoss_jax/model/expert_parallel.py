"""Expert parallelism: each device of the `expert` mesh axis holds n_experts / n of the experts, and every
device's routed rows travel to the devices holding their experts and back (an all-to-all each way, as MaxText
and Megablocks do it), instead of every device gathering every expert's weights.

Inside the MoE's shard_map (gptoss_jax.model.moe.on_token_shards, which splits the tokens over the expert axis
too): a device orders its A assignments by the device holding their expert, puts those for device s in region s
of a buffer of n regions of C rows (in token order), and exchanges the buffers, so that region s of what it
receives holds device s's rows for its own experts, then zeros. Its experts run over those n * C rows
(each row a single assignment of weight 1; an empty row is expert 0's, its output never read: no gradient),
and the outputs travel back the same way.

C, the rows a device may send to one device: A without a capacity factor, so that nothing is ever dropped
whatever the routing (dropless: a device receives up to n * A rows, all its expert group's assignments, and
static programs compute all of them); ceil(moe_capacity_factor * A / n) (a multiple of 8) with one, the rows past it
dropped, the last tokens' first (n * C ~ factor * A rows received: compute and memory as balanced routing's).

The exchange is `ragged_all_to_all` where the program is lowered for a GPU or TPU (only the rows in use move)
and an all_to_all of the whole regions elsewhere (XLA:CPU has no ragged all-to-all): both leave the same buffer.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gptoss_jax.model.experts import through_rows
from gptoss_jax.model.platform import per_lowering

# (rows [R, D], each row's expert among this device's [R]) -> [R, D]
LocalFn = Callable[[jax.Array, jax.Array], jax.Array]


def region_rows(assignments: int, devices: int, capacity_factor: float) -> int:
  """C: the rows a device sends to each device of the expert axis (see the module)."""
  if not capacity_factor:
    return assignments
  return min(assignments, math.ceil(capacity_factor * assignments / devices / 8) * 8)


def exchange(rows_RxD: jax.Array, sent_S: jax.Array, received_S: jax.Array, axis: str) -> jax.Array:
  """Region s of this device's rows (R / n rows each, its first sent_S[s] in use, the rest zeros) to device s,
  which receives it as its region for this device; this device's regions likewise from every device (received_S
  of them in use: what each device sends it)."""
  n = sent_S.shape[0]
  R, D = rows_RxD.shape
  C = R // n

  def whole_regions(rows, sent, received):
    return jax.lax.all_to_all(rows.reshape(n, C, D), axis, 0, 0, tiled=True).reshape(R, D)

  def rows_in_use(rows, sent, received):
    here = jnp.full((n,), jax.lax.axis_index(axis) * C, jnp.int32)  # where this device's rows land, on each
    return jax.lax.ragged_all_to_all(rows, jnp.zeros_like(rows), jnp.arange(n, dtype=jnp.int32) * C, sent, here,
                                     received, axis_name=axis)

  return per_lowering(rows_RxD, sent_S.astype(jnp.int32), received_S.astype(jnp.int32), default=whole_regions,
                      cuda=rows_in_use, rocm=rows_in_use, tpu=rows_in_use)


def expert_parallel(x_NxD: jax.Array, idx_NxK: jax.Array, w_NxK: jax.Array, n_experts: int, capacity_factor: float,
                    axis: str, local: LocalFn) -> jax.Array:
  """This device's routed tokens [N, D] through experts held across mesh axis `axis` (this device holds
  experts [i * n_experts / n, (i + 1) * n_experts / n), i its index there; local(rows, expert) runs
  them), mixed by their routing weights."""
  n = jax.lax.axis_size(axis)
  E_l, A = n_experts // n, idx_NxK.size
  C = region_rows(A, n, capacity_factor)
  e_A = idx_NxK.reshape(-1)
  order_A = jnp.argsort(e_A // E_l, stable=True)  # by the device holding the expert, then in token order
  e_sorted_A = e_A[order_A]
  device_A = e_sorted_A // E_l
  to_S = jnp.bincount(device_A, length=n)  # assignments for each device
  rank_A = jnp.arange(A) - (jnp.cumsum(to_S) - to_S)[device_A]
  slot_A = jnp.where(rank_A < C, device_A * C + rank_A, n * C)  # n * C: dropped
  sent_S = jnp.minimum(to_S, C)

  # each slot's expert among its device's (0 where no assignment is), in the region of the device holding it
  slots = jnp.zeros((n * C + 1,), jnp.int32).at[slot_A].set(e_sorted_A % E_l)[:-1]
  expert_R = jax.lax.all_to_all(slots.reshape(n, C), axis, 0, 0, tiled=True).reshape(-1)
  received_S = jax.lax.all_to_all(sent_S, axis, 0, 0, tiled=True)

  def through_experts(rows_RxD):
    y_RxD = local(exchange(rows_RxD, sent_S, received_S, axis), expert_R)
    return exchange(y_RxD, received_S, sent_S, axis)

  return through_rows(x_NxD, w_NxK, order_A, slot_A, n * C, through_experts)

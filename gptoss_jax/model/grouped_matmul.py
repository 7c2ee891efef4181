"""The TPU's grouped matmul: JAX's Pallas megablox kernels (`gmm`, and `tgmm` for the weights' gradients),
MaxText's choice on TPU. Per lowering (platform.per_lowering): compiled by Mosaic where the program is lowered
for TPU, and elsewhere the same kernel run by Pallas's interpreter (XLA ops), so a CPU executes what a TPU
computes.

Rows [m, k] sorted by group, group g owning sizes_G[g] consecutive rows, every row in some group. The grid
visits tiles of `tm` rows: m / tm of them, plus one more for each group boundary inside a tile, so the FLOPs are
at most 2 (m + (G - 1) tm) k n (gptoss_jax.hlo counts them so)."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as megablox_gmm, tgmm as megablox_tgmm

from gptoss_jax.model.platform import per_lowering

TILE_MAX = 512  # k and n tiles: the whole dimension up to this, else this (a multiple of 128; the rest masked)


def _tiling(tm: int, k: int, n: int) -> tuple[int, int, int]:
  return tm, min(k, TILE_MAX), min(n, TILE_MAX)


def gmm(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, sizes_G: jax.Array, tm: int, out_dtype,
        transpose_rhs: bool = False) -> jax.Array:
  """[m, n]: each group's rows times its own matrix (rhs [G, n, k] with transpose_rhs), accumulated in float32."""
  n = rhs_GxKxN.shape[1 if transpose_rhs else 2]
  tiling = _tiling(tm, lhs_MxK.shape[1], n)

  def run(interpret: bool):
    return lambda lhs, rhs, sizes: megablox_gmm(lhs, rhs, sizes, out_dtype, tiling, transpose_rhs=transpose_rhs,
                                                 interpret=interpret)
  return per_lowering(lhs_MxK, rhs_GxKxN, sizes_G.astype(jnp.int32), default=run(True), tpu=run(False))


def tgmm(lhs_KxM: jax.Array, rhs_MxN: jax.Array, sizes_G: jax.Array, tm: int, out_dtype) -> jax.Array:
  """[G, k, n]: for each group, lhs's columns of its rows times rhs's rows of it (a weight's gradient)."""
  tiling = _tiling(tm, lhs_KxM.shape[0], rhs_MxN.shape[1])
  groups = sizes_G.shape[0]

  def run(interpret: bool):
    return lambda lhs, rhs, sizes: megablox_tgmm(lhs, rhs, sizes, out_dtype, tiling, num_actual_groups=groups,
                                                  interpret=interpret)
  return per_lowering(lhs_KxM, rhs_MxN, sizes_G.astype(jnp.int32), default=run(True), tpu=run(False))

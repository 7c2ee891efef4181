"""MXFP4: blocks of 32 FP4 (e2m1) values sharing one e8m0 power-of-two scale.

Two values per byte, low nibble first; value = FP4_VALUES[nibble] * 2 ** (scale - 127).
Packed tensors are [..., K / 32, 16] uint8 blocks and [..., K / 32] uint8 scales.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BLOCK = 32
FP4_VALUES = np.array([+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


class Packed(nnx.Variable):
  """Packed MXFP4 data: stored and sharded like a parameter, never trained."""


def dequantize(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
  """[..., nb, 16] uint8 blocks + [..., nb] uint8 scales -> [..., nb * 32] values."""
  blocks = jnp.asarray(blocks)
  nibbles = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], BLOCK)
  values = jnp.asarray(FP4_VALUES, dtype)[nibbles]  # every FP4 value and power of two is exact in bf16
  exponent = jnp.asarray(scales).astype(jnp.int32) - 127
  out = jnp.ldexp(values, exponent[..., None])
  return out.reshape(*blocks.shape[:-2], -1)


def quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., K] -> ([..., K / 32, 16] uint8 blocks, [..., K / 32] uint8 scales), round to nearest."""
  w = jnp.asarray(w, jnp.float32)
  if w.shape[-1] % BLOCK:
    raise ValueError(f"MXFP4 needs the last dimension divisible by {BLOCK}, got {w.shape}")
  wb = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
  amax = jnp.max(jnp.abs(wb), axis=-1)
  # smallest power of two that brings the block's largest magnitude within the FP4 range (6)
  exponent = jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / 6.0))
  exponent = jnp.clip(jnp.where(amax > 0, exponent, -127), -127, 127).astype(jnp.int32)
  scaled = jnp.ldexp(wb, -exponent[..., None])
  nibbles = jnp.argmin(jnp.abs(scaled[..., None] - jnp.asarray(FP4_VALUES)), axis=-1).astype(jnp.uint8)
  blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
  return blocks, (exponent + 127).astype(jnp.uint8)

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


def scale_values(scales: jax.Array) -> jax.Array:
  """e8m0 bytes -> float32 2**(s - 127), exactly: the byte is float32's exponent field (0: 2**-127, a
  subnormal; 255: NaN, as the spec has it). A multiply by it is exact, and far cheaper than ldexp."""
  s = jnp.asarray(scales).astype(jnp.uint32)
  bits = jnp.where(s == 0, jnp.uint32(1 << 22), jnp.where(s == 255, jnp.uint32(0x7FC00000), s << 23))
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def dequantize(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
  """[..., nb, 16] uint8 blocks + [..., nb] uint8 scales -> [..., nb * 32] values."""
  blocks, table = jnp.asarray(blocks), jnp.asarray(FP4_VALUES)
  # each nibble looked up, then interleaved (interleaving the nibbles first made XLA:CPU 5x slower)
  values = jnp.stack([table[blocks & 0x0F], table[blocks >> 4]], axis=-1).reshape(*blocks.shape[:-1], BLOCK)
  values = values * scale_values(scales)[..., None]  # exact in float32
  return values.astype(dtype).reshape(*blocks.shape[:-2], -1)  # and in bf16: FP4 values have 2 significant bits


def quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., K] -> ([..., K / 32, 16] uint8 blocks, [..., K / 32] uint8 scales), as the OCP Microscaling
  spec (v1.0, 6.3) gives it: each block's shared exponent is floor(log2(max |v|)) - 2 (2: the largest
  e2m1 exponent, 6 = 1.5 * 2**2), and every v / 2**shared is rounded to the nearest e2m1 value, ties to
  the even code, saturating at +-6. An all-zero block gets the smallest scale, 2**-127."""
  w = jnp.asarray(w, jnp.float32)
  if w.shape[-1] % BLOCK:
    raise ValueError(f"MXFP4 needs the last dimension divisible by {BLOCK}, got {w.shape}")
  wb = w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
  amax = jnp.max(jnp.abs(wb), axis=-1)
  _, e = jnp.frexp(jnp.where(amax > 0, amax, 1.0))  # amax = m * 2**e, m in [0.5, 1): floor(log2) = e - 1
  exponent = jnp.clip(jnp.where(amax > 0, e - 1 - 2, -127), -127, 127).astype(jnp.int32)
  scaled = jnp.minimum(jnp.abs(jnp.ldexp(wb, -exponent[..., None])), 6.0)
  distance = jnp.abs(scaled[..., None] - jnp.asarray(FP4_VALUES[:8]))  # to the 8 magnitudes, codes 0..7
  nearest = distance == jnp.min(distance, axis=-1, keepdims=True)
  odd = jnp.arange(8) % 2  # the mantissa bit: a tie goes to the code whose mantissa is 0
  magnitude = jnp.argmin(jnp.where(nearest, odd, 2), axis=-1).astype(jnp.uint8)
  nibbles = magnitude | (jnp.signbit(wb).astype(jnp.uint8) << 3)
  blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
  return blocks, (exponent + 127).astype(jnp.uint8)


def round_trip(w: jax.Array, axis: int = -1) -> jax.Array:
  """w quantized to MXFP4 in blocks of 32 along `axis` and dequantized, in w's dtype: the weights a model
  stored so computes with. A length not divisible by 32 ends in a shorter block (padded with zeros, which
  leave its scale to its own values)."""
  x = jnp.moveaxis(jnp.asarray(w, jnp.float32), axis, -1)
  K = x.shape[-1]
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -K % BLOCK)])
  back = dequantize(*quantize(padded), jnp.float32)[..., :K]
  return jnp.moveaxis(back, -1, axis).astype(w.dtype)

"""Positions: learned absolute embeddings, RoPE (half-split layout) with optional YaRN or Llama-3 scaling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.config import ModelConfig


class LearnedPositions(nnx.Module):
  """GPT-2 style table of absolute position embeddings."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    init = jax.nn.initializers.normal(cfg.init_std)
    self.table = nnx.Param(init(rngs.params(), (cfg.max_seq_len, cfg.d_model), jnp.dtype(cfg.param_dtype)),
                           axes=(None, "embed"))

  def __call__(self, positions_BxT: jax.Array) -> jax.Array:
    return jnp.take(self.table[...], positions_BxT, axis=0)


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim // 2] and the factor that multiplies cos and sin."""
  dim = cfg.head_dim
  inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  if cfg.position == "yarn":
    return _yarn(cfg, inv_freq), cfg.yarn_mscale
  if cfg.position == "llama3":
    return _llama3(cfg, inv_freq), 1.0
  return inv_freq, 1.0


def _yarn(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
  dim, base, orig = cfg.head_dim, cfg.rope_theta, cfg.rope_original_max_len

  def correction_dim(n_rotations):
    return dim * math.log(orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(cfg.yarn_beta_fast), correction_dim(cfg.yarn_beta_slow)
  if cfg.yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by the factor
  return inv_freq / cfg.rope_factor * (1 - extrapolate) + inv_freq * extrapolate


def _llama3(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
  factor, orig = cfg.rope_factor, cfg.rope_original_max_len
  low, high = cfg.llama3_low_freq_factor, cfg.llama3_high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > orig / low, inv_freq / factor, inv_freq)
  smooth = (orig / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= orig / high) & (wavelen <= orig / low)
  return np.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  inv_freq, scale = rope_frequencies(cfg)
  angles_BxTxK = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  return jnp.cos(angles_BxTxK) * scale, jnp.sin(angles_BxTxK) * scale


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxK: jax.Array, sin_BxTxK: jax.Array) -> jax.Array:
  """Rotates the first half of each head against the second half (Hugging Face rotate_half)."""
  x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos_BxTxK[:, :, None, :], sin_BxTxK[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)

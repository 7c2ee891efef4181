"""LayerNorm (GPT-2) and RMSNorm (Llama, Qwen3, gpt-oss); statistics in float32."""

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.config import ModelConfig


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> RMSNorm | LayerNorm:
  cls = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}[cfg.norm]
  return cls(dim or cfg.d_model, cfg.norm_eps, jnp.dtype(cfg.param_dtype))

"""Feed-forward: GELU MLP (GPT-2, tanh GELU), SwiGLU, gpt-oss clamped SwiGLU.

Input projections are stored as [..., d_model, G, d_ff] with G = 2 for the gated
variants (gate, up) and G = 1 for GELU, so dense FFNs and experts share one activation.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.config import ModelConfig
from gptoss_jax.model.linear import project
from gptoss_jax.model.platform import target


def activate(cfg: ModelConfig, h_xGxF: jax.Array) -> jax.Array:
  """[..., G, F] -> [..., F]."""
  if cfg.ffn == "gelu":
    return jax.nn.gelu(h_xGxF[..., 0, :], approximate=True)
  gate, up = h_xGxF[..., 0, :], h_xGxF[..., 1, :]
  if cfg.ffn == "swiglu":
    return jax.nn.silu(gate) * up
  gate = jnp.minimum(gate, cfg.swiglu_limit)
  up = jnp.clip(up, -cfg.swiglu_limit, cfg.swiglu_limit)
  return gate * jax.nn.sigmoid(cfg.swiglu_alpha * gate) * (up + 1)


def n_in_proj(cfg: ModelConfig) -> int:
  return 2 if cfg.is_glu else 1


def init_std_out(cfg: ModelConfig) -> float:
  """GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * n_layers)."""
  return cfg.init_std / (2 * cfg.n_layers) ** 0.5


def ffn_init_std_out(cfg: ModelConfig) -> float:
  """The FFN's output projection: GPT-2's residual init, times `ffn_out_init_scale`."""
  return init_std_out(cfg) * cfg.ffn_out_init_scale


class MLP(nnx.Module):
  """Dense feed-forward block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    D, F, G = cfg.d_model, cfg.d_ff, n_in_proj(cfg)
    pdt = jnp.dtype(cfg.param_dtype)
    self.w_in = nnx.Param(jax.random.normal(rngs.params(), (D, G, F), pdt) * cfg.init_std,
                          axes=("embed", None, "mlp"))
    self.w_out = nnx.Param(jax.random.normal(rngs.params(), (F, D), pdt) * ffn_init_std_out(cfg),
                           axes=("mlp", "embed"))
    if cfg.ffn_bias:
      self.b_in = nnx.Param(jnp.zeros((G, F), pdt), axes=(None, "mlp"))
      self.b_out = nnx.Param(jnp.zeros((D,), pdt), axes=("embed",))

  def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, dict]:
    dt = x_BxTxD.dtype
    platform = target(self.cfg)
    h = project(x_BxTxD, self.w_in[...], platform=platform)
    if self.cfg.ffn_bias:
      h = h + self.b_in[...].astype(dt)
    y = project(activate(self.cfg, h), self.w_out[...], platform=platform)
    if self.cfg.ffn_bias:
      y = y + self.b_out[...].astype(dt)
    return y, {}

"""Next-token cross-entropy plus the MoE auxiliary losses, each reported apart."""

import jax
import jax.numpy as jnp

from gptoss_jax.config import ModelConfig
from gptoss_jax.model import ModelOutput


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  logits = logits_BxTxV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logit)


def total_loss(cfg: ModelConfig, out: ModelOutput, targets_BxT: jax.Array) -> tuple[jax.Array, dict]:
  ce = cross_entropy(out.logits_BxTxV, targets_BxT)
  metrics = {"ce_loss": ce}
  loss = ce
  if cfg.is_moe:
    loss = loss + cfg.moe_aux_loss_weight * out.aux["moe_aux_loss"] + cfg.moe_z_loss_weight * out.aux["moe_z_loss"]
    metrics |= {k: out.aux[k] for k in ("moe_aux_loss", "moe_z_loss", "expert_load")}
  return loss, metrics | {"loss": loss}

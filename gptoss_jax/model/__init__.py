"""The model, one file per idea: norms, positions, attention, ffn, moe, mxfp4, transformer, rngs, platform."""

from gptoss_jax.model.attention import KVCache
from gptoss_jax.model.rngs import rngs
from gptoss_jax.model.transformer import WEIGHTS, ModelOutput, Transformer, fresh_rest

__all__ = ["KVCache", "ModelOutput", "Transformer", "WEIGHTS", "fresh_rest", "rngs"]

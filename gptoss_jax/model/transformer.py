"""The decoder-only transformer: embeddings -> pre-norm blocks -> final norm -> logits."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.config import ModelConfig
from gptoss_jax.model.attention import Attention, KVCache
from gptoss_jax.model.ffn import MLP
from gptoss_jax.model.linear import project, reads_in_place
from gptoss_jax.model import mxfp4
from gptoss_jax.model.moe import MoE, SelectionBias
from gptoss_jax.model.norms import make_norm
from gptoss_jax.model.platform import target
from gptoss_jax.model.positions import LearnedPositions, rope_cos_sin
from gptoss_jax.sharding import batch_split


VOCAB_CHUNK = 32768  # unembedding columns per matmul
WEIGHTS = (nnx.Param, mxfp4.Packed, SelectionBias)  # what a checkpoint holds; the rest is dropout RNG state


def fresh_rest(rest: nnx.State) -> nnx.State:
  """Concrete values for an abstract model's non-weight state (dropout RNG keys and counters)."""
  is_key = lambda v: jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
  return jax.tree.map(lambda v: jax.random.key(0) if is_key(v) else jnp.zeros(v.shape, v.dtype), rest)


def unembed_logits(x_BxTxD: jax.Array, unembed_DxV: jax.Array, platform: str) -> jax.Array:
  """Float32 logits, one chunk of the vocabulary at a time: where bf16 matmuls run in float32 (XLA:CPU),
  only a chunk of the unembedding is ever converted (gpt-oss: 0.4 GB instead of 2.3 GB). Whole where the
  CPU kernel reads it as stored (decoding): a chunk would be a copy."""
  V = unembed_DxV.shape[1]
  chunk = V if reads_in_place(math.prod(x_BxTxD.shape[:-1]), unembed_DxV, platform) else VOCAB_CHUNK
  return jnp.concatenate([project(x_BxTxD, unembed_DxV[:, i:i + chunk], platform=platform).astype(jnp.float32)
                          for i in range(0, V, chunk)], axis=-1)


def unembed_nll(x_BxTxD: jax.Array, unembed_DxV: jax.Array, targets_BxT: jax.Array, platform: str) -> jax.Array:
  """Each position's next-token loss, -log softmax(x @ unembed)[target] in float32, without the whole
  logits: the log-normaliser is combined from one vocabulary chunk's at a time (gpt-oss, 512 positions: a
  67 MB chunk instead of 0.4 GB of logits and as much again for their exponentials), and the target's logit
  is the product with its own column."""
  return unembed_scores(x_BxTxD, unembed_DxV, targets_BxT, platform)[0]


def unembed_scores(x_BxTxD: jax.Array, unembed_DxV: jax.Array, targets_BxT: jax.Array, platform: str
                   ) -> tuple[jax.Array, jax.Array]:
  """unembed_nll's loss [B, T], and whether each target is its position's argmax token [B, T] (the first of
  ties, as argmax), both one vocabulary chunk at a time (what is not used is never computed under jit)."""
  V = unembed_DxV.shape[1]
  logz, best, first = [], [], []
  for i in range(0, V, VOCAB_CHUNK):
    logits_BxTxC = project(x_BxTxD, unembed_DxV[:, i:i + VOCAB_CHUNK], platform=platform).astype(jnp.float32)
    logz.append(jax.nn.logsumexp(logits_BxTxC, axis=-1))
    best.append(jnp.max(logits_BxTxC, axis=-1))
    first.append(jnp.argmax(logits_BxTxC, axis=-1) + i)
  w_DxBxT = jnp.take(unembed_DxV, targets_BxT, axis=1).astype(jnp.float32)
  target_BxT = jnp.einsum("btd,dbt->bt", x_BxTxD.astype(jnp.float32), w_DxBxT)
  chunk_BxT = jnp.argmax(jnp.stack(best, axis=-1), axis=-1)
  argmax_BxT = jnp.take_along_axis(jnp.stack(first, axis=-1), chunk_BxT[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(jnp.stack(logz, axis=-1), axis=-1) - target_BxT, argmax_BxT == targets_BxT


class ModelOutput(NamedTuple):
  logits_BxTxV: jax.Array  # float32
  aux: dict  # moe_aux_loss, moe_z_loss (means over MoE layers), expert_load [L, E]
  cache: list[KVCache] | None


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.attn_norm = make_norm(cfg)
    self.attn = Attention(cfg, cfg.sliding_layers[layer], rngs)
    self.ffn_norm = make_norm(cfg)
    self.ffn = MoE(cfg, rngs) if cfg.is_moe else MLP(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.resid_dropout, rngs=rngs)

  def __call__(self, x_BxTxD, positions_BxT, rope, cache):
    h, cache = self.attn(self.attn_norm(x_BxTxD), positions_BxT, rope, cache)
    x_BxTxD = batch_split(x_BxTxD + self.dropout(h))
    h, aux = self.ffn(self.ffn_norm(x_BxTxD))
    return batch_split(x_BxTxD + self.dropout(h)), aux, cache


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt) * cfg.init_std,
                           axes=("vocab", "embed"))
    if cfg.position == "learned":
      self.pos_embed = LearnedPositions(cfg, rngs)
    self.embed_dropout = nnx.Dropout(cfg.embed_dropout, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
    self.final_norm = make_norm(cfg)
    if not cfg.tie_embeddings:
      self.unembed = nnx.Param(jax.random.normal(rngs.params(), (cfg.d_model, cfg.vocab_size), pdt) * cfg.init_std,
                               axes=("embed", "vocab"))

  def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
    return self.forward(tokens_BxT).logits_BxTxV

  def forward(self, tokens_BxT, positions_BxT=None, cache: list[KVCache] | None = None,
              remat: bool = False) -> ModelOutput:
    """Logits [B, T, V] for tokens [B, T]. positions_BxT (default 0..T-1, after the cache's) are not only the
    rotation or the learned embedding: they make the causal mask (a query sees the keys whose position is not
    after its own, and within the window on sliding layers; a negative position is padding, seen by none), so
    shuffled positions change what each token sees. remat: recompute each block's activations in the backward
    pass instead of storing them."""
    x, aux, new_cache = self.trunk(tokens_BxT, positions_BxT, cache, remat)
    return ModelOutput(unembed_logits(x, self.unembedding(), target(self.cfg)), aux, new_cache)

  def unembedding(self) -> jax.Array:
    """[d_model, vocab]: the unembedding, or the embedding's transpose when tied."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]

  def trunk(self, tokens_BxT, positions_BxT=None, cache: list[KVCache] | None = None,
            remat: bool = False) -> tuple[jax.Array, dict, list[KVCache] | None]:
    """Everything before the unembedding: the final norm's output [B, T, D], the MoE aux, the new cache."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    B, T = tokens_BxT.shape
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dt)
    if cfg.position == "learned":
      x = x + self.pos_embed(positions_BxT).astype(dt)
    x = self.embed_dropout(x)
    rope = rope_cos_sin(cfg, positions_BxT) if cfg.is_rotary else None
    auxes, new_cache = [], []
    call = nnx.remat(_call_block) if remat else _call_block
    for i, block in enumerate(self.blocks):
      x, aux, layer_cache = call(block, x, positions_BxT, rope, None if cache is None else cache[i])
      auxes.append(aux)
      new_cache.append(layer_cache)
    return self.final_norm(x), _merge_aux(auxes), None if cache is None else new_cache

  def init_cache(self, batch: int, max_len: int, dtype=None) -> list[KVCache]:
    """Per-layer caches: max_len slots for full layers, the window for sliding ones."""
    cfg = self.cfg
    dtype = dtype or jnp.dtype(cfg.dtype)
    return [KVCache.empty(batch, b.attn.cache_slots(max_len), cfg.n_kv_heads, cfg.head_dim, dtype)
            for b in self.blocks]


def _call_block(block: Block, *args):
  return block(*args)


def _merge_aux(auxes: list[dict]) -> dict:
  auxes = [a for a in auxes if a]
  if not auxes:
    return {}
  return {
      "moe_aux_loss": jnp.mean(jnp.stack([a["moe_aux_loss"] for a in auxes])),
      "moe_z_loss": jnp.mean(jnp.stack([a["moe_z_loss"] for a in auxes])),
      "expert_load": jnp.stack([a["expert_load"] for a in auxes]),
  }

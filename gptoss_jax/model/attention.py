"""Attention: MHA / GQA / MQA, q/k/v/o biases, per-head q/k RMSNorm, learned sinks, sliding windows,
and a KV cache whose sliding layers keep only their window (a ring buffer).

Two kernels, equal on every input they share:
  attend        masks by positions; queries may see a cache (decoding) or the whole sequence.
  attend_local  sliding-window self-attention in blocks of the window size: each block of queries
                sees its own block and the previous one, so the cost is T * 2W, not T * T.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax.config import ModelConfig
from gptoss_jax.model.ffn import init_std_out
from gptoss_jax.model.linear import project
from gptoss_jax.model.norms import RMSNorm
from gptoss_jax.model.positions import apply_rope

_MASKED = -1e30


class KVCache(NamedTuple):
  k_BxSxKxH: jax.Array
  v_BxSxKxH: jax.Array
  pos_BxS: jax.Array  # absolute position held in each slot, -1 when empty

  @classmethod
  def empty(cls, batch: int, slots: int, n_kv_heads: int, head_dim: int, dtype) -> "KVCache":
    kv = jnp.zeros((batch, slots, n_kv_heads, head_dim), dtype)
    return cls(kv, kv, jnp.full((batch, slots), -1, jnp.int32))

  def update(self, k_BxTxKxH, v_BxTxKxH, pos_BxT) -> "KVCache":
    """Writes new entries at slot = position % slots (only the last `slots` of them fit)."""
    S = self.pos_BxS.shape[1]
    k_BxTxKxH, v_BxTxKxH, pos_BxT = k_BxTxKxH[:, -S:], v_BxTxKxH[:, -S:], pos_BxT[:, -S:]
    b = jnp.arange(pos_BxT.shape[0])[:, None]
    slots = pos_BxT % S
    return KVCache(self.k_BxSxKxH.at[b, slots].set(k_BxTxKxH.astype(self.k_BxSxKxH.dtype)),
                   self.v_BxSxKxH.at[b, slots].set(v_BxTxKxH.astype(self.v_BxSxKxH.dtype)),
                   self.pos_BxS.at[b, slots].set(pos_BxT))


def softmax_with_sinks(scores: jax.Array, sinks: jax.Array | None) -> jax.Array:
  """Softmax over the last axis with an extra sink logit in the denominator (rows sum to < 1)."""
  if sinks is None:
    return jax.nn.softmax(scores, axis=-1)
  m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
  e = jnp.exp(scores - m)
  return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - m))


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT, k_pos_BxS, *, window: int = 0,
           sinks_N=None, dropout=None) -> jax.Array:
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxSxKxH.shape[2]
  q = q_BxTxNxH.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BxSxKxH).astype(jnp.float32) * H**-0.5
  qp, kp = q_pos_BxT[:, :, None], k_pos_BxS[:, None, :]
  allowed_BxTxS = (kp <= qp) & (kp >= 0)
  if window:
    allowed_BxTxS &= qp - kp < window
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, _MASKED)
  sinks = None if sinks_N is None else sinks_N.astype(jnp.float32).reshape(K, N // K, 1, 1)
  probs = softmax_with_sinks(scores, sinks)
  if dropout is not None:
    probs = dropout(probs)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v_BxSxKxH.dtype), v_BxSxKxH)
  return out.reshape(B, T, N, H)


def attend_local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, window: int, sinks_N=None, dropout=None) -> jax.Array:
  """Causal sliding-window self-attention over positions 0..T-1 (query i sees i - W < j <= i)."""
  B, T, N, H = q_BxTxNxH.shape
  K, W = k_BxTxKxH.shape[2], window
  nb = -(-T // W)
  pad = [(0, 0), (0, nb * W - T), (0, 0), (0, 0)]
  q = jnp.pad(q_BxTxNxH, pad).reshape(B, nb, W, K, N // K, H)

  def with_previous_block(x):  # [B, T, K, H] -> [B, nb, 2W, K, H]
    x = jnp.pad(x, pad).reshape(B, nb, W, K, H)
    prev = jnp.pad(x, [(0, 0), (1, 0), (0, 0), (0, 0), (0, 0)])[:, :-1]
    return jnp.concatenate([prev, x], axis=2)

  k, v = with_previous_block(k_BxTxKxH), with_previous_block(v_BxTxKxH)
  scores = jnp.einsum("bnqkgh,bnskh->bnkgqs", q, k).astype(jnp.float32) * H**-0.5
  qi = jnp.arange(W)[:, None]
  kj = jnp.arange(2 * W)[None, :] - W  # key offset relative to the query block's start
  allowed_WxW2 = (kj <= qi) & (qi - kj < W)
  allowed_nbxWxW2 = allowed_WxW2 & ((jnp.arange(nb) > 0)[:, None, None] | (kj >= 0))
  scores = jnp.where(allowed_nbxWxW2[None, :, None, None], scores, _MASKED)
  sinks = None if sinks_N is None else sinks_N.astype(jnp.float32).reshape(K, N // K, 1, 1)
  probs = softmax_with_sinks(scores, sinks)
  if dropout is not None:
    probs = dropout(probs)
  out = jnp.einsum("bnkgqs,bnskh->bnqkgh", probs.astype(v.dtype), v)
  return out.reshape(B, nb * W, N, H)[:, :T]


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, sliding: bool, rngs: nnx.Rngs):
    self.cfg = cfg
    self.window = cfg.sliding_window if sliding else 0
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    normal = lambda shape, std: jax.random.normal(rngs.params(), shape, pdt) * std
    self.wq = nnx.Param(normal((D, N, H), cfg.init_std), axes=("embed", "heads", None))
    self.wk = nnx.Param(normal((D, K, H), cfg.init_std), axes=("embed", "kv_heads", None))
    self.wv = nnx.Param(normal((D, K, H), cfg.init_std), axes=("embed", "kv_heads", None))
    self.wo = nnx.Param(normal((N, H, D), init_std_out(cfg)), axes=("heads", None, "embed"))
    if cfg.qkv_bias:
      self.bq = nnx.Param(jnp.zeros((N, H), pdt), axes=("heads", None))
      self.bk = nnx.Param(jnp.zeros((K, H), pdt), axes=("kv_heads", None))
      self.bv = nnx.Param(jnp.zeros((K, H), pdt), axes=("kv_heads", None))
    if cfg.out_bias:
      self.bo = nnx.Param(jnp.zeros((D,), pdt), axes=("embed",))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(H, cfg.norm_eps, pdt)
      self.k_norm = RMSNorm(H, cfg.norm_eps, pdt)
    if cfg.attn_sinks:
      self.sinks = nnx.Param(jnp.zeros((N,), pdt), axes=("heads",))
    self.dropout = nnx.Dropout(cfg.attn_dropout, rngs=rngs) if cfg.attn_dropout else None

  def cache_slots(self, max_len: int) -> int:
    return min(self.window, max_len) if self.window else max_len

  def __call__(self, x_BxTxD, positions_BxT, rope=None, cache: KVCache | None = None):
    cfg, dt = self.cfg, x_BxTxD.dtype
    N, K = cfg.n_heads, cfg.n_kv_heads  # one matmul for q, k and v: fewer, larger GEMMs
    qkv = project(x_BxTxD, jnp.concatenate([self.wq[...], self.wk[...], self.wv[...]], axis=1))
    q, k, v = qkv[:, :, :N], qkv[:, :, N:N + K], qkv[:, :, N + K:]
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    sinks = self.sinks[...] if cfg.attn_sinks else None
    T = x_BxTxD.shape[1]
    if cache is not None:
      out = attend(q, jnp.concatenate([cache.k_BxSxKxH.astype(dt), k], axis=1),
                   jnp.concatenate([cache.v_BxSxKxH.astype(dt), v], axis=1),
                   positions_BxT, jnp.concatenate([cache.pos_BxS, positions_BxT], axis=1),
                   window=self.window, sinks_N=sinks, dropout=self.dropout)
      cache = cache.update(k, v, positions_BxT)
    elif self.window and (cfg.attn_impl == "chunked" or (cfg.attn_impl == "auto" and T > 2 * self.window)):
      out = attend_local(q, k, v, window=self.window, sinks_N=sinks, dropout=self.dropout)
    else:
      out = attend(q, k, v, positions_BxT, positions_BxT, window=self.window, sinks_N=sinks,
                   dropout=self.dropout)
    y = project(out, self.wo[...], n_in=2)
    if cfg.out_bias:
      y = y + self.bo[...].astype(dt)
    return y, cache

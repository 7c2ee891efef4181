"""Attention: MHA / GQA / MQA, q/k/v/o biases, per-head q/k RMSNorm, learned sinks, sliding windows,
and a KV cache whose sliding layers keep only their window (a ring buffer).

Two kernels, equal on every input they share:
  attend         masks by positions; queries may see a cache (decoding) or the whole sequence.
  attend_blocks  self-attention over a whole sequence in blocks of queries, each block computing only
                 the keys it can see (causal, within the window): the training and prefill path.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss_jax.config import ModelConfig
from gptoss_jax.model.ffn import init_std_out
from gptoss_jax.model.linear import project, split
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


def attention_block(seq_len: int) -> int:
  """Queries per block: 64, or T / 16 for long sequences (bounds the unrolled blocks at 16)."""
  return max(64, -(-seq_len // 16))


def attend_blocks(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *, window: int = 0, sinks_N=None, dropout=None,
                  block: int = 64) -> jax.Array:
  """Causal (optionally sliding-window) self-attention over positions 0..T-1, one block of queries at a
  time, each against only the keys it can see: half the work of a full causal score matrix, block + W keys
  per block with a window. Heads lead the layout and the queries of a kv head's group are rows of one
  matrix ([B, K, T*G, H], row t*G + g), so each score matmul is one batched GEMM."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxTxKxH.shape[2]
  G = N // K
  q_BxKxTGxH = (q_BxTxNxH * H**-0.5).reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
  k_BxKxTxH, v_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)
  sinks_Kx1xG = None if sinks_N is None else sinks_N.astype(jnp.float32).reshape(K, 1, G)
  outs = []
  for start in range(0, T, block):
    end = min(start + block, T)
    lo = max(0, start - window + 1) if window else 0
    scores = jnp.einsum("bkrh,bksh->bkrs", q_BxKxTGxH[:, :, start * G:end * G], k_BxKxTxH[:, :, lo:end])
    qp, kp = np.arange(start, end).repeat(G)[:, None], np.arange(lo, end)[None, :]
    allowed_RxS = (kp <= qp) & ((qp - kp < window) if window else True)
    sinks = None if sinks_Kx1xG is None else jnp.tile(sinks_Kx1xG, (1, end - start, 1)).reshape(K, -1, 1)
    probs = softmax_with_sinks(jnp.where(allowed_RxS, scores.astype(jnp.float32), _MASKED), sinks)
    if dropout is not None:
      probs = dropout(probs)
    outs.append(jnp.einsum("bkrs,bksh->bkrh", probs.astype(v_BxKxTxH.dtype), v_BxKxTxH[:, :, lo:end]))
  out = jnp.concatenate(outs, axis=2).reshape(B, K, T, G, H)
  return out.transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def attend_fused(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, window: int = 0) -> jax.Array:
  """jax.nn.dot_product_attention over a whole sequence: cuDNN's fused kernel on GPU, XLA elsewhere;
  causal, GQA (fewer key/value heads), a sliding window of `window` keys (HF semantics: i - window < j <= i)."""
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, is_causal=True,
                                      local_window_size=(window - 1, 0) if window else None)


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

  def impl(self, T: int) -> str:
    """The kernel over a whole sequence: `auto` takes the fused one on GPU where it can express the layer
    (no sinks, no attention dropout), else the blockwise one past one block of queries."""
    cfg = self.cfg
    if cfg.attn_impl != "auto":
      return cfg.attn_impl
    if jax.default_backend() == "gpu" and not cfg.attn_sinks and not self.dropout:
      return "fused"
    return "blockwise" if T > attention_block(T) else "masked"

  def cache_slots(self, max_len: int) -> int:
    return min(self.window, max_len) if self.window else max_len

  def __call__(self, x_BxTxD, positions_BxT, rope=None, cache: KVCache | None = None):
    cfg, dt = self.cfg, x_BxTxD.dtype
    N, K = cfg.n_heads, cfg.n_kv_heads  # one matmul for q, k and v: fewer, larger GEMMs
    qkv = project(x_BxTxD, jnp.concatenate([self.wq[...], self.wk[...], self.wv[...]], axis=1))
    q, k, v = split(qkv, (N, K, K), axis=2)
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    sinks = self.sinks[...] if cfg.attn_sinks else None
    T = x_BxTxD.shape[1]
    if cache is not None:
      # a cache of S slots is a window of S positions: no change where it holds the whole text (generation),
      # streaming where it holds less (every layer sees only its last S positions)
      S = cache.pos_BxS.shape[1]
      out = attend(q, jnp.concatenate([cache.k_BxSxKxH.astype(dt), k], axis=1),
                   jnp.concatenate([cache.v_BxSxKxH.astype(dt), v], axis=1),
                   positions_BxT, jnp.concatenate([cache.pos_BxS, positions_BxT], axis=1),
                   window=min(self.window, S) if self.window else S, sinks_N=sinks, dropout=self.dropout)
      cache = cache.update(k, v, positions_BxT)
    elif self.impl(T) == "fused":
      out = attend_fused(q, k, v, self.window)
    elif self.impl(T) == "blockwise":
      out = attend_blocks(q, k, v, window=self.window, sinks_N=sinks, dropout=self.dropout, block=attention_block(T))
    else:
      out = attend(q, k, v, positions_BxT, positions_BxT, window=self.window, sinks_N=sinks,
                   dropout=self.dropout)
    y = project(out, self.wo[...], n_in=2)
    if cfg.out_bias:
      y = y + self.bo[...].astype(dt)
    return y, cache

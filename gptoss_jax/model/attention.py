"""Attention: MHA / GQA / MQA, q/k/v/o biases, per-head q/k RMSNorm, learned sinks, sliding windows,
and a KV cache whose sliding layers keep only their window (a ring buffer).

Three kernels, equal on every input they share:
  attend         masks by positions; queries may see a cache (decoding) or the whole sequence.
  attend_blocks  self-attention over a whole sequence in blocks of queries, each block computing only
                 the keys it can see (causal, within the window): the training and prefill path.
  attend_fused   the same through a platform's fused kernel where it has one (cuDNN's flash attention on
                 CUDA, sinks applied from each row's log-sum-exp; splash attention on TPU), else attend_blocks.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from gptoss_jax.config import ModelConfig
from gptoss_jax.model.ffn import init_std_out
from gptoss_jax.model.linear import FEW_ROWS, project, project_each, split
from gptoss_jax.model.norms import RMSNorm
from gptoss_jax.model.platform import per_lowering, target
from gptoss_jax.sharding import batch_axes
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
  """Attention whose mask the positions make: query t sees key s where k_pos[s] <= q_pos[t] (and within
  `window` of it), never a key at a negative position (padding, an empty cache slot)."""
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


class FlashKernel(NamedTuple):
  """A fused causal attention without sinks, as flash attention computes it: forward (q, k, v) -> (out
  [B, T, N, H], lse [B, N, T] float32, each row's log-sum-exp of the scaled scores), backward (q, k, v, out,
  lse, dout) -> (dq, dk, dv), which recomputes the probabilities as exp(score - lse) and takes each row's
  D = rowsum(dout * out) from `out`."""
  forward: Callable
  backward: Callable


def flash_with_sinks(kernel: FlashKernel, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, sinks_N) -> jax.Array:
  """Attention with one sink logit per head through a kernel that has none, exactly: a sink only adds
  exp(sink) to each row's denominator, so the output is the kernel's times sigmoid(lse - sink), and the
  backward is the kernel's own given that output and the row's log-sum-exp with the sink,
  lse' = logaddexp(lse, sink): with them the kernel's probabilities, exp(score - lse'), and its D are those of
  the softmax over keys and sink. The sink's gradient is -sum over rows of exp(sink - lse') * D."""

  def fwd(q, k, v, sinks):
    out, lse_BxNxT = kernel.forward(q, k, v)
    lse_with_sink = jnp.logaddexp(lse_BxNxT, sinks.astype(jnp.float32)[:, None])
    kept_BxTxNx1 = jnp.exp(lse_BxNxT - lse_with_sink).transpose(0, 2, 1)[..., None]  # sigmoid(lse - sink)
    out = (out.astype(jnp.float32) * kept_BxTxNx1).astype(out.dtype)
    return out, (q, k, v, sinks, out, lse_with_sink)

  @jax.custom_vjp
  def attend(q, k, v, sinks):
    return fwd(q, k, v, sinks)[0]

  def bwd(res, dout):
    q, k, v, sinks, out, lse_with_sink = res
    dq, dk, dv = kernel.backward(q, k, v, out, lse_with_sink, dout)
    D_BxNxT = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    p_sink_BxNxT = jnp.exp(sinks.astype(jnp.float32)[:, None] - lse_with_sink)
    dsinks = -jnp.sum(p_sink_BxNxT * D_BxNxT, axis=(0, 2))
    return dq, dk, dv, dsinks.astype(sinks.dtype)

  attend.defvjp(fwd, bwd)
  return attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, sinks_N)


def cudnn_kernel(head_dim: int, window: int) -> FlashKernel | None:
  """cuDNN's flash attention (causal, GQA, a sliding window of `window` keys: i - window < j <= i) as a
  FlashKernel, through the forward and backward rules `jax.nn.dot_product_attention(implementation="cudnn")`
  itself uses, or None where this process cannot trace it (no CUDA plugin: jax asks cuDNN for its version
  while tracing). bfloat16 and float16 only."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  try:
    version = cudnn.check_cudnn_version()
  except RuntimeError:
    return None
  rule = dict(scale=head_dim**-0.5, seed=0, dropout_rate=0.0, variadic_args=(False, False),
              mask_type=cudnn.MaskType.CAUSAL, layout=cudnn.AttentionLayout.BTNH.value,
              sliding_window_length=window or None)

  def unused(q):  # the rules' absent bias, sequence lengths, offsets and page tables
    return (jnp.zeros(0, q.dtype),) * 7

  def forward(q, k, v):
    (out, lse_BxNxT), _ = cudnn._dot_product_attention_fwd_rule(q, k, v, *unused(q), **rule, cudnn_version=version,
                                                               return_residual=True)
    return out, lse_BxNxT

  def backward(q, k, v, out, lse_BxNxT, dout):
    res = (q, k, v, *unused(q), lse_BxNxT, out)
    return cudnn._dot_product_attention_bwd_rule(*rule.values(), True, False, res, dout)[:3]

  return FlashKernel(forward, backward)


SPLASH_BLOCK = 128  # splash attention's default blocks of queries and keys: sequences a multiple of it


@jax.custom_vjp
def _float32_gradient(x_f32):
  """x, its gradient cast to float32 (splash attention returns its sinks' gradient in the output's dtype)."""
  return x_f32


_float32_gradient.defvjp(lambda x: (x, None), lambda _, g: (g.astype(jnp.float32),))


def splash_kernel(seq_len: int, n_heads: int, n_kv_heads: int, head_dim: int, window: int, interpret: bool = False):
  """JAX's Pallas splash attention for TPU as attend_blocks' function of (q, k, v, *sinks) [B, T, N, H]:
  causal or a sliding window of `window` keys, sinks per query head (its own backward computes theirs), GQA as
  one multi-query kernel per key/value head. `interpret` runs the kernel's program on any backend (tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  T, N, K, H = seq_len, n_heads, n_kv_heads, head_dim
  G = N // K
  mask = masks.LocalMask((T, T), (window - 1, 0), 0) if window else masks.CausalMask((T, T))
  kernel = splash.make_splash_mqa(masks.MultiHeadMask([mask] * G), head_shards=1, q_seq_shards=1, interpret=interpret)

  def attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, *sinks_N):
    B = q_BxTxNxH.shape[0]
    q = (q_BxTxNxH * H**-0.5).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    k, v = k_BxTxKxH.transpose(0, 2, 1, 3), v_BxTxKxH.transpose(0, 2, 1, 3)  # [B, K, T, H]
    sinks = _float32_gradient(sinks_N[0].astype(jnp.float32)).reshape(K, G) if sinks_N else None
    per_kv_head = jax.vmap(lambda q, k, v, s: kernel(q, k, v, sinks=s), in_axes=(0, 0, 0, None if sinks is None else 0))
    out = jax.vmap(per_kv_head, in_axes=(0, 0, 0, None))(q, k, v, sinks)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(v_BxTxKxH.dtype)

  return attend


def on_shards(fn, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *sinks_N) -> jax.Array:
  """fn(q, k, v, *sinks) on each device's sequences and heads where a mesh is in context: the batch split over
  the batch axes, the heads over `tensor`, as far as they divide. A kernel then sees one device's shapes (cuDNN's
  attention partitioned by XLA would be a Python callback, CustomSPMDPartitioning, that no exported program
  can hold)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *sinks_N)
  t = mesh.shape["tensor"]
  heads = "tensor" if t > 1 and not q_BxTxNxH.shape[2] % t and not k_BxSxKxH.shape[2] % t else None
  spec = P(batch_axes(mesh, q_BxTxNxH.shape[0]) or None, None, heads, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3 + (P(heads),) * len(sinks_N), out_specs=spec,
                       check_vma=False)(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *sinks_N)


def attend_fused(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, window: int = 0, sinks_N=None) -> jax.Array:
  """Self-attention over a whole sequence through a fused kernel where the program is lowered for a platform
  that has one: cuDNN's flash attention on CUDA for bfloat16 / float16 (sinks applied after it,
  `flash_with_sinks`), splash attention on TPU for sequences a multiple of SPLASH_BLOCK; elsewhere (CPU,
  float32 on CUDA) the blockwise kernel, the same function. Per device's shard of the batch and heads
  (`on_shards`)."""
  T, H = q_BxTxNxH.shape[1], q_BxTxNxH.shape[3]

  def blocks(q, k, v, *sinks):
    return attend_blocks(q, k, v, window=window, sinks_N=sinks[0] if sinks else None, block=attention_block(T))

  cuda = None
  if q_BxTxNxH.dtype in (jnp.bfloat16, jnp.float16) and (kernel := cudnn_kernel(H, window)):
    cuda = (lambda q, k, v, *sinks: flash_with_sinks(kernel, q, k, v, sinks[0]) if sinks else
            jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                         local_window_size=(window - 1, 0) if window else None))

  def tpu(q, k, *rest):  # built for one device's heads: on_shards may split them
    return splash_kernel(T, q.shape[2], k.shape[2], H, window)(q, k, *rest)

  tpu = tpu if T % SPLASH_BLOCK == 0 else None
  args = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH) + (() if sinks_N is None else (sinks_N,))
  return on_shards(lambda *a: per_lowering(*a, default=blocks, cuda=cuda, tpu=tpu), *args)


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
    """The kernel over a whole sequence: `auto` takes the fused one in a GPU's or TPU's program (the fused
    kernels have no attention dropout), else the blockwise one past one block of queries."""
    cfg = self.cfg
    if cfg.attn_impl != "auto":
      return cfg.attn_impl
    if target(cfg) in ("gpu", "tpu") and not self.dropout:
      return "fused"
    return "blockwise" if T > attention_block(T) else "masked"

  def cache_slots(self, max_len: int) -> int:
    return min(self.window, max_len) if self.window else max_len

  def __call__(self, x_BxTxD, positions_BxT, rope=None, cache: KVCache | None = None):
    cfg, dt = self.cfg, x_BxTxD.dtype
    N, K = cfg.n_heads, cfg.n_kv_heads
    platform = target(cfg)
    if math.prod(x_BxTxD.shape[:2]) <= FEW_ROWS:  # decoding: each weight read as stored (a concatenation is a copy)
      q, k, v = project_each(x_BxTxD, (self.wq[...], self.wk[...], self.wv[...]), platform=platform)
    else:  # one matmul for q, k and v: fewer, larger GEMMs
      qkv = project(x_BxTxD, jnp.concatenate([self.wq[...], self.wk[...], self.wv[...]], axis=1), platform=platform)
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
      out = attend_fused(q, k, v, self.window, sinks)
    elif self.impl(T) == "blockwise":
      out = attend_blocks(q, k, v, window=self.window, sinks_N=sinks, dropout=self.dropout, block=attention_block(T))
    else:
      out = attend(q, k, v, positions_BxT, positions_BxT, window=self.window, sinks_N=sinks,
                   dropout=self.dropout)
    y = project(out, self.wo[...], n_in=2, platform=platform)
    if cfg.out_bias:
      y = y + self.bo[...].astype(dt)
    return y, cache

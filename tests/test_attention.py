"""Attention against a per-query loop written here; window, sink and GQA invariances; KV cache decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax import ModelConfig, Transformer
from gptoss_jax.model.attention import Attention, attend, attend_blocks


def _reference(q, k, v, window=0, sinks=None):
  """One query at a time: causal (and windowed) softmax over keys, plus a sink column if given."""
  B, T, N, H = q.shape
  group = N // k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      for i in range(T):
        lo = max(0, i - window + 1) if window else 0
        keys = range(lo, i + 1)
        logits = np.array([q[b, i, n] @ k[b, j, n // group] / np.sqrt(H) for j in keys])
        column = np.append(logits, sinks[n]) if sinks is not None else logits
        p = np.exp(column - column.max())
        p = p[:len(logits)] / p.sum()
        out[b, i, n] = sum(p_j * v[b, j, n // group] for p_j, j in zip(p, keys))
  return out


def _qkv(rng, B=2, T=11, N=4, K=2, H=8):
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  return f(B, T, N, H), f(B, T, K, H), f(B, T, K, H)


@pytest.mark.parametrize("window, with_sinks", [(0, False), (0, True), (4, False), (4, True), (3, True)])
def test_kernels_match_reference(rng, window, with_sinks):
  q, k, v = _qkv(rng)
  sinks = rng.normal(size=4).astype(np.float32) if with_sinks else None
  want = _reference(q, k, v, window, sinks)
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  s = None if sinks is None else jnp.asarray(sinks)
  got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), pos, pos, window=window, sinks_N=s)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for block in (3, 4, 11):  # several blocks, a short last one; one block
    blocks = attend_blocks(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window, sinks_N=s, block=block)
    np.testing.assert_allclose(blocks, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 4])
def test_blockwise_gradients_match_masked(rng, window):
  q, k, v = map(jnp.asarray, _qkv(rng))
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  sinks = jnp.asarray(rng.normal(size=4), jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  masked = jax.grad(loss(lambda q, k, v, s: attend(q, k, v, pos, pos, window=window, sinks_N=s)), (0, 1, 2, 3))
  blocks = jax.grad(loss(lambda q, k, v, s: attend_blocks(q, k, v, window=window, sinks_N=s, block=3)), (0, 1, 2, 3))
  for a, b in zip(masked(q, k, v, sinks), blocks(q, k, v, sinks)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_sink_rows_sum_below_one(rng):
  q, k, v = _qkv(rng, T=5)
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  ones = jnp.ones_like(jnp.asarray(v))  # output = row sum of the probabilities
  out = attend(jnp.asarray(q), jnp.asarray(k), ones, pos, pos, sinks_N=jnp.zeros(4))
  assert float(out.max()) < 1.0
  out = attend(jnp.asarray(q), jnp.asarray(k), ones, pos, pos)
  np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_minus_infinite_sink_is_no_sink(rng):
  q, k, v = map(jnp.asarray, _qkv(rng))
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  a = attend(q, k, v, pos, pos, window=4, sinks_N=jnp.full((4,), -jnp.inf))
  np.testing.assert_allclose(a, attend(q, k, v, pos, pos, window=4), rtol=1e-6)
  b = attend_blocks(q, k, v, window=4, sinks_N=jnp.full((4,), -jnp.inf), block=4)
  np.testing.assert_allclose(b, attend_blocks(q, k, v, window=4, block=4), rtol=1e-6)


def test_window_at_least_sequence_is_full_attention(rng):
  q, k, v = map(jnp.asarray, _qkv(rng))
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  full = attend(q, k, v, pos, pos)
  np.testing.assert_allclose(attend(q, k, v, pos, pos, window=11), full, rtol=1e-6)
  np.testing.assert_allclose(attend_blocks(q, k, v, window=16, block=4), full, rtol=1e-5, atol=1e-6)


def test_gqa_with_kv_heads_equal_heads_is_mha(rng):
  """A GQA layer equals an MHA layer whose k/v projections repeat each kv head for its query group."""
  gqa_cfg = ModelConfig(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, qkv_bias=True, sliding_window=3)
  mha_cfg = gqa_cfg.replace(n_kv_heads=4)
  gqa, mha = Attention(gqa_cfg, True, nnx.Rngs(0)), Attention(mha_cfg, True, nnx.Rngs(1))
  for name in ("wk", "wv", "bk", "bv"):
    getattr(gqa, name)[...] = jnp.asarray(rng.normal(size=getattr(gqa, name)[...].shape), jnp.float32)
    getattr(mha, name)[...] = jnp.repeat(getattr(gqa, name)[...], 2, axis=-2)
  for name in ("wq", "bq", "wo"):
    getattr(mha, name)[...] = getattr(gqa, name)[...]
  x = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  np.testing.assert_allclose(gqa(x, pos)[0], mha(x, pos)[0], rtol=1e-5, atol=1e-6)


def _oss_tiny(**changes):
  return ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=32,
                     position="yarn", rope_factor=4.0, rope_original_max_len=16, qkv_bias=True, out_bias=True,
                     attn_sinks=True, sliding_window=5, ffn="clamped_swiglu", ffn_bias=True, n_experts=4,
                     top_k=2, d_expert=32, router_bias=True, max_seq_len=64).replace(**changes)


def _randomize(model, seed=0):
  """Biases and sinks start at zero; give every parameter a random value so they matter."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    var[...] = var[...] + jnp.asarray(rng.normal(size=var.shape) * 0.2, var.dtype)


def test_blockwise_and_masked_models_agree(rng):
  tokens = jnp.asarray(rng.integers(0, 64, (2, 150)), jnp.int32)  # blocks of 64: the last one short
  masked = Transformer(_oss_tiny(attn_impl="masked", max_seq_len=160), nnx.Rngs(0))
  blockwise = Transformer(_oss_tiny(attn_impl="blockwise", max_seq_len=160), nnx.Rngs(0))
  _randomize(masked), _randomize(blockwise)
  forward = jax.jit(lambda m, t: m(t))
  np.testing.assert_allclose(forward(masked, tokens), forward(blockwise, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("experts", [{}, {"n_experts": 8, "moe_mxfp4": True}])
def test_decoding_with_cache_matches_full_forward(rng, experts):
  """Packed experts: each decoded token (2 tokens x top-2 < 8 experts) takes the selected-experts path; the
  full forward, the reference, the dropless loop over every expert."""
  from gptoss_jax.model.moe import resolved_dispatch
  cfg = _oss_tiny(**experts)
  assert (resolved_dispatch(cfg, 2) == "selected") == bool(experts)
  model, reference = Transformer(cfg, nnx.Rngs(0)), Transformer(cfg.replace(moe_dispatch="grouped"), nnx.Rngs(0))
  _randomize(model)
  nnx.update(reference, nnx.state(model))
  tokens = jnp.asarray(rng.integers(0, 64, (2, 20)), jnp.int32)
  step = jax.jit(lambda m, t, p, c: m.forward(t, p, c)[::2])
  full, _ = step(reference, tokens, None, None)
  cache = model.init_cache(batch=2, max_len=32)
  assert [c.k_BxSxKxH.shape[1] for c in cache] == [5, 32, 5, 32]  # sliding layers keep only the window
  prompt = 7  # longer than the window: the prefill writes only its last 5 keys in sliding layers
  first, cache = step(model, tokens[:, :prompt], None, cache)
  logits = [first]
  for t in range(prompt, 20):
    pos = jnp.full((2, 1), t, jnp.int32)
    lg, cache = step(model, tokens[:, t:t + 1], pos, cache)
    logits.append(lg)
  np.testing.assert_allclose(jnp.concatenate(logits, axis=1), full, rtol=1e-4, atol=1e-4)


def _flash_kernel(window):
  """A fused kernel without sinks as flash attention is written (FlashAttention-2, algorithm 2 and its
  backward), in plain jnp: the forward gives each row's log-sum-exp, the backward recomputes the
  probabilities from it and D = rowsum(dO * O) from the output it is given."""
  from gptoss_jax.model.attention import FlashKernel

  def scores(q, k):  # [B, N, T, S], masked
    B, T, N, H = q.shape
    s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, N // k.shape[2], axis=2)) / np.sqrt(H)
    i, j = np.arange(T)[:, None], np.arange(k.shape[1])[None, :]
    return jnp.where((j <= i) & ((i - j < window) if window else True), s, -np.inf)

  def forward(q, k, v):
    s = scores(q, k)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", jnp.exp(s - lse[..., None]), jnp.repeat(v, q.shape[2] // v.shape[2], axis=2))
    return out, jax.lax.stop_gradient(lse)

  def backward(q, k, v, out, lse, dout):
    N, K, H = q.shape[2], k.shape[2], q.shape[3]
    p = jnp.exp(scores(q, k) - lse[..., None])
    v_full = jnp.repeat(v, N // K, axis=2)
    dv = jnp.einsum("bnts,btnh->bsnh", p, dout)
    dp = jnp.einsum("btnh,bsnh->bnts", dout, v_full)
    ds = p * (dp - jnp.einsum("btnh,btnh->bnt", dout, out)[..., None]) / np.sqrt(H)
    dq = jnp.einsum("bnts,bsnh->btnh", ds, jnp.repeat(k, N // K, axis=2))
    dk = jnp.einsum("bnts,btnh->bsnh", ds, q)
    fold = lambda x: x.reshape(*x.shape[:2], K, N // K, H).sum(3)  # noqa: E731  GQA: a kv head's group summed
    return dq, fold(dk), fold(dv)

  return FlashKernel(forward, backward)


@pytest.mark.parametrize("window", [0, 4, 64])
def test_sinks_through_a_flash_kernel_equal_the_blockwise_kernel(rng, window):
  """flash_with_sinks (how cuDNN's flash attention runs gpt-oss's sink layers): values and gradients, sinks'
  included, against the blockwise kernel, with GQA and sliding windows; the flash kernel it is given is
  first checked against autodiff of its own forward."""
  from gptoss_jax.model.attention import flash_with_sinks
  q, k, v = map(jnp.asarray, _qkv(rng, T=150))
  sinks = jnp.asarray(rng.normal(size=4) * 2, jnp.float32)
  kernel = _flash_kernel(window)
  out, lse = kernel.forward(q, k, v)
  dout = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  for got, want in zip(kernel.backward(q, k, v, out, lse, dout), jax.vjp(lambda *a: kernel.forward(*a)[0], q, k, v)[1](dout)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  np.testing.assert_allclose(flash_with_sinks(kernel, q, k, v, sinks)[:, :11],
                             _reference(*map(np.asarray, (q[:, :11], k[:, :11], v[:, :11])), window, np.asarray(sinks)),
                             rtol=1e-4, atol=1e-5)
  loss = lambda fn: lambda *a: jnp.sum(jnp.tanh(fn(*a)))  # noqa: E731
  fused = jax.value_and_grad(loss(lambda *a: flash_with_sinks(kernel, *a)), argnums=(0, 1, 2, 3))(q, k, v, sinks)
  blocks = jax.value_and_grad(loss(lambda q, k, v, s: attend_blocks(q, k, v, window=window, sinks_N=s)),
                              argnums=(0, 1, 2, 3))(q, k, v, sinks)
  np.testing.assert_allclose(fused[0], blocks[0], rtol=1e-5)
  for a, b in zip(fused[1], blocks[1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 128])
def test_splash_attention_with_sinks_equals_the_blockwise_kernel(rng, window):
  """TPU's fused kernel (JAX's Pallas splash attention, run by its interpreter here): values and gradients,
  sinks' included, against the blockwise kernel; GQA, causal and a window of 128."""
  from gptoss_jax.model.attention import splash_kernel
  q, k, v = map(jnp.asarray, _qkv(rng, B=1, T=256, H=64))
  sinks = jnp.asarray(rng.normal(size=4) * 2, jnp.float32)
  splash = splash_kernel(256, 4, 2, 64, window, interpret=True)
  loss = lambda fn: lambda *a: jnp.sum(jnp.tanh(fn(*a)))  # noqa: E731
  got = jax.value_and_grad(loss(splash), argnums=(0, 1, 2, 3))(q, k, v, sinks)
  want = jax.value_and_grad(loss(lambda q, k, v, s: attend_blocks(q, k, v, window=window, sinks_N=s)),
                            argnums=(0, 1, 2, 3))(q, k, v, sinks)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fused_model_equals_blockwise_and_auto_takes_it_in_a_gpus_program(rng):
  """attn_impl=fused (gpt-oss's sinks included) runs, compiled for CPU, the blockwise kernel: the same
  logits; `auto` takes it in a GPU's and a TPU's program, whatever the process runs on, except with attention
  dropout."""
  tokens = jnp.asarray(rng.integers(0, 64, (2, 130)), jnp.int32)
  fused = Transformer(_oss_tiny(attn_impl="fused", max_seq_len=160), nnx.Rngs(0))
  blockwise = Transformer(_oss_tiny(attn_impl="blockwise", max_seq_len=160), nnx.Rngs(0))
  _randomize(fused), _randomize(blockwise)
  forward = jax.jit(lambda m, t: m(t))
  np.testing.assert_allclose(forward(fused, tokens), forward(blockwise, tokens), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="attn_impl=fused .* has no attention dropout"):
    _oss_tiny(attn_impl="fused", attn_dropout=0.1)
  auto = lambda **c: Transformer(_oss_tiny(attn_impl="auto", max_seq_len=160, **c), nnx.Rngs(0)).blocks[0].attn  # noqa: E731
  assert auto(platform="cpu").impl(130) == "blockwise"
  assert auto(platform="gpu").impl(130) == "fused" and auto(platform="tpu").impl(130) == "fused"  # with sinks
  assert auto(platform="gpu", attn_dropout=0.1).impl(130) == "blockwise"
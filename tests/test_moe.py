"""Routing, dispatch strategies and auxiliary losses against numpy written here; MXFP4 against a
plain decode and transformers' converter."""

from platform import machine
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss_jax import ModelConfig
from gptoss_jax.model import mxfp4
from gptoss_jax.model.ffn import MLP
from gptoss_jax.model.experts import block_rows, dropless_blocks, padded_rows
from gptoss_jax.model.moe import GMM_ROWS_MIN, MoE, aux_losses, balance_step, gmm_rows, resolved_dispatch, route

BASE = ModelConfig(d_model=32, n_experts=8, top_k=2, d_expert=32, ffn="clamped_swiglu", ffn_bias=True,
                   router_bias=True)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_routing_orders(rng):
  logits = rng.normal(size=(6, 8)).astype(np.float32)
  top = np.argsort(-logits, axis=-1)[:, :2]
  w, idx = route(BASE, jnp.asarray(logits))
  np.testing.assert_array_equal(idx, top)
  np.testing.assert_allclose(w, _softmax(np.take_along_axis(logits, top, -1)), rtol=1e-5)  # gpt-oss
  probs = _softmax(logits)
  w, _ = route(BASE.replace(routing="softmax_topk", norm_topk_prob=False), jnp.asarray(logits))
  np.testing.assert_allclose(w, np.take_along_axis(probs, top, -1), rtol=1e-5)
  w, _ = route(BASE.replace(routing="softmax_topk", norm_topk_prob=True), jnp.asarray(logits))
  picked = np.take_along_axis(probs, top, -1)
  np.testing.assert_allclose(w, picked / picked.sum(-1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("routing", ["topk_softmax", "softmax_topk"])
def test_top1_router_uses_switch_gate_and_gets_gradient(rng, routing):
  """top_k = 1: the weight is the chosen expert's softmax probability over all experts (a softmax over
  one logit, or a renormalised single weight, would be the constant 1 and leave the router untrained)."""
  cfg = BASE.replace(top_k=1, routing=routing, norm_topk_prob=True)
  logits = rng.normal(size=(6, 8)).astype(np.float32)
  w, idx = route(cfg, jnp.asarray(logits))
  np.testing.assert_array_equal(idx[:, 0], logits.argmax(-1))
  np.testing.assert_allclose(w[:, 0], _softmax(logits).max(-1), rtol=1e-5)
  moe = _randomized(cfg)
  graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
  x = jnp.asarray(rng.normal(size=(1, 16, 32)), jnp.float32)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x)[0] ** 2))(params)
  assert float(jnp.abs(grads["router_w"][...]).max()) > 1e-3


def test_selection_bias_moves_the_choice_not_the_weights(rng):
  logits = rng.normal(size=(6, 8)).astype(np.float32)
  bias = np.zeros(8, np.float32)
  bias[5] = 100.0  # expert 5 is in every token's top-2
  w, idx = route(BASE, jnp.asarray(logits), jnp.asarray(bias))
  assert (np.asarray(idx) == 5).any(-1).all()
  np.testing.assert_allclose(w, _softmax(np.take_along_axis(logits, np.asarray(idx), -1)), rtol=1e-5)
  load = np.array([0.5, 0.25, 0.25, 0.0])  # shares of the assignments; 1/4 each is balanced
  np.testing.assert_allclose(balance_step(jnp.zeros(4), jnp.asarray(load), 0.1), [-0.1, 0.0, 0.0, 0.1])


def test_aux_losses_formula(rng):
  logits = rng.normal(size=(10, 4)).astype(np.float32)
  idx = np.argsort(-logits, axis=-1)[:, :2]
  load = np.array([(idx == e).sum() for e in range(4)]) / idx.size
  out = aux_losses(jnp.asarray(logits), jnp.asarray(idx))
  np.testing.assert_allclose(out["expert_load"], load, rtol=1e-6)
  assert float(out["moe_aux_loss"]) == pytest.approx(4 * np.sum(load * _softmax(logits).mean(0)), rel=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  assert float(out["moe_z_loss"]) == pytest.approx(np.mean(lse**2), rel=1e-5)


def _randomized(cfg, seed=0):
  moe = MoE(cfg, nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(moe, nnx.Param)):
    var[...] = jnp.asarray(rng.normal(size=var.shape) * 0.3, var.dtype)
  return moe


def _numpy_moe(moe, cfg, x):
  """Per token: its top-k experts, each a clamped SwiGLU, mixed by the routing weights."""
  w_in, b_in = np.asarray(moe.w_in[...]), np.asarray(moe.b_in[...])
  w_out, b_out = np.asarray(moe.w_out[...]), np.asarray(moe.b_out[...])
  logits = x @ np.asarray(moe.router_w[...]) + np.asarray(moe.router_b[...])
  out = np.zeros_like(x)
  for n in range(x.shape[0]):
    top = np.argsort(-logits[n])[:cfg.top_k]
    for weight, e in zip(_softmax(logits[n, top]), top):
      gate = np.minimum(x[n] @ w_in[e, :, 0] + b_in[e, 0], 7)
      up = np.clip(x[n] @ w_in[e, :, 1] + b_in[e, 1], -7, 7)
      out[n] += weight * ((gate / (1 + np.exp(-1.702 * gate)) * (up + 1)) @ w_out[e] + b_out[e])
  return out


@pytest.mark.parametrize("dispatch", ["grouped", "blocked", "gmm", "ragged", "selected", "dense"])
def test_dispatch_matches_numpy(rng, dispatch):
  cfg = BASE.replace(moe_dispatch=dispatch)
  moe = _randomized(cfg)
  x = rng.normal(size=(2, 12, 32)).astype(np.float32)
  y, aux = moe(jnp.asarray(x))
  np.testing.assert_allclose(y.reshape(24, 32), _numpy_moe(moe, cfg, x.reshape(24, 32)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dispatch", ["grouped", "blocked", "gmm"])
def test_dropless_dispatch_routes_every_token_when_one_expert_takes_everything(rng, dispatch):
  """One expert holds half the assignments (the rest spread), far past the blocks' bound on padding: every
  token still goes through its experts."""
  cfg = BASE.replace(moe_dispatch=dispatch)
  moe, ref = _randomized(cfg), _randomized(cfg.replace(moe_dispatch="dense"))
  for m in (moe, ref):
    m.router_b[...] = jnp.zeros(8).at[3].set(100.0)  # expert 3 is everyone's first choice
  x = jnp.asarray(rng.normal(size=(1, 40, 32)), jnp.float32)
  np.testing.assert_allclose(moe(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
  assert float(moe(x)[1]["expert_load"][3]) == pytest.approx(0.5)


def test_capacity_factor_drops_overflow(rng):
  """With a capacity, an overflowing expert keeps its first tokens (in token order) only."""
  cfg = BASE.replace(top_k=1, moe_capacity_factor=1.0, n_experts=8)
  moe = _randomized(cfg)
  moe.router_b[...] = jnp.zeros(8).at[5].set(100.0)  # every token picks expert 5
  x = jnp.asarray(rng.normal(size=(1, 32, 32)), jnp.float32)
  y = moe(x)[0][0]
  capacity = 8  # ceil(1.0 * 32 tokens * 1 / 8 experts / 8) * 8
  dense = _randomized(cfg.replace(moe_dispatch="dense", moe_capacity_factor=0.0))
  dense.router_b[...] = moe.router_b[...]
  want = dense(x)[0][0]
  np.testing.assert_allclose(y[:capacity], want[:capacity], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[capacity:], 0.0)


def _on_mesh(moe, x, mesh: dict):
  """The layer's output and gradients (input and parameters) under a mesh of 8 fake devices (or one)."""
  from gptoss_jax.sharding import make_mesh
  sizes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1} | mesh
  graph, params = nnx.split(moe)

  def loss(params, x):
    y, aux = nnx.merge(graph, params)(x)
    return jnp.sum(jnp.sin(y)), (y, aux["moe_aux_loss"])
  devices = jax.devices()[:int(np.prod(list(sizes.values())))]
  with jax.set_mesh(make_mesh(sizes, devices)):
    grads, (y, aux) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  return y, aux, grads


@pytest.mark.parametrize("platform, mesh", [("cpu", dict(expert=8)), ("gpu", dict(expert=8)),
                                            ("gpu", dict(data=2, expert=4)), ("tpu", dict(fsdp=2, expert=2, tensor=2))])
def test_expert_parallelism_equals_one_device(rng, platform, mesh):
  """Experts split over the `expert` mesh axis, the rows sent to them and back (all-to-all): output, load-balancing
  loss and every gradient equal one device's, dropless, with the platform's own dispatch on each device's experts
  (the CPU's loop, a GPU's blocks, a TPU's megablox kernels interpreted); one expert takes a third of the
  assignments (more than balanced routing sends any device)."""
  cfg = BASE.replace(platform=platform, d_expert=64)
  moe = _randomized(cfg)
  moe.router_b[...] = moe.router_b[...].at[3].add(2.0)
  x = jnp.asarray(rng.normal(size=(4, 32, 32)), jnp.float32)
  y8, aux8, g8 = _on_mesh(moe, x, mesh)
  y1, aux1, g1 = _on_mesh(moe, x, {})
  np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux8, aux1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):  # sums over the tokens in another order: float32's
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())  # rounding, relative to the sums


@pytest.mark.parametrize("factor, sent", [(1.0, 16), (2.0, 32)])
def test_expert_parallelism_with_a_capacity_drops_what_a_device_sends_past_it(rng, factor, sent):
  """With a capacity factor the rows one device sends another are bounded, ceil(factor x its assignments / 4
  devices on the expert axis) rounded up to 8: every token picks expert 5, so each shard of 64 tokens keeps its
  first `sent` and the rest come out zero; the kept ones equal the dense layer's."""
  cfg = BASE.replace(top_k=1, moe_capacity_factor=factor)
  moe = _randomized(cfg)
  moe.router_b[...] = jnp.zeros(8).at[5].set(100.0)
  x = jnp.asarray(rng.normal(size=(8, 64, 32)), jnp.float32)  # 8 shards of 64 tokens
  y = np.asarray(_on_mesh(moe, x, dict(data=2, expert=4))[0])
  dense = _randomized(cfg.replace(moe_dispatch="dense", moe_capacity_factor=0.0))
  dense.router_b[...] = moe.router_b[...]
  want = np.asarray(dense(x)[0])
  np.testing.assert_allclose(y[:, :sent], want[:, :sent], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[:, sent:], 0.0)


def test_one_expert_top1_is_the_dense_ffn(rng):
  moe_cfg = ModelConfig(d_model=16, n_experts=1, top_k=1, d_expert=24, ffn="swiglu")
  moe = _randomized(moe_cfg)
  mlp = MLP(moe_cfg.replace(n_experts=0, d_ff=24), nnx.Rngs(0))
  mlp.w_in[...], mlp.w_out[...] = moe.w_in[...][0], moe.w_out[...][0]
  x = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  np.testing.assert_allclose(moe(x)[0], mlp(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch, n_experts, tokens", [
    ("grouped", 8, 10), ("grouped", 4, 250), ("blocked", 8, 10), ("blocked", 4, 250), ("gmm", 4, 250)])
def test_dropless_gradients_match_dense(rng, dispatch, n_experts, tokens):
  """(4, 250): 250 rows per expert on average, so the loop runs blocks of 128, 64 and 32 rows, `blocked`
  blocks of 32 rows in chunks of 4 blocks with a shorter last one (10 tokens: blocks of one row, no padding),
  and `gmm` (megablox's kernels, interpreted) tiles of 32 rows that the experts' boundaries cut."""
  cfg = BASE.replace(n_experts=n_experts)
  if tokens == 250:
    assert dropless_blocks(cfg, 2 * tokens) == (128, 64, 32) and block_rows(cfg, 2 * tokens) == 32
    assert gmm_rows(cfg, 2 * tokens) == 32
  x = jnp.asarray(rng.normal(size=(2, tokens, 32)), jnp.float32)
  grads, outs = {}, {}
  for kind in (dispatch, "dense"):
    moe = _randomized(cfg.replace(moe_dispatch=kind))
    outs[kind] = moe(x)[0]
    loss = lambda m: jnp.sum(jnp.sin(m(x)[0]))
    grads[kind] = nnx.grad(loss)(moe)
  np.testing.assert_allclose(outs[dispatch], outs["dense"], rtol=1e-4, atol=1e-4)
  for (path, a), (_, b) in zip(nnx.to_flat_state(grads[dispatch]), nnx.to_flat_state(grads["dense"])):
    scale = float(jnp.abs(b[...]).max())  # float32 sums in another order: compare at the array's scale
    np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))


# ------------------------------------------------------------------ MXFP4


def _plain_dequant(blocks, scales):
  table = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
  out = []
  for row_blocks, row_scales in zip(blocks.reshape(-1, *blocks.shape[-2:]), scales.reshape(-1, scales.shape[-1])):
    row = []
    for block, scale in zip(row_blocks, row_scales):
      for byte in block:
        row += [table[byte & 15] * 2.0**(int(scale) - 127), table[byte >> 4] * 2.0**(int(scale) - 127)]
    out.append(row)
  return np.array(out, np.float32).reshape(*blocks.shape[:-2], -1)


def test_mxfp4_dequantize_plain_decode(rng):
  blocks = rng.integers(0, 256, (3, 2, 16), dtype=np.uint8)
  scales = rng.integers(120, 134, (3, 2), dtype=np.uint8)
  np.testing.assert_array_equal(mxfp4.dequantize(blocks, scales, jnp.float32), _plain_dequant(blocks, scales))


def test_mxfp4_scales_are_powers_of_two():
  """Every e8m0 byte: 2**(s - 127), the subnormal 2**-127 at 0, NaN at 255."""
  s = np.arange(256)
  got = np.asarray(mxfp4.scale_values(jnp.asarray(s, jnp.uint8)))
  np.testing.assert_array_equal(got[:255], np.ldexp(np.float32(1), s[:255] - 127).astype(np.float32))
  assert np.isnan(got[255])


def test_mxfp4_quantize_follows_the_ocp_spec(rng):
  """2,000 random blocks against codes built with plain ml_dtypes casts: scale = 2**(floor(log2 amax) - 2)
  as an e8m0 byte, each value / scale cast to e2m1 (round to nearest even, saturating at 6)."""
  import ml_dtypes
  n = 2000
  magnitude = 2.0 ** rng.integers(-20, 20, size=(n, 1))
  w = (rng.normal(size=(n, 32)) * magnitude).astype(np.float32)
  w[::7] = np.round(w[::7] / magnitude[::7] * 4) / 4 * magnitude[::7]  # quarter steps: many exact ties
  w[5] = 0.0  # an all-zero block
  w[6, 3] = -0.0
  blocks, scales = mxfp4.quantize(w.reshape(1, -1))
  amax = np.abs(w).max(-1)
  shared = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127)
  want_scales = (2.0 ** shared).astype(np.float32).astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)
  want_scales[5] = 0  # 2**-127 is e8m0's smallest
  codes = (w / 2.0 ** shared[:, None]).astype(np.float32).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
  np.testing.assert_array_equal(np.asarray(scales).reshape(n), want_scales)
  np.testing.assert_array_equal(np.asarray(blocks).reshape(n, 16), codes[:, 0::2] | (codes[:, 1::2] << 4))
  back = np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32)).reshape(n, 32)
  np.testing.assert_array_equal(back, codes_to_values(codes) * 2.0 ** shared[:, None])
  again = mxfp4.quantize(back.reshape(1, -1))  # representable values survive exactly
  np.testing.assert_array_equal(mxfp4.dequantize(*again, jnp.float32), back.reshape(1, -1))


def test_mxfp4_round_trip_blocks_along_its_axis_and_ends_in_a_shorter_block(rng):
  """Against the spec per block, by ml_dtypes casts: 48 values along axis 1 are one block of 32 and one of 16
  with their own scales."""
  import ml_dtypes
  w = (rng.normal(size=(3, 48, 5)) * 2.0 ** rng.integers(-6, 6, size=(3, 1, 5))).astype(np.float32)
  got = np.asarray(mxfp4.round_trip(jnp.asarray(w), axis=1))
  for lo, hi in ((0, 32), (32, 48)):
    block = w[:, lo:hi]
    shared = np.floor(np.log2(np.abs(block).max(axis=1, keepdims=True))) - 2
    want = (block / 2.0 ** shared).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * 2.0 ** shared
    np.testing.assert_array_equal(got[:, lo:hi], want)


def test_mxfp4_experts_after_training_are_the_packed_model_and_cost_nothing_when_representable(rng):
  """experiments.mxfp4_cost's quantization of a float model computes what the same weights stored packed
  compute (gpt-oss's tiny widths, divisible by 32), and a second quantization changes nothing."""
  from experiments.mxfp4_cost import quantize_experts
  from gptoss_jax.model import Transformer
  from gptoss_jax.config_files import load_config_file
  cfg = ModelConfig.from_dict(load_config_file("gpt_oss:tiny").model).replace(init_std=0.1)
  model = Transformer(cfg, nnx.Rngs(0))
  tokens = jnp.asarray(rng.integers(0, 256, (2, 24)), jnp.int32)
  before = np.asarray(model(tokens))
  assert quantize_experts(model) == cfg.n_layers
  once = np.asarray(model(tokens))
  assert np.abs(once - before).max() > 1e-3  # quantization moved the logits
  packed = Transformer(cfg.replace(moe_mxfp4=True), nnx.Rngs(0))
  for dense, stored in zip(model.blocks, packed.blocks):
    ffn = stored.ffn
    ffn.w_in_blocks[...], ffn.w_in_scales[...] = mxfp4.quantize(jnp.transpose(dense.ffn.w_in[...], (0, 2, 3, 1)))
    ffn.w_out_blocks[...], ffn.w_out_scales[...] = mxfp4.quantize(jnp.transpose(dense.ffn.w_out[...], (0, 2, 1)))
  nnx.update(packed, nnx.state(model, nnx.Param))  # every other weight as the float model's
  np.testing.assert_allclose(np.asarray(packed(tokens)), once, atol=1e-5)
  quantize_experts(model)
  np.testing.assert_array_equal(np.asarray(model(tokens)), once)  # representable weights: zero cost


def codes_to_values(codes):
  import ml_dtypes
  return codes.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


# 19 blocks of 32 a row: AVX-512 takes them 8 at a time (two groups), then a pair, then one unpaired block
MXFP4_IN = 32 * 19


def packed_experts(rng, E=5, O=3 * 7, I=MXFP4_IN):
  """Packed experts [E, 3, 7, I / 32, 16] (every code), their scales, and their values [E, O, I] in float32.
  A few scales are the format's extremes, in an 8-block group and after: 0 (2^-127) and 1, and 255 (NaN), in
  one row of experts 0 and 3 each (the kernel's blocks 5 and 18, where I has 19 blocks)."""
  blocks = rng.integers(0, 256, (E, 3, 7, I // 32, 16), dtype=np.uint8)  # output dimensions [3, 7]
  scales = rng.integers(110, 140, (E, 3, 7, I // 32), dtype=np.uint8)
  nb = I // 32
  scales[1, 0, 2, 2], scales[2, 1, 1, nb - 3], scales[4, 2, 6, 0] = 0, 1, 0
  scales[0, 1, 3, min(5, nb - 1)], scales[3, 0, 0, nb - 1] = 255, 255
  codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(E, O, I // 32, 32)
  w = codes_to_values(codes) * np.where(scales == 255, np.nan, 2.0 ** (scales.astype(np.float64) - 127))[..., None].reshape(E, O, I // 32, 1)
  return blocks, scales, w.reshape(E, O, I)


def assert_mxfp4_product(got, x, experts, w, rounded):
  """got [A, O] against W[experts[a]] @ x[a] in float64: a row is NaN exactly where its expert's row has a NaN
  scale; the others as float32 sums, or within the integer rounding's bound when the kernel `rounded` x (16-bit
  integers per block of 32 with a power-of-two scale 2^(e - 15), 2^e just above the block's largest |x|)."""
  x64, w64 = np.asarray(x, np.float64), w[experts].astype(np.float64)
  nan_rows = np.isnan(w64).any(-1)
  w64 = np.nan_to_num(w64)
  want = np.einsum("ai,aoi->ao", x64, w64)
  got = np.asarray(got)
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_array_equal(np.isnan(got), nan_rows | np.isnan(x64).any(-1)[:, None])
  e = np.frexp(np.abs(x64.reshape(len(x64), -1, 32)).max(-1))[1]  # |x| < 2^e in each block
  rounding = np.einsum("ai,aoi->ao", np.repeat(2.0 ** (e - 16), 32, axis=1), np.abs(w64))
  ok = ~np.isnan(got)
  bound = rounding * rounded + 1e-5 * np.abs(want) + 1e-5 * np.abs(want[ok]).max()
  assert np.all(np.abs(got - want)[ok] <= bound[ok])


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "xla"])
def test_mxfp4_matvec_equals_a_plain_decode(rng, monkeypatch, kernel):
  """Each assignment's product with its expert's packed weight, against codes decoded by ml_dtypes and
  numpy's product: the CPU kernel as this machine builds it (needs g++) and XLA's path, for every code, the
  scales' extremes, experts chosen several times (the kernel reads an expert's rows once for its assignments,
  four at a time) and several output dimensions; a NaN input stays its assignment's. Float32 x as float32
  sums; bfloat16 x the AVX2 and AVX-512 kernels round (`assert_mxfp4_product`), and as exact as float32 sums
  for values within a factor 128 of their block's largest."""
  from gptoss_jax.model import cpu_kernels
  monkeypatch.setenv("GPTOSS_JAX_KERNELS", "1" if kernel else "0")
  rounds = kernel and "avx2" in Path("/proc/cpuinfo").read_text()
  cpu_kernels.available.cache_clear()
  jax.clear_caches()  # the choice is made when a program is traced
  try:
    if kernel and not cpu_kernels.available():
      pytest.skip("the MXFP4 CPU kernel could not be built here (no g++?)")
    E, O, I, A = 5, 3 * 7, MXFP4_IN, 6
    blocks, scales, w = packed_experts(rng, E, O, I)
    experts = np.array([4, 0, 4, 2, 1, 4])
    x = rng.normal(size=(A, I)).astype(np.float32)
    args = jnp.asarray(x), jnp.asarray(experts), jnp.asarray(blocks), jnp.asarray(scales)
    assert (cpu_kernels.MXFP4_TARGET in jax.jit(cpu_kernels.mxfp4_matvec).lower(*args).as_text()) == kernel
    product = jax.jit(cpu_kernels.mxfp4_matvec)

    many = np.array([3] * 10 + [1, 3, 0])  # an expert's rows shared by 11 assignments
    x_many = rng.normal(size=(len(many), I)).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
      for xs, es in ((x, experts), (x_many, many)):
        xs = jnp.asarray(xs, dtype)
        assert_mxfp4_product(product(xs, jnp.asarray(es), *args[2:]), xs, es, w, rounds and dtype == jnp.bfloat16)
    # bfloat16 values within a factor 128 in every block: as exact as float32 sums
    exact = jnp.asarray(np.sign(x) * np.clip(np.abs(x), 1 / 16, 7.9), jnp.bfloat16)
    assert_mxfp4_product(product(exact, *args[1:]), exact, experts, w, rounded=False)
    for dtype in (jnp.float32, jnp.bfloat16):  # a NaN stays its assignment's, as in float sums
      nan = np.array(x)
      nan[1, 40] = np.nan
      nan = jnp.asarray(nan, dtype)
      assert_mxfp4_product(product(nan, *args[1:]), nan, experts, w, rounds and dtype == jnp.bfloat16)
    dy = rng.normal(size=(A, O)).astype(np.float32)  # the input gradient: W[experts[a]]^T dy[a]
    grad = jax.vjp(lambda x: cpu_kernels.mxfp4_matvec(x, *args[1:]), args[0])[1](jnp.asarray(dy))[0]
    finite = np.nan_to_num(w[experts].astype(np.float64))
    want_grad = np.einsum("ao,aoi->ai", dy.astype(np.float64), finite)
    has_nan = np.isnan(w[experts]).any(axis=(1, 2))  # a NaN weight makes its assignment's gradient NaN
    np.testing.assert_allclose(np.asarray(grad)[~has_nan], want_grad[~has_nan], rtol=1e-4,
                               atol=1e-5 * np.abs(want_grad).max())
    outside = jnp.asarray([-1, E, E + 7, 0, -3, 2])  # clamped on both paths: as experts [0, E-1, E-1, 0, 0, 2]
    np.testing.assert_array_equal(product(args[0], outside, *args[2:]),
                                  product(args[0], jnp.asarray([0, 4, 4, 0, 0, 2]), *args[2:]))
  finally:
    cpu_kernels.available.cache_clear()
    jax.clear_caches()


BUILT_AS = """
import sys
import jax.numpy as jnp
import numpy as np
from gptoss_jax.model import cpu_kernels
if not cpu_kernels.available():
  sys.exit(3)
case = np.load(sys.argv[1])
args = [case[k] for k in ("experts", "blocks", "scales")]
np.savez(sys.argv[2], **{dtype: np.asarray(cpu_kernels.mxfp4_matvec(jnp.asarray(case["x"], dtype), *args))
                         for dtype in ("float32", "bfloat16")})
"""


@pytest.mark.parametrize("build, rounds", [("plain", False), ("avx2", True)])
def test_mxfp4_matvec_on_every_instruction_set(rng, tmp_path, build, rounds):
  """The kernel as other x86-64 CPUs build it (GPTOSS_JAX_KERNELS=plain or avx2: flags that turn the newer
  instructions off): the C++ loop of CPUs without AVX2 (float32 sums for any input) and the AVX2 one of CPUs
  without AVX-512 (bfloat16 inputs rounded to 16-bit integers), which instruction_set() names,
  for the same case as above: an expert's rows shared by several assignments, the scales' extremes, blocks
  in groups, a pair and an unpaired one. In its own process: a process registers one build of the kernels."""
  if machine() not in ("x86_64", "AMD64"):
    pytest.skip("x86-64 flags")
  if build == "avx2" and "avx2" not in Path("/proc/cpuinfo").read_text():
    pytest.skip("no AVX2 here")
  blocks, scales, w = packed_experts(rng)
  experts = np.array([3] * 6 + [1, 0, 3, 4])
  x = rng.normal(size=(len(experts), w.shape[2])).astype(np.float32)
  np.savez(tmp_path / "case.npz", x=x, experts=experts, blocks=blocks, scales=scales)
  out = subprocess.run([sys.executable, "-c", BUILT_AS, str(tmp_path / "case.npz"), str(tmp_path / "y.npz")],
                       capture_output=True, text=True, env=os.environ | {"GPTOSS_JAX_KERNELS": build})
  if out.returncode == 3:
    pytest.skip("the CPU kernels could not be built here (no g++?)")
  assert out.returncode == 0, out.stderr[-2000:]
  y = np.load(tmp_path / "y.npz")
  assert_mxfp4_product(y["float32"], x, experts, w, rounded=False)
  assert_mxfp4_product(y["bfloat16"], np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), experts, w, rounds)


def test_the_instruction_set_named_is_the_one_the_compiler_builds_for(monkeypatch):
  """cpu_kernels.instruction_set() (what the benchmarks print beside their figures) against the macros g++
  -march=native defines here, which choose the kernel's build in cpu_kernels.cc; GPTOSS_JAX_KERNELS=avx2 and
  plain lower it, and a value it does not know is refused in one line naming it."""
  from gptoss_jax.model import cpu_kernels
  try:
    macros = subprocess.run(["g++", "-march=native", "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True,
                            text=True, check=True).stdout.split()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("no g++ here")
  avx512 = {"__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512VNNI__"} <= set(macros)
  avx2 = {"__AVX2__", "__FMA__"} <= set(macros)
  assert cpu_kernels.instruction_set() == ("AVX-512" if avx512 else "AVX2" if avx2 else "plain C++")
  monkeypatch.setenv("GPTOSS_JAX_KERNELS", "avx2")
  assert cpu_kernels.instruction_set() == ("AVX2" if avx2 else "plain C++")
  monkeypatch.setenv("GPTOSS_JAX_KERNELS", "plain")
  assert cpu_kernels.instruction_set() == "plain C++"
  monkeypatch.setenv("GPTOSS_JAX_KERNELS", "avx512")
  with pytest.raises(ValueError, match="GPTOSS_JAX_KERNELS='avx512': want 1"):
    cpu_kernels.instruction_set()


def test_cpu_kernels_refuse_operands_and_outputs_of_the_wrong_shape(monkeypatch):
  from gptoss_jax.model import cpu_kernels
  monkeypatch.setenv("GPTOSS_JAX_KERNELS", "1")
  cpu_kernels.available.cache_clear()
  try:
    if not cpu_kernels.available():
      pytest.skip("the CPU kernels could not be built here (no g++?)")
    x, e = jnp.zeros((3, 64), jnp.float32), jnp.zeros((3,), jnp.int32)
    blocks, scales = jnp.zeros((2, 5, 2, 16), jnp.uint8), jnp.zeros((2, 5, 2), jnp.uint8)
    def call(target, shape, *args):
      attributes = {"rounded": np.int32(1)} if target == cpu_kernels.MXFP4_TARGET else {}
      return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))(*args, **attributes)

    assert call(cpu_kernels.MXFP4_TARGET, (3, 5), x, e, blocks, scales).shape == (3, 5)
    for target, shape, args, message in [
        (cpu_kernels.MXFP4_TARGET, (3, 6), (x, e, blocks, scales), "want the output [A, O]"),
        (cpu_kernels.MXFP4_TARGET, (3, 5), (x[:, :32], e, blocks, scales), "want x [A, I]"),
        (cpu_kernels.BF16_TARGET, (3, 7), (x, jnp.zeros((64, 8), jnp.bfloat16)), "want the outputs [R, O_j]"),
        (cpu_kernels.BF16_TARGET, (3, 8), (x[:, :10], jnp.zeros((64, 8), jnp.bfloat16)), "want x [R <= 16, I]"),
        (cpu_kernels.BF16_TARGET, (3, 8), (x, jnp.zeros((64, 8), jnp.float32)), "want bfloat16 weights")]:
      with pytest.raises(Exception, match=re.escape(message)):
        jax.block_until_ready(call(target, shape, *args))
  finally:
    cpu_kernels.available.cache_clear()


def test_mxfp4_matches_transformers(rng):
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  import torch
  w = rng.normal(size=(2, 8, 64)).astype(np.float32)  # [E, out, in]
  blocks, scales = mxfp4.quantize(w)
  ref = convert_moe_packed_tensors(torch.from_numpy(np.array(blocks)), torch.from_numpy(np.array(scales)),
                                   dtype=torch.float32)  # [E, in, out]
  np.testing.assert_array_equal(np.swapaxes(np.asarray(mxfp4.dequantize(blocks, scales, jnp.float32)), 1, 2),
                                ref.numpy())


@pytest.mark.parametrize("tokens", [6, 40])
def test_packed_experts_equal_dequantized_weights(rng, tokens):
  packed = MoE(BASE.replace(moe_mxfp4=True), nnx.Rngs(0))
  assert packed.w_in_blocks[...].dtype == jnp.uint8 and not nnx.state(packed, nnx.Param).get("w_in")
  plain = MoE(BASE, nnx.Rngs(0))
  w_in, w_out = packed.expert_weights(jnp.float32)
  plain.w_in[...], plain.w_out[...] = w_in, w_out
  plain.router_w[...], plain.router_b[...] = packed.router_w[...], packed.router_b[...]
  x = jnp.asarray(rng.normal(size=(2, tokens, 32)), jnp.float32)
  np.testing.assert_allclose(packed(x)[0], plain(x)[0], rtol=1e-6, atol=1e-7)


def test_packed_experts_pass_input_gradients(rng):
  """Packed experts are frozen, but earlier layers still train through them: d(loss)/dx equals that of
  the same experts unpacked."""
  packed = MoE(BASE.replace(moe_mxfp4=True), nnx.Rngs(0))
  plain = MoE(BASE, nnx.Rngs(0))
  plain.w_in[...], plain.w_out[...] = packed.expert_weights(jnp.float32)
  plain.router_w[...], plain.router_b[...] = packed.router_w[...], packed.router_b[...]
  x = jnp.asarray(rng.normal(size=(2, 10, 32)), jnp.float32)
  grad = lambda m: jax.grad(lambda x: jnp.sum(jnp.sin(m(x)[0])))(x)
  np.testing.assert_allclose(grad(packed), grad(plain), rtol=1e-5, atol=1e-6)


def test_selected_experts_equal_the_expert_loop_for_packed_experts(rng):
  """Decoding's path (only the chosen experts gathered and dequantized) against the dropless loop over
  every expert, for a few tokens whose choices overlap (an expert chosen by two tokens) and are disjoint."""
  cfg = BASE.replace(moe_mxfp4=True, moe_dispatch="grouped")
  loop = MoE(cfg, nnx.Rngs(0))
  selected = MoE(cfg.replace(moe_dispatch="selected"), nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(1, 3, 32)), jnp.float32)
  logits = np.asarray(x[0] @ loop.router_w[...] + loop.router_b[...])
  chosen = [set(np.argsort(-row)[:2]) for row in logits]
  assert any(a & b for a, b in zip(chosen, chosen[1:] + chosen[:1]))  # overlapping choices
  assert any(not a & b for a, b in zip(chosen, chosen[1:] + chosen[:1]))  # and disjoint ones
  np.testing.assert_allclose(selected(x)[0], loop(x)[0], rtol=1e-5, atol=1e-6)


def test_auto_dispatch_gathers_the_chosen_experts_only_for_few_tokens():
  cfg = BASE.replace(n_experts=32, top_k=4)  # gpt-oss-20b's routing
  assert resolved_dispatch(cfg, 1) == "selected" and resolved_dispatch(cfg, 7) == "selected"
  assert resolved_dispatch(cfg, 8) == "grouped"  # as many assignments as experts: the loop, on CPU
  assert resolved_dispatch(cfg.replace(moe_capacity_factor=1.0), 1) == "capacity"  # the buckets, not the loop
  assert resolved_dispatch(cfg.replace(moe_capacity_factor=1.0, moe_dispatch="grouped"), 64) == "capacity"
  from gptoss_jax.model import cpu_kernels
  from gptoss_jax.model.moe import PACKED_SELECTED_MAX
  packed, kernel = cfg.replace(moe_mxfp4=True), cpu_kernels.available()  # prefill pieces too, with the kernel
  assert resolved_dispatch(packed, PACKED_SELECTED_MAX // 4) == ("selected" if kernel else "grouped")
  assert resolved_dispatch(packed, PACKED_SELECTED_MAX // 4 + 1) == "grouped"


def test_auto_dispatch_follows_the_platform_whose_program_is_built():
  """The platform is the config's, not the process's: a CPU process builds a GPU's or TPU's choices."""
  cfg = BASE.replace(n_experts=32, top_k=4)
  for platform, expected in (("cpu", "grouped"), ("gpu", "blocked"), ("tpu", "gmm")):
    assert resolved_dispatch(cfg.replace(platform=platform), 1024) == expected
    assert resolved_dispatch(cfg.replace(platform=platform), 7) == "selected"  # decoding
    assert resolved_dispatch(cfg.replace(platform=platform, moe_mxfp4=True), 4096) == "grouped"  # one expert unpacked
  assert resolved_dispatch(cfg.replace(platform="tpu"), 511) == "blocked"  # tiles of 16 rows: over a quarter load
  assert resolved_dispatch(cfg, 64) == ("grouped" if jax.default_backend() == "cpu" else "blocked")  # auto


@pytest.mark.parametrize("n_experts, top_k", [(4, 1), (8, 2), (32, 4), (64, 4)])
def test_blocked_rows_stay_within_a_quarter_more_than_the_assignments(n_experts, top_k):
  """The experts sweep's routings at every token count from 1 to 20,000: the blocks' static row count over
  the assignments, and `gmm`'s most tiles over them where `auto` takes it; and the rows always hold the worst
  routing (each expert's count padded to the block, the padding placed where it costs most)."""
  cfg = BASE.replace(n_experts=n_experts, top_k=top_k)
  worst = 0.0
  for tokens in list(range(1, 2000)) + list(range(2000, 20000, 97)):
    b, assignments = block_rows(cfg, tokens), tokens * top_k
    rows = padded_rows(assignments, n_experts, b)
    worst = max(worst, rows / assignments)
    if assignments >= n_experts:  # the most padding: every expert but one with a single assignment
      assert rows >= (n_experts - 1) * b + -(-(assignments - n_experts + 1) // b) * b
    if b >= GMM_ROWS_MIN:  # `gmm` on TPU: its rows rounded up to a tile, and a tile more per expert boundary
      worst = max(worst, (-(-assignments // b) * b + (n_experts - 1) * b) / assignments)
  assert 1.0 <= worst <= 1.25, worst


def test_a_bfloat16_models_packed_products_may_round_their_inputs():
  """A model computing in bfloat16 lets the CPU kernel multiply its (float32 copies of) activations as 16-bit
  integers; a float32 model gets float32 products."""
  from gptoss_jax.config_files import load_config_file
  from gptoss_jax.model import Transformer, cpu_kernels
  if not cpu_kernels.available():
    pytest.skip("the CPU kernels could not be built here (no g++?)")
  for dtype, rounded in (("bfloat16", 1), ("float32", 0)):
    cfg = ModelConfig.from_dict(load_config_file("gpt_oss:tiny").model).replace(moe_mxfp4=True, dtype=dtype)
    text = jax.jit(lambda m, t: m(t)).lower(Transformer(cfg, nnx.Rngs(0)), jnp.zeros((1, 1), jnp.int32)).as_text()
    calls = [line for line in text.splitlines() if cpu_kernels.MXFP4_TARGET in line]
    assert calls and all(f"rounded = {rounded} : i32" in line for line in calls)

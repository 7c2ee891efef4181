"""Model-core speed, measured side by side in one run (CPU by default; any JAX backend works).

(a) forward+backward of one MoE layer at 8, 32 and 64 experts, top_k fixed: grouped dispatch
    (the default; dropless, and with a capacity factor) against the all-experts dense path and ragged_dot.
(b) forward+backward of one sliding-window attention layer (blockwise kernel) against a full causal
    layer at sequence 4096, window 128.

  python benchmarks/model_core.py [--tokens 4096] [--repeats 5]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import ModelConfig
from gptoss_jax.model.attention import Attention
from gptoss_jax.model.moe import MoE


def time_fwd_bwd(module, x, *extra, repeats: int) -> float:
  """Median seconds of one jitted forward+backward (gradients w.r.t. parameters and input)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  @jax.jit
  def step(params, x):
    def loss(params, x):
      return jnp.mean(jnp.square(nnx.merge(graphdef, params, rest)(x, *extra)[0]))
    return jax.grad(loss, argnums=(0, 1))(params, x)

  jax.block_until_ready(step(params, x))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_moe(tokens: int, repeats: int) -> None:
  print(f"(a) MoE layer fwd+bwd: {tokens} tokens, d_model 256, d_expert 256, top_k 2, clamped SwiGLU")
  x = jax.random.normal(jax.random.key(0), (1, tokens, 256))
  results = {}
  variants = {"grouped, dropless": ("grouped", 0.0), "grouped, capacity 2": ("grouped", 2.0),
              "dense (all experts)": ("dense", 0.0), "ragged_dot": ("ragged", 0.0)}
  for name, (dispatch, capacity) in variants.items():
    for experts in (8, 32, 64):
      cfg = ModelConfig(d_model=256, n_experts=experts, top_k=2, d_expert=256, ffn="clamped_swiglu", ffn_bias=True,
                        router_bias=True, moe_dispatch=dispatch, moe_capacity_factor=capacity)
      results[name, experts] = time_fwd_bwd(MoE(cfg, nnx.Rngs(0)), x, repeats=repeats)
    base = results[name, 8]
    row = "  ".join(f"{e:>2} exp {results[name, e] * 1e3:7.1f} ms ({results[name, e] / base:4.2f}x)"
                    for e in (8, 32, 64))
    print(f"  {name:<20} {row}", flush=True)


def bench_attention(seq: int, window: int, repeats: int) -> None:
  print(f"(b) attention layer fwd+bwd: sequence {seq}, window {window}, 8 heads x 64, 2 kv heads, sinks")
  cfg = ModelConfig(d_model=512, n_heads=8, n_kv_heads=2, head_dim=64, attn_sinks=True, sliding_window=window,
                    qkv_bias=True, out_bias=True)
  x = jax.random.normal(jax.random.key(0), (1, seq, 512))
  positions = jnp.arange(seq)[None]
  full = time_fwd_bwd(Attention(cfg, False, nnx.Rngs(0)), x, positions, repeats=repeats)
  sliding = time_fwd_bwd(Attention(cfg, True, nnx.Rngs(0)), x, positions, repeats=repeats)
  print(f"  full causal {full * 1e3:8.1f} ms   sliding (blockwise) {sliding * 1e3:8.1f} ms   "
        f"ratio {sliding / full:.3f}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--window", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}")
  bench_moe(args.tokens, args.repeats)
  bench_attention(args.seq, args.window, args.repeats)

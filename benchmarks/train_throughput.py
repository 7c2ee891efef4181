"""Train-step throughput of gptoss_jax against Hugging Face transformers (PyTorch), side by side in one run,
on the same tiny shapes and precision (float32, CPU by default): a GPT-2-shaped dense model and a
gpt-oss-shaped MoE model at 8 and 32 experts. Each step is forward + backward + AdamW update.

  python benchmarks/train_throughput.py [--steps 10] [--batch 8] [--seq 256] [--only jax|torch]

MFU uses the FLOPs per token of `gptoss_jax.inspect` over the measured float32 matmul rate of the
device (CPU has no published peak); it is the same yardstick for both frameworks. The process runs as the
training command does (`reuse_step_memory`: host memory kept between steps), for both frameworks.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

VOCAB, D, LAYERS, HEADS = 256, 384, 6, 6


def jax_configs(experts: int | None):
  from gptoss_jax import ModelConfig
  if experts is None:  # GPT-2 shape
    return ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=HEADS, head_dim=D // HEADS,
                       d_ff=4 * D, max_seq_len=1024, norm="layernorm", position="learned", ffn="gelu", ffn_bias=True,
                       qkv_bias=True, out_bias=True, tie_embeddings=True)
  return ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=2, head_dim=64, d_ff=D,
                     max_seq_len=1024, norm="rmsnorm", position="yarn", rope_theta=150000.0, rope_factor=32.0,
                     rope_original_max_len=4096, yarn_truncate=False, ffn="clamped_swiglu", ffn_bias=True,
                     qkv_bias=True, out_bias=True, attn_sinks=True, sliding_window=128, n_experts=experts, top_k=2,
                     d_expert=D, router_bias=True)


def hf_model(experts: int | None):
  import torch
  import transformers
  if experts is None:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  else:
    cfg = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=D, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, num_key_value_heads=2, head_dim=64,
                                    num_local_experts=experts, num_experts_per_tok=2, sliding_window=128,
                                    max_position_embeddings=1024)
  return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def time_jax(cfg, batch, seq, steps) -> float:
  import jax
  from gptoss_jax.sharding import make_mesh
  from gptoss_jax.train.config import run_config
  from gptoss_jax.train.step import Trainer
  t = run_config(cfg.to_dict()).train
  t.warmup_steps, t.steps = 1, 1000
  trainer = Trainer(cfg, t, make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}, jax.devices()[:1]))
  state = trainer.init_state()
  tokens = trainer.global_batch(np.random.default_rng(0).integers(0, VOCAB, (batch, seq + 1)).astype(np.int32))
  for _ in range(2):  # compile, warm up
    state, metrics = trainer.train_step(state, tokens)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = trainer.train_step(state, tokens)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps


def time_torch(experts, batch, seq, steps) -> float:
  import torch
  torch.manual_seed(0)
  model = hf_model(experts).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  tokens = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, (batch, seq + 1)))

  def step():
    loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - start) / steps


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--only", choices=("jax", "torch"), default=None)
  args = parser.parse_args()
  from gptoss_jax.train.step import reuse_step_memory
  reuse_step_memory()  # as `python -m gptoss_jax.train` does, before JAX starts
  import jax
  import torch
  from gptoss_jax.inspect import stats
  from gptoss_jax.train.metrics import measured_matmul_flops
  torch.set_num_threads(os.cpu_count())
  peak = measured_matmul_flops()
  tokens = args.batch * args.seq
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} threads; float32; batch {args.batch} x seq {args.seq}; "
        f"measured matmul rate {peak / 1e9:.0f} GFLOP/s (the MFU yardstick)")
  print(f"{'model':<22}{'framework':<16}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}")
  for name, experts in (("gpt2-shaped dense", None), ("gpt-oss-shaped 8 exp", 8), ("gpt-oss-shaped 32 exp", 32)):
    cfg = jax_configs(experts)
    flops = stats(cfg, args.seq).train_flops_per_token
    for framework in ("gptoss_jax", "transformers"):
      if args.only and framework != {"jax": "gptoss_jax", "torch": "transformers"}[args.only]:
        continue
      dt = (time_jax(cfg, args.batch, args.seq, args.steps) if framework == "gptoss_jax"
            else time_torch(experts, args.batch, args.seq, args.steps))
      print(f"{name:<22}{framework:<16}{dt * 1e3:>10.0f}{tokens / dt:>12,.0f}{tokens / dt * flops / peak:>8.1%}",
            flush=True)

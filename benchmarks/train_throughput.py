"""Train-step throughput of gptoss_jax against Hugging Face transformers (PyTorch), side by side in one run,
on the same tiny shapes and precision (float32, CPU by default): a GPT-2-shaped dense model and a
gpt-oss-shaped MoE model at 8 and 32 experts. Each step is forward + backward + AdamW update.

  python benchmarks/train_throughput.py [--steps 4] [--rounds 5] [--batch 8] [--seq 256] [--only jax|torch]

MFU uses the FLOPs per token of `gptoss_jax.inspect` over the measured float32 matmul rate of the
device (CPU has no published peak); it is the same yardstick for both frameworks. Each model and framework
runs in a fresh process of its own (in one process, each framework slowed the other: their heaps and thread
pools mix), as the training command does (`reuse_step_memory`: host memory kept between steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

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


def jax_steps(cfg, batch, seq) -> Callable[[int], None]:
  """Compiles and warms up a train step; returns run(n), which takes n steps."""
  import jax
  from gptoss_jax.sharding import make_mesh
  from gptoss_jax.config import TrainConfig
  from gptoss_jax.train.step import Trainer
  t = TrainConfig(warmup_steps=1, steps=1000)
  trainer = Trainer(cfg, t, make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}, jax.devices()[:1]))
  state = trainer.init_state()
  tokens = trainer.global_batch(np.random.default_rng(0).integers(0, VOCAB, (batch, seq + 1)).astype(np.int32))

  def run(n: int) -> None:
    nonlocal state
    for _ in range(n):
      state, metrics = trainer.train_step(state, tokens)
    jax.block_until_ready(metrics)

  run(3)  # compile, warm up
  return run


def torch_steps(experts, batch, seq) -> Callable[[int], None]:
  import torch
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model = hf_model(experts).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  tokens = torch.from_numpy(np.random.default_rng(0).integers(0, VOCAB, (batch, seq + 1)))

  def run(n: int) -> None:
    for _ in range(n):
      loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)

  run(3)
  return run


def step_seconds(run: Callable[[int], None], steps: int) -> float:
  start = time.perf_counter()
  run(steps)
  return (time.perf_counter() - start) / steps


MODELS = {"gpt2-shaped dense": None, "gpt-oss-shaped 8 exp": 8, "gpt-oss-shaped 32 exp": 32}
FRAMEWORKS = {"gptoss_jax": "jax", "transformers": "torch"}


def measure(name: str, framework: str, args) -> list[float]:
  """Step seconds of one model under one framework, one value per round (run in a process of its own)."""
  from gptoss_jax import runtime
  runtime.configure()  # as `python -m gptoss_jax.train` does, before JAX starts
  runtime.reuse_step_memory()
  experts = MODELS[name]
  run = (jax_steps(jax_configs(experts), args.batch, args.seq) if framework == "gptoss_jax"
         else torch_steps(experts, args.batch, args.seq))
  return [step_seconds(run, args.steps) for _ in range(args.rounds)]


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=4, help="steps per timing round")
  parser.add_argument("--rounds", type=int, default=5, help="timing rounds; the median is reported")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--only", choices=tuple(FRAMEWORKS.values()), default=None)
  parser.add_argument("--worker", nargs=2, metavar=("MODEL", "FRAMEWORK"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  for k in ("steps", "rounds", "batch", "seq"):
    if getattr(args, k) < 1:
      parser.error(f"--{k} must be at least 1, got {getattr(args, k)}")
  if args.worker:
    print(json.dumps(measure(*args.worker, args)))
    sys.exit()
  import jax
  from gptoss_jax.inspect import stats
  from gptoss_jax.train.metrics import measured_matmul_flops
  peak = measured_matmul_flops()
  tokens = args.batch * args.seq
  frameworks = [f for f, short in FRAMEWORKS.items() if args.only in (None, short)]
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} threads; float32; batch {args.batch} x seq {args.seq}; "
        f"measured matmul rate {peak / 1e9:.0f} GFLOP/s (the MFU yardstick); each model and framework in a "
        f"process of its own, median of {args.rounds} rounds of {args.steps} steps")
  print(f"{'model':<22}{'framework':<16}{'step ms':>10}{'range':>14}{'tokens/s':>12}{'MFU':>8}")
  medians: dict[tuple[str, str], float] = {}
  for name, experts in MODELS.items():
    flops = stats(jax_configs(experts), args.seq).train_flops_per_token
    for f in frameworks:
      worker = subprocess.run([sys.executable, __file__, "--worker", name, f] + [
          f"--{k}={getattr(args, k)}" for k in ("steps", "rounds", "batch", "seq")],
          capture_output=True, text=True)
      if worker.returncode:
        sys.exit(f"{name} under {f} failed:\n{worker.stderr[-3000:]}")
      times = json.loads(worker.stdout.strip().splitlines()[-1])
      dt = medians[name, f] = float(np.median(times))
      spread = f"{min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}"
      print(f"{name:<22}{f:<16}{dt * 1e3:>10.0f}{spread:>14}{tokens / dt:>12,.0f}{tokens / dt * flops / peak:>8.1%}",
            flush=True)
  if len(frameworks) == 2:
    print("speed-up over transformers (its step time / ours): " + ", ".join(
        f"{name} {medians[name, 'transformers'] / medians[name, 'gptoss_jax']:.2f}x" for name in MODELS))
  print("step growth from 8 to 32 experts: " + ", ".join(
      f"{f} {medians['gpt-oss-shaped 32 exp', f] / medians['gpt-oss-shaped 8 exp', f]:.2f}x" for f in frameworks))

"""Peak host memory of converting and running a gpt-oss-shaped MXFP4 checkpoint (gpt-oss-20b's real widths,
fewer layers, random weights) with experts kept packed (--keep-mxfp4) against dequantized to bfloat16.

  python benchmarks/mxfp4_memory.py [--layers 2 4] [--workdir /tmp/mxfp4_memory]

For each layer count: build the Hugging Face folder (hub layout: *_blocks / *_scales experts), then in a
fresh process each: convert (peak RSS); then load the converted checkpoint, compile and run one jitted
forward pass of 128 tokens (as evaluate and generate run it), with the peak RSS of each step (Linux). The
per-layer slope extrapolates to 24 layers, next to XLA's memory analysis of the 24-layer forward (compiled
from abstract shapes) and `inspect`'s weight-memory figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

D, E, I, N, K, H, V = 2880, 32, 2880, 64, 8, 64, 201088
TOKENS = 128


def build_folder(folder: Path, layers: int) -> int:
  import ml_dtypes
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  bf16 = lambda *shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  folder.mkdir(parents=True, exist_ok=True)
  files = []
  shared = {"model.embed_tokens.weight": bf16(V, D), "lm_head.weight": bf16(V, D),
            "model.norm.weight": np.ones(D, ml_dtypes.bfloat16)}
  files.append(("model-shared.safetensors", shared))
  for i in range(layers):  # one file per layer, as the hub shards are: never all tensors in memory at once
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    t = {p + "input_layernorm.weight": np.ones(D, ml_dtypes.bfloat16),
         p + "post_attention_layernorm.weight": np.ones(D, ml_dtypes.bfloat16),
         a + "q_proj.weight": bf16(N * H, D), a + "q_proj.bias": bf16(N * H),
         a + "k_proj.weight": bf16(K * H, D), a + "k_proj.bias": bf16(K * H),
         a + "v_proj.weight": bf16(K * H, D), a + "v_proj.bias": bf16(K * H),
         a + "o_proj.weight": bf16(D, N * H), a + "o_proj.bias": bf16(D), a + "sinks": bf16(N),
         p + "mlp.router.weight": bf16(E, D), p + "mlp.router.bias": bf16(E),
         p + "mlp.experts.gate_up_proj_blocks": rng.integers(0, 256, (E, 2 * I, D // 32, 16), dtype=np.uint8),
         p + "mlp.experts.gate_up_proj_scales": rng.integers(118, 124, (E, 2 * I, D // 32), dtype=np.uint8),
         p + "mlp.experts.gate_up_proj_bias": bf16(E, 2 * I),
         p + "mlp.experts.down_proj_blocks": rng.integers(0, 256, (E, D, I // 32, 16), dtype=np.uint8),
         p + "mlp.experts.down_proj_scales": rng.integers(118, 124, (E, D, I // 32), dtype=np.uint8),
         p + "mlp.experts.down_proj_bias": bf16(E, D)}
    files.append((f"model-layer{i:02d}.safetensors", t))
  weight_map = {}
  for name, tensors in files:
    save_file(tensors, folder / name)
    weight_map |= {k: name for k in tensors}
  (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  config = {"model_type": "gpt_oss", "num_hidden_layers": layers, "num_local_experts": E, "num_experts_per_tok": 4,
            "vocab_size": V, "hidden_size": D, "intermediate_size": I, "head_dim": H, "num_attention_heads": N,
            "num_key_value_heads": K, "sliding_window": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
            "attention_bias": True, "tie_word_embeddings": False, "hidden_act": "silu",
            "quantization_config": {"quant_method": "mxfp4"}}
  (folder / "config.json").write_text(json.dumps(config))
  return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# return freed memory to the OS, then (Linux) set the peak RSS to the current RSS
RESET = ("import gc, ctypes; gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0); "
         "open('/proc/self/clear_refs', 'w').write('5')")
MARK = "print('PEAK', [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def peak_rss(*steps: str) -> list[int]:
  """Peak RSS (bytes) of each step of code in one fresh process, the peak reset before each step: a
  step's figure is what stayed resident from the steps before plus its own high-water mark."""
  code = "\n".join(f"{RESET}\n{step}\n{MARK}" for step in steps)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(out.stderr[-2000:])
  return [int(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("PEAK")]


def measure(workdir: Path, layers: int) -> dict:
  src = workdir / f"hf-{layers}"
  disk = build_folder(src, layers)
  row = {"layers": layers, "safetensors_gib": disk / 2**30}
  for keep in (True, False):
    dst = workdir / f"ckpt-{layers}-{'mxfp4' if keep else 'bf16'}"
    shutil.rmtree(dst, ignore_errors=True)
    tag = "mxfp4" if keep else "bf16"
    [convert] = peak_rss(
        f"from gptoss_jax import runtime; runtime.configure()\n"
        f"from gptoss_jax.convert.__main__ import convert; convert({str(src)!r}, {str(dst)!r}, 'bfloat16', {keep}, False)")
    load, compile_, run = peak_rss(
        f"from gptoss_jax import runtime; runtime.configure()\n"
        f"import jax, jax.numpy as jnp\nfrom gptoss_jax.weights import load_model\n"
        f"_, _, m = load_model({str(dst)!r})\ntokens = jnp.zeros((1, {TOKENS}), jnp.int32)",
        "forward = jax.jit(lambda m, t: m(t)).lower(m, tokens).compile()",
        "forward(m, tokens).block_until_ready()")
    row |= {f"convert_{tag}": convert / 2**30, f"load_{tag}": load / 2**30, f"compile_{tag}": compile_ / 2**30,
            f"forward_{tag}": run / 2**30}
    shutil.rmtree(dst)
  shutil.rmtree(src)
  return row


def compiled_memory(layers: int) -> dict:
  """XLA's memory analysis of the jitted forward of gpt-oss-20b (packed experts, bfloat16) at `layers`
  layers, compiled from abstract shapes: nothing is allocated, so the full 24 layers fit on any machine."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from gptoss_jax.config_files import model_config_from_file
  from gptoss_jax.model import Transformer, rngs
  cfg = model_config_from_file(str(Path(__file__).parent.parent / "configs/gpt_oss.py:20b")).replace(
      n_layers=layers, moe_mxfp4=True, param_dtype="bfloat16", dtype="bfloat16")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs())))
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  tokens = jax.ShapeDtypeStruct((1, TOKENS), jnp.int32)
  m = forward.lower(state, tokens).compile().memory_analysis()
  return {"layers": layers, "arguments_gib": m.argument_size_in_bytes / 2**30,
          "temporaries_gib": m.temp_size_in_bytes / 2**30, "output_gib": m.output_size_in_bytes / 2**30}


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()  # the compiled-memory analysis below runs in this process
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
  parser.add_argument("--compiled-layers", type=int, nargs="*", default=[4, 24])
  parser.add_argument("--workdir", default="/tmp/mxfp4_memory")
  args = parser.parse_args()
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = [measure(workdir, n) for n in args.layers]
  print(f"measured peak RSS (GiB), fresh process each; forward of {TOKENS} tokens, jitted: loading the checkpoint, "
        "compiling, running (each step's peak: what stays resident plus the step's own high-water mark)")
  print(f"{'':>6} {'':>6} | {'MXFP4 experts':^33} | {'bf16 experts':^33}")
  print(f"{'layers':>6} {'files':>6} | " + " | ".join(f"{'convert':>7} {'load':>7} {'compile':>8} {'forward':>8}"
                                                     for _ in range(2)))
  for r in rows:
    print(f"{r['layers']:>6} {r['safetensors_gib']:>6.2f} | " + " | ".join(
        f"{r[f'convert_{t}']:>7.2f} {r[f'load_{t}']:>7.2f} {r[f'compile_{t}']:>8.2f} {r[f'forward_{t}']:>8.2f}"
        for t in ("mxfp4", "bf16")))
  if len(rows) >= 2:
    a, b = rows[0], rows[-1]
    for tag in ("mxfp4", "bf16"):
      slope = (b[f"forward_{tag}"] - a[f"forward_{tag}"]) / (b["layers"] - a["layers"])
      at24 = a[f"forward_{tag}"] + slope * (24 - a["layers"])
      print(f"forward peak extrapolated to 24 layers ({tag}): {at24:.1f} GiB ({slope:.2f} GiB per layer)")
  for n in args.compiled_layers:
    m = compiled_memory(n)
    print(f"compiled forward, {n} layers (XLA memory analysis): arguments {m['arguments_gib']:.2f} GiB + "
          f"temporaries {m['temporaries_gib']:.2f} GiB + output {m['output_gib']:.2f} GiB = "
          f"{sum(m[k] for k in ('arguments_gib', 'temporaries_gib', 'output_gib')):.2f} GiB")
  from gptoss_jax.config_files import model_config_from_file
  from gptoss_jax.inspect import stats
  s = stats(model_config_from_file(str(Path(__file__).parent.parent / "configs/gpt_oss.py:20b")))
  print(f"inspect, gpt-oss-20b weights: {s.weight_bytes_mxfp4 / 2**30:.2f} GiB with MXFP4 experts, "
        f"{s.weight_bytes_bf16 / 2**30:.2f} GiB in bf16")

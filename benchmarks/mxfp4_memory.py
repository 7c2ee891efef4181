"""Peak host memory of converting and running a gpt-oss-shaped MXFP4 checkpoint (gpt-oss-20b's real widths,
fewer layers, random weights) with experts kept packed (--keep-mxfp4) against dequantized to bfloat16.

  python benchmarks/mxfp4_memory.py [--layers 2 4] [--workdir /tmp/mxfp4_memory]

For each layer count: build the Hugging Face folder (hub layout: *_blocks / *_scales experts), then in a
fresh process each: convert (peak RSS), and load the converted checkpoint + one forward pass of 128 tokens
(jitted, as evaluate and generate run it; peak RSS). The per-layer slope extrapolates to 24 layers, next to `inspect`'s weight-memory figures.
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


PEAK = "import resource; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"


def peak_rss(code: str) -> int:
  out = subprocess.run([sys.executable, "-c", code + "\n" + PEAK], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(out.stderr[-2000:])
  return int(out.stdout.split("PEAK")[-1])


def measure(workdir: Path, layers: int) -> dict:
  src = workdir / f"hf-{layers}"
  disk = build_folder(src, layers)
  row = {"layers": layers, "safetensors_gib": disk / 2**30}
  for keep in (True, False):
    dst = workdir / f"ckpt-{layers}-{'mxfp4' if keep else 'bf16'}"
    shutil.rmtree(dst, ignore_errors=True)
    tag = "mxfp4" if keep else "bf16"
    row[f"convert_peak_gib_{tag}"] = peak_rss(
        f"from gptoss_jax.convert.__main__ import convert; convert({str(src)!r}, {str(dst)!r}, 'bfloat16', {keep}, False)"
    ) / 2**30
    row[f"forward_peak_gib_{tag}"] = peak_rss(
        "import jax, jax.numpy as jnp\nfrom gptoss_jax.train.checkpoint import load_model\n"
        f"_, _, m = load_model({str(dst)!r})\n"
        "jax.jit(lambda m, t: m(t))(m, jnp.zeros((1, 128), jnp.int32)).block_until_ready()") / 2**30
    shutil.rmtree(dst)
  shutil.rmtree(src)
  return row


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
  parser.add_argument("--workdir", default="/tmp/mxfp4_memory")
  args = parser.parse_args()
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = [measure(workdir, n) for n in args.layers]
  print(f"{'layers':>6} {'files GiB':>10} {'convert MXFP4':>14} {'convert bf16':>13} {'forward MXFP4':>14} "
        f"{'forward bf16':>13}")
  for r in rows:
    print(f"{r['layers']:>6} {r['safetensors_gib']:>10.2f} {r['convert_peak_gib_mxfp4']:>14.2f} "
          f"{r['convert_peak_gib_bf16']:>13.2f} {r['forward_peak_gib_mxfp4']:>14.2f} {r['forward_peak_gib_bf16']:>13.2f}")
  if len(rows) >= 2:
    a, b = rows[0], rows[-1]
    for tag in ("mxfp4", "bf16"):
      slope = (b[f"forward_peak_gib_{tag}"] - a[f"forward_peak_gib_{tag}"]) / (b["layers"] - a["layers"])
      at24 = a[f"forward_peak_gib_{tag}"] + slope * (24 - a["layers"])
      print(f"forward peak extrapolated to 24 layers ({tag}): {at24:.1f} GiB ({slope:.2f} GiB per layer)")
  from gptoss_jax.config import model_config_from_file
  from gptoss_jax.inspect import stats
  s = stats(model_config_from_file(str(Path(__file__).parent.parent / "configs/gpt_oss.py:20b")))
  print(f"inspect, gpt-oss-20b weights: {s.weight_bytes_mxfp4 / 2**30:.2f} GiB with MXFP4 experts, "
        f"{s.weight_bytes_bf16 / 2**30:.2f} GiB in bf16")

"""Decoding speed of gpt-oss-20b's shape with packed MXFP4 experts (random weights of the real widths,
fewer layers), next to the memory-bandwidth limit measured on the same machine; prefill and evaluation
next to the compute limit.

  python benchmarks/decode_speed.py [--layers 2 4 24] [--prompt 64] [--new 16] [--eval-window 512]
                                    [--workdir /tmp/decode_speed]

For each layer count, in fresh processes: random weights of the real shapes (bfloat16, experts packed as
`convert --keep-mxfp4` keeps them) saved as a conversion is (weights.save_model); then, as `generate` runs
(runtime.configure and reuse_step_memory): load, a greedy generation after a random prompt (its prefill and
decode timed with their first compilations, and the whole call: new tokens over its wall time), the same
again compiled (prefill tokens/s, decode tokens/s), `evaluate`'s loss over one window of --eval-window
tokens (first and compiled; 0 skips it), and the peak RSS. The bandwidth limit: the bytes one decoded token
must read (every dense weight, its 4 experts of 32 packed, one embedding row) against a plain streaming read
of that many bytes on both cores. The compute limit, as benchmarks/harness_speed.py's: XLA's float32 matmul
rate (train.metrics.measured_matmul_flops) over 2 x the active parameters per token (inspect.stats: every
weight but the embedding table, 4 of the 32 experts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIG = "gpt_oss:20b"


def cpu_name() -> str:
  """The CPU's model name and which build of the kernels it gets (its instruction set)."""
  import platform
  from gptoss_jax.model import cpu_kernels
  name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
              platform.machine())
  return f"{name}, kernels: {cpu_kernels.instruction_set()}"


def model_config(layers: int):
  from gptoss_jax.config_files import model_config_from_file
  return model_config_from_file(CONFIG).replace(n_layers=layers, moe_mxfp4=True, param_dtype="bfloat16",
                                                dtype="bfloat16", max_seq_len=4096)


def build(folder: str, layers: int) -> None:
  """Random weights of the real shapes, written as a conversion writes them."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from gptoss_jax.config import RunConfig
  from gptoss_jax.config_files import load_config_file
  from gptoss_jax.model import Transformer, rngs
  from gptoss_jax.weights import save_model
  cfg = model_config(layers)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs())))
  rng = np.random.default_rng(0)

  def fill(path, v):
    name = "/".join(map(str, path))
    if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    if v.dtype == jnp.uint8:  # packed experts: any FP4 codes, scales around gpt-oss's (2**-9 .. 2**-4)
      low, high = (118, 124) if "scales" in name else (0, 256)
      return jnp.asarray(rng.integers(low, high, v.shape, dtype=np.uint8))
    if jnp.issubdtype(v.dtype, jnp.floating):
      return jnp.asarray((rng.standard_normal(v.shape, np.float32) * 0.02).astype(v.dtype))
    return jnp.zeros(v.shape, v.dtype)

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
  config = load_config_file(CONFIG)
  config.model = cfg.to_dict()
  config.data.tokenizer = "byte"  # no vocabulary file needed; the model's own vocabulary stays 201,088
  save_model(folder, RunConfig.from_dict(config), model)


def bytes_per_token(model) -> int:
  """What one decoded token reads: every weight, but only top_k / n_experts of the experts and one row of
  the embedding table."""
  from flax import nnx
  from gptoss_jax.model import WEIGHTS
  cfg, total = model.cfg, 0
  for path, var in nnx.to_flat_state(nnx.state(model, WEIGHTS)):
    name, n = "/".join(map(str, path)), var[...].nbytes
    if name.endswith(("w_in_blocks", "w_in_scales", "w_out_blocks", "w_out_scales", "b_in", "b_out")) and "ffn" in name:
      n = n * cfg.top_k // cfg.n_experts
    elif name == "embed":
      n = n // cfg.vocab_size
    total += n
  return total


def stream_bandwidth(n_bytes: int) -> float:
  """Bytes/s of summing an n_bytes float32 array on both cores (numpy releases the GIL), best of 3, in memory
  allocated as the weights are (`aligned_empty`: huge pages where the kernel gives them)."""
  from concurrent.futures import ThreadPoolExecutor
  from gptoss_jax.weights import aligned_empty
  data = aligned_empty((n_bytes // 4,), np.float32)
  data.fill(1)
  halves = np.array_split(data, 2)
  best = float("inf")
  with ThreadPoolExecutor(2) as pool:
    for _ in range(3):
      began = time.perf_counter()
      list(pool.map(np.sum, halves))
      best = min(best, time.perf_counter() - began)
  return n_bytes / best


def measure(folder: str, prompt: int, new: int, eval_window: int) -> None:
  from gptoss_jax import runtime
  runtime.configure()
  runtime.reuse_step_memory()
  import jax
  from gptoss_jax.evaluate import position_nll
  from gptoss_jax.generate import generate
  from gptoss_jax.inspect import stats
  from gptoss_jax.train.metrics import measured_matmul_flops
  from gptoss_jax.weights import load_model
  began = time.perf_counter()
  _, cfg, model = load_model(folder)
  row = {"load_s": time.perf_counter() - began}
  rng = np.random.default_rng(1)
  ids = rng.integers(0, cfg.vocab_size, prompt).tolist()
  for run in ("first", "compiled"):
    timing = {}
    began = time.perf_counter()
    generate(model, ids, new, timing=timing)
    row[f"{run}_generate_tokens_per_s"] = new / (time.perf_counter() - began)
    row[f"{run}_prefill_tokens_per_s"] = prompt / timing["prefill_s"]
    row[f"{run}_decode_tokens_per_s"] = (new - 1) / timing["decode_s"]
  window = rng.integers(0, cfg.vocab_size, (1, eval_window + 1))
  for run in ("first", "compiled") if eval_window else ():
    began = time.perf_counter()
    jax.block_until_ready(position_nll(model, window))
    row[f"{run}_evaluate_tokens_per_s"] = eval_window / (time.perf_counter() - began)
  row["peak_rss_gib"] = peak_rss_gib()
  row["bytes_per_token_gib"] = bytes_per_token(model) / 2**30
  row["compute_limit_tokens_per_s"] = measured_matmul_flops() / (2 * stats(cfg).active_params)
  del model
  row["stream_gib_per_s"] = stream_bandwidth(int(row["bytes_per_token_gib"] * 2**30)) / 2**30
  row["limit_tokens_per_s"] = row["stream_gib_per_s"] / row["bytes_per_token_gib"]
  print("RESULT", json.dumps(row))


def child(*args: str, script: str = __file__) -> dict | None:
  """`script --child ARGS` in a fresh process (each measurement starts from nothing); its RESULT row, if any.
  The other benchmarks that build this shape (decode_profile, harness_speed) run their children through it."""
  out = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.split("RESULT", 1)[1]) if "RESULT" in out.stdout else None


def peak_rss_gib() -> float:
  """This process's peak resident set so far."""
  return [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new", type=int, default=16)
  parser.add_argument("--eval-window", type=int, default=512)
  parser.add_argument("--workdir", default="/tmp/decode_speed")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    kind, folder, *rest = args.child
    build(folder, int(rest[0])) if kind == "build" else measure(folder, *map(int, rest))
    return
  print(f"CPU: {cpu_name()}", flush=True)
  print("layers  load s  prefill tok/s (first / compiled)  decode tok/s (first / compiled)  peak RSS GiB  "
        "GiB/token  stream GiB/s  limit tok/s", flush=True)
  rows = {}
  for layers in args.layers:
    folder = Path(args.workdir) / f"gpt-oss-20b-{layers}-layers"
    shutil.rmtree(folder, ignore_errors=True)
    child("build", str(folder), str(layers))
    rows[layers] = row = child("measure", str(folder), str(args.prompt), str(args.new), str(args.eval_window))
    shutil.rmtree(folder)
    print(f"{layers:6d}  {row['load_s']:6.1f}  {row['first_prefill_tokens_per_s']:13.1f} / "
          f"{row['compiled_prefill_tokens_per_s']:<17.1f}  {row['first_decode_tokens_per_s']:10.2f} / "
          f"{row['compiled_decode_tokens_per_s']:<18.2f}  {row['peak_rss_gib']:12.1f}  {row['bytes_per_token_gib']:9.2f}  "
          f"{row['stream_gib_per_s']:12.1f}  {row['limit_tokens_per_s']:11.1f}", flush=True)
  print(f"\nlayers  decode / limit  generate tok/s, first call (--new {args.new})  "
        f"evaluate tok/s (first / compiled)  compute limit tok/s  prefill / limit  evaluate / limit")
  for layers, row in rows.items():
    limit = row["compute_limit_tokens_per_s"]
    evaluate = row.get("compiled_evaluate_tokens_per_s", float("nan"))
    print(f"{layers:6d}  {row['compiled_decode_tokens_per_s'] / row['limit_tokens_per_s']:14.0%}  "
          f"{row['first_generate_tokens_per_s']:42.2f}  {row.get('first_evaluate_tokens_per_s', float('nan')):16.1f} / "
          f"{evaluate:<15.1f}  {limit:19.1f}  {row['compiled_prefill_tokens_per_s'] / limit:15.0%}  "
          f"{evaluate / limit:16.0%}")


if __name__ == "__main__":
  main()

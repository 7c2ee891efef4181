"""Tokens/s of lm-evaluation-harness log-likelihood scoring (gptoss_jax.lm_eval's model) for the tiny preset and
for gpt-oss-20b's shape (random weights of the real widths, packed MXFP4 experts, as benchmarks/decode_speed.py
builds them), against the compute limit: 2 x active parameters x tokens over the measured matmul rate.

  python benchmarks/harness_speed.py [--shapes tiny 20b] [--layers 24] [--requests 16] [--context 500]
      [--batch-size 4] [--workdir /tmp/harness_speed]

Each shape in fresh processes: built and saved as a conversion (weights.save_model), then loaded as the
harness's model (HarnessModel) and asked `--requests` loglikelihood requests of a `--context`-token context
(at most the model's length) and an 8-token continuation (one bucket length), twice: the first pass with its compilation, the second
compiled. Tokens/s counts the input tokens scored; peak RSS is the process's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import build as build_20b, child, peak_rss_gib  # noqa: E402


def build(folder: str, shape: str, layers: int) -> None:
  if shape == "20b":
    build_20b(folder, layers)
    return
  from flax import nnx
  from gptoss_jax.config import RunConfig
  from gptoss_jax.config_files import load_config_file
  from gptoss_jax.model import Transformer
  from gptoss_jax.weights import save_model
  config = RunConfig.from_dict(load_config_file("gpt_oss:tiny"))
  save_model(folder, config, Transformer(config.model, nnx.Rngs(0)))


def measure(folder: str, requests: int, context: int, batch_size: int) -> None:
  from gptoss_jax import runtime
  runtime.configure()
  runtime.inference_memory()
  from gptoss_jax.inspect import stats
  from gptoss_jax.lm_eval.model import HarnessModel
  from gptoss_jax.train.metrics import measured_matmul_flops
  from gptoss_jax.weights import read_config
  context = min(context, read_config(folder).model.max_seq_len - 8)  # the tiny preset's 256
  began = time.perf_counter()
  model = HarnessModel(ckpt=folder, batch_size=batch_size, max_length=context + 8)
  row = {"load_s": time.perf_counter() - began}
  rng = np.random.default_rng(0)
  pairs = [(rng.integers(0, 256, context).tolist(), rng.integers(0, 256, 8).tolist()) for _ in range(requests)]
  tokens = requests * (context + 7)  # each request's input: its context and continuation but the last token
  for run in ("first", "compiled"):
    began = time.perf_counter()
    model.score_tokens(pairs)
    row[f"{run}_tokens_per_s"] = tokens / (time.perf_counter() - began)
  row["peak_rss_gib"] = peak_rss_gib()
  active = stats(model.cfg, context + 8).active_params
  row["matmul_gflops"] = measured_matmul_flops() / 1e9
  row["limit_tokens_per_s"] = row["matmul_gflops"] * 1e9 / (2 * active)
  print("RESULT", json.dumps(row))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", nargs="+", default=["tiny", "20b"], choices=["tiny", "20b"])
  parser.add_argument("--layers", type=int, default=24, help="layers of the 20b shape")
  parser.add_argument("--requests", type=int, default=16)
  parser.add_argument("--context", type=int, default=500)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--workdir", default="/tmp/harness_speed")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    kind, folder, *rest = args.child
    build(folder, rest[0], int(rest[1])) if kind == "build" else measure(folder, *map(int, rest))
    return
  print("shape         load s  tokens/s (first / compiled)  limit tokens/s  compiled / limit  peak RSS GiB",
        flush=True)
  for shape in args.shapes:
    folder = Path(args.workdir) / shape
    shutil.rmtree(folder, ignore_errors=True)
    child("build", str(folder), shape, str(args.layers), script=__file__)
    row = child("measure", str(folder), str(args.requests), str(args.context), str(args.batch_size), script=__file__)
    shutil.rmtree(folder)
    name = f"{shape} ({args.layers} layers)" if shape == "20b" else shape
    print(f"{name:<13} {row['load_s']:6.1f}  {row['first_tokens_per_s']:10.1f} / {row['compiled_tokens_per_s']:<14.1f}  "
          f"{row['limit_tokens_per_s']:14.1f}  {row['compiled_tokens_per_s'] / row['limit_tokens_per_s']:16.0%}  "
          f"{row['peak_rss_gib']:12.1f}", flush=True)


if __name__ == "__main__":
  main()

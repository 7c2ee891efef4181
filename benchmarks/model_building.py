"""Time to build a model abstractly (nnx.eval_shape: what inspect, conversion, loading and every training's
setup do) with nnx's own random streams against the model's (`gptoss_jax.model.rngs`), which draw the same
keys without writing their count in place.

  python benchmarks/model_building.py [--configs gpt_oss:20b gpt2:tiny] [--layers 4 8 16 24] [--repeats 2]

For each config and layer count: the best of `repeats` builds with each kind of stream, and the ratio.
"""

from __future__ import annotations

import argparse
import time


def build_seconds(cfg, make_rngs, repeats: int) -> float:
  from flax import nnx
  from gptoss_jax.model import Transformer
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    nnx.eval_shape(lambda: Transformer(cfg, make_rngs()))
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", nargs="+", default=["gpt_oss:20b"])
  parser.add_argument("--layers", nargs="+", type=int, default=[4, 8, 16, 24])
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  from flax import nnx
  from gptoss_jax.config_files import model_config_from_file
  from gptoss_jax.model import rngs
  print("| config | layers | nnx.Rngs s | model rngs s | ratio |\n|---|---|---|---|---|")
  for name in args.configs:
    for layers in args.layers:
      cfg = model_config_from_file(name).replace(n_layers=layers)
      theirs = build_seconds(cfg, lambda: nnx.Rngs(0), args.repeats)
      ours = build_seconds(cfg, rngs, args.repeats)
      print(f"| {name} | {layers} | {theirs:.2f} | {ours:.2f} | {theirs / ours:.1f}x |", flush=True)


if __name__ == "__main__":
  main()

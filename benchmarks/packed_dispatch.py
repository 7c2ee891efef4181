"""One gpt-oss-20b MoE layer with packed MXFP4 experts on the CPU (random weights of the real widths: d_model
2880, 32 experts of 2880, top-4), timed for each dispatch over a range of token counts: `selected` (each
(token, expert) assignment through its expert's packed weights, by the CPU kernel) against `grouped` (the
dropless loop: each expert dequantized once, its tokens multiplied in XLA). Where `selected` is faster
decides `moe.PACKED_SELECTED_MAX`, which `auto` follows for prefill pieces and evaluation batches.

  python benchmarks/packed_dispatch.py [--tokens 64 256 512 1024 2048] [--repeats 3]

Each (tokens, dispatch) is compiled once, then run --repeats times; the best time is printed, the two
dispatches interleaved so that a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 512, 1024, 2048])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  from gptoss_jax import runtime
  runtime.configure()
  runtime.reuse_step_memory()
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from gptoss_jax.config_files import model_config_from_file
  from gptoss_jax.model import cpu_kernels
  from gptoss_jax.model.moe import PACKED_SELECTED_MAX, MoE

  base = model_config_from_file("gpt_oss:20b").replace(moe_mxfp4=True, param_dtype="bfloat16", dtype="bfloat16")
  graph, state = nnx.split(nnx.eval_shape(lambda: MoE(base, nnx.Rngs(0))))  # initialising for real takes > 20 GB
  rng = np.random.default_rng(0)

  def fill(path, v):  # any FP4 codes, scales around gpt-oss's (2**-9 .. 2**-4), router and biases at 0.02
    if v.dtype == jnp.uint8:
      low, high = (118, 124) if "scales" in str(path[-1]) else (0, 256)
      return jnp.asarray(rng.integers(low, high, v.shape, dtype=np.uint8))
    return jnp.asarray((rng.standard_normal(v.shape, np.float32) * 0.02).astype(v.dtype))
  layer = nnx.merge(graph, jax.tree_util.tree_map_with_path(fill, state))
  print(f"one gpt-oss-20b MoE layer, packed experts, CPU kernel: {cpu_kernels.available()}; "
        f"PACKED_SELECTED_MAX = {PACKED_SELECTED_MAX} assignments; best of {args.repeats}, seconds", flush=True)
  print(f"{'tokens':>6} {'assignments':>11} {'selected':>9} {'grouped':>8} {'grouped/selected':>16}", flush=True)
  for n in args.tokens:
    x = jax.random.normal(jax.random.key(n), (1, n, base.d_model), jnp.bfloat16)
    steps = {}
    for dispatch in ("selected", "grouped"):
      cfg = base.replace(moe_dispatch=dispatch)
      graph, state = nnx.split(layer)
      forward = jax.jit(lambda state, x, cfg=cfg: _call(graph, state, cfg, x))
      jax.block_until_ready(forward(state, x))  # compile
      steps[dispatch] = (forward, state)
    best = {d: np.inf for d in steps}
    for _ in range(args.repeats):
      for dispatch, (forward, state) in steps.items():
        began = time.perf_counter()
        jax.block_until_ready(forward(state, x))
        best[dispatch] = min(best[dispatch], time.perf_counter() - began)
    print(f"{n:6d} {n * base.top_k:11d} {best['selected']:9.2f} {best['grouped']:8.2f} "
          f"{best['grouped'] / best['selected']:16.2f}", flush=True)


def _call(graph, state, cfg, x):
  """The layer's forward with another dispatch (the config is the module's plain attribute)."""
  from flax import nnx
  layer = nnx.merge(graph, state)
  layer.cfg = cfg
  return layer(x)[0]


if __name__ == "__main__":
  main()

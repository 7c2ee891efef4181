"""One MoE layer's forward+backward per dispatch, at each scale's MoE rung (its experts, top-k and widths), on
whatever backend JAX runs (CPU here; on a GPU or TPU the same command gives that platform's columns).

For each dispatch: milliseconds per step, tokens/s, and the expert matmul FLOPs per token as the backend's XLA
compiles them (gptoss_jax.hlo: ragged_dot as a dense dot over every expert on CPU and CUDA), against the active
ones; the dropless loop's FLOPs follow the routing at run time and cannot be read from the program ("loop").

  python benchmarks/moe_dispatch.py [--tokens 4096] [--dtype float32] [--repeats 3] [--scales tiny,small,gpu]
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from model_core import time_fwd_bwd

from experiments import sweeps
from gptoss_jax import hlo
from gptoss_jax.model.ffn import n_in_proj
from gptoss_jax.model.moe import MoE

DISPATCHES = ("grouped", "blocked", "ragged", "dense")
LOWERING = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def moe_rung(scale: str):
  """The ladder's MoE rung at `scale` (the layer the sweeps train)."""
  return next(r.model for r in sweeps.build("ladder", scale).runs if r.model.is_moe)


def expert_flops_per_token(module: MoE, x, platform: str) -> float | None:
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  step = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x)[0]), argnums=(0, 1)))
  text = step.trace(params, x).lower(lowering_platforms=(platform,)).as_text(debug_info=True)
  try:
    return hlo.scope_flops(text, "experts", platform) / x.shape[1]
  except ValueError:  # the loop's matmuls: their count follows the routing
    return None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (one device's share)")
  parser.add_argument("--dtype", default="float32", help="compute dtype (XLA:CPU multiplies bfloat16 no faster)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--scales", default="tiny,small,gpu")
  args = parser.parse_args()
  backend = jax.default_backend()
  platform = LOWERING.get(backend, "cuda")
  print(f"backend: {backend} ({jax.devices()[0].device_kind}), {args.tokens} tokens, {args.dtype}")
  print(f"{'scale':<6} {'experts':>8} {'d/d_expert':>11} {'dispatch':<8} {'ms':>9} {'tokens/s':>10} "
        f"{'expert GFLOP/token':>19} {'x active':>9}")
  for scale in args.scales.split(","):
    rung = moe_rung(scale).replace(dtype=args.dtype, param_dtype="float32")
    active = 3 * 2 * rung.top_k * (rung.d_model * n_in_proj(rung) * rung.d_expert + rung.d_expert * rung.d_model)
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, rung.d_model), jnp.dtype(args.dtype))
    for dispatch in DISPATCHES:
      module = MoE(rung.replace(n_layers=1, moe_dispatch=dispatch, platform="auto"), nnx.Rngs(0))
      seconds = time_fwd_bwd(module, x, repeats=args.repeats)
      flops = expert_flops_per_token(module, x, platform)
      counted = "loop" if flops is None else f"{flops / 1e9:.4f}"
      ratio = "" if flops is None else f"{flops / active:.2f}"
      print(f"{scale:<6} {f'{rung.n_experts} top-{rung.top_k}':>8} {f'{rung.d_model}/{rung.d_expert}':>11} "
            f"{dispatch:<8} {seconds * 1e3:9.1f} {args.tokens / seconds:10,.0f} {counted:>19} {ratio:>9}", flush=True)


if __name__ == "__main__":
  main()

"""Where one decoded token's time goes, at gpt-oss-20b's widths (random weights, packed MXFP4 experts, as
benchmarks/decode_speed.py builds them): XLA's own trace of the compiled decoding step, each op's time
summed by what it computes, beside the bytes it reads.

  python benchmarks/decode_profile.py [--layers 4 24] [--context 64] [--repeats 10] [--workdir /tmp/decode_profile]

The step is `generate`'s (greedy, a context of --context tokens in the KV cache), compiled, run --repeats
times under jax.profiler and each op's events summed: the CPU kernels' products by the weight they read
(attention's q, k and v, its output, the MoE's gate-and-up and down products over the 4 selected experts'
packed bytes, the unembedding), their read rate beside them; every other op of the program (norms, RoPE,
attention over the cache, the router and its top-k, the sampling) as one line; and what the step's wall time
adds to its ops (dispatch, the gaps between ops). Each shape in a fresh process, as `generate` runs
(runtime.configure, inference_memory, reuse_step_memory). The figures go to docs/inference.md per CPU kind.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import build, child, cpu_name  # noqa: E402

OTHER = "other ops (norms, RoPE, attention over the cache, router, sampling)"
BETWEEN = "between ops (dispatch, gaps)"


def products(hlo: str, cfg) -> dict[str, tuple[str, int]]:
  """The CPU kernels' calls in a compiled program's text: instruction name -> (what it computes, bytes of
  weight it reads), from the custom call's target and operand shapes."""
  out = {}
  for line in hlo.splitlines():
    call = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = .*custom_call_target=\"(gptoss_\w+)\"", line)
    if not call:
      continue
    name, target = call.groups()
    operands = line.split("operand_layout_constraints=", 1)[1]
    shapes = [tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"\w+\[([\d,]+)\]", operands)]
    if target == "gptoss_bf16_matvec":  # x [R, I], then one or more weights [I, O_j]
      weights = shapes[1:]
      (I, O) = weights[0]
      piece = ("unembedding" if O == cfg.vocab_size else
               "attention q, k, v" if len(weights) == 3 else
               "attention q" if (I, O) == (cfg.d_model, cfg.n_heads * cfg.head_dim) else
               "attention k, v" if (I, O) == (cfg.d_model, cfg.n_kv_heads * cfg.head_dim) else
               "attention output" if I == cfg.n_heads * cfg.head_dim else f"bf16 product {I}x{O}")
      out[name] = (piece, sum(2 * i * o for i, o in weights))
    else:  # gptoss_mxfp4_matvec: x [A, I], experts [A], blocks [E, O, I / 32, 16], scales [E, O, I / 32]
      (A, _), _, (_, O, NB, _), _ = shapes
      piece = "MoE gate and up (MXFP4)" if O == 2 * cfg.d_ff else "MoE down (MXFP4)"
      out[name] = (piece, A * O * NB * 17)  # 16 bytes of codes and a scale per block of 32
  return out


def measure(folder: str, context: int, repeats: int) -> None:
  from gptoss_jax import runtime
  runtime.configure()
  runtime.inference_memory()
  runtime.reuse_step_memory()
  import jax
  import jax.numpy as jnp
  from jax.profiler import ProfileData
  from gptoss_jax.generate import _decode_step, _extend
  from gptoss_jax.weights import load_model
  _, cfg, model = load_model(folder)
  cache = model.init_cache(1, context + 8)
  prompt = jnp.asarray([list(range(1, context + 1))], jnp.int32)
  _, cache = _extend(model, prompt, jnp.asarray(0, jnp.int32), cache)  # a context in the cache, as decoding has
  args = (model, jnp.asarray(7, jnp.int32), jnp.asarray(context, jnp.int32), cache, jax.random.key(0), 0.0, 1.0, 0)
  for _ in range(3):  # compiled, then warm
    jax.block_until_ready(_decode_step(*args))
  walls = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(_decode_step(*args))
    walls.append(time.perf_counter() - began)
  hlo = _decode_step.lower(*args).compile().as_text()
  kernels = products(hlo, cfg)
  ops = set(re.findall(r"^\s*(?:ROOT )?%?([\w.-]+) = ", hlo, re.MULTILINE))
  seconds = collections.Counter()
  with tempfile.TemporaryDirectory() as trace:
    with jax.profiler.trace(trace):
      for _ in range(repeats):
        jax.block_until_ready(_decode_step(*args))
    for plane in ProfileData.from_file(str(next(Path(trace).rglob("*.xplane.pb")))).planes:
      for line in plane.lines:
        for event in line.events:
          if event.name in kernels:
            seconds[kernels[event.name][0]] += event.duration_ns * 1e-9 / repeats
          elif event.name in ops:
            seconds[OTHER] += event.duration_ns * 1e-9 / repeats
  read = collections.Counter()
  for piece, n in kernels.values():
    read[piece] += n
  step = statistics.median(walls)
  rows = {piece: [s, read[piece]] for piece, s in sorted(seconds.items(), key=lambda kv: -kv[1])}
  rows[BETWEEN] = [step - sum(seconds.values()), 0]
  print("RESULT", json.dumps({"step": step, "pieces": rows}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[4])
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--workdir", default="/tmp/decode_profile")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    kind, folder, *rest = args.child
    if kind == "build":
      build(folder, int(rest[0]))
    else:
      measure(folder, int(rest[0]), int(rest[1]))
    return
  print(f"CPU: {cpu_name()}", flush=True)
  for layers in args.layers:
    folder = Path(args.workdir) / f"gpt-oss-20b-{layers}-layers"
    shutil.rmtree(folder, ignore_errors=True)
    child("build", str(folder), str(layers), script=__file__)
    row = child("measure", str(folder), str(args.context), str(args.repeats), script=__file__)
    shutil.rmtree(folder)
    step = row["step"]
    print(f"\n{layers} layers, context {args.context}: one decoded token {step * 1e3:.1f} ms ({1 / step:.2f} tokens/s)")
    print(f"  {'':<68} {'ms':>7} {'share':>6} {'MB read':>8} {'GiB/s':>6}")
    for piece, (s, n) in row["pieces"].items():
      rate = f"{n / s / 2**30:6.1f}" if n and s > 0 else ""
      size = f"{n / 1e6:8.1f}" if n else ""
      print(f"  {piece:<68} {s * 1e3:7.1f} {s / step:6.1%} {size:>8} {rate:>6}")


if __name__ == "__main__":
  main()

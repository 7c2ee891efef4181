"""Where one decoded token's time goes, at gpt-oss-20b's widths (random weights, packed MXFP4 experts, as
benchmarks/decode_speed.py builds them): each piece of the decoding step compiled and timed alone at the shapes
a decode step gives it, against the whole step.

  python benchmarks/decode_profile.py [--layers 4 24] [--context 64] [--repeats 20] [--workdir /tmp/decode_profile]

Pieces, per layer and then for the whole model: the attention block (norm, q/k/v, the KV cache's update and
the attention over it, the output projection) on a full layer and on a sliding one; the MoE block (norm,
router, the selected experts' products through the CPU kernel where it is built); then the embedding lookup,
the final norm and unembedding (its 1.16 GB read), and the sampling. `rest` is the whole step's time less the
sum of the pieces: what running them as one program adds or saves (dispatch between them, fusion). Medians
of --repeats calls after one compiling call; each shape in a fresh process, as `generate` runs
(runtime.configure, inference_memory, reuse_step_memory). The figures go to docs/inference.md per CPU kind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import build, child  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
  """Median seconds of fn(*args) after a first (compiling) call."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - began)
  return statistics.median(times)


def measure(folder: str, context: int, repeats: int) -> None:
  from gptoss_jax import runtime
  runtime.configure()
  runtime.inference_memory()
  runtime.reuse_step_memory()
  import jax
  import jax.numpy as jnp
  from gptoss_jax.generate import _decode_step, _extend, sample
  from gptoss_jax.model.platform import target
  from gptoss_jax.model.positions import rope_cos_sin
  from gptoss_jax.model.transformer import unembed_logits
  from gptoss_jax.weights import load_model
  _, cfg, model = load_model(folder)
  cache = model.init_cache(1, context + 8)
  prompt = jnp.asarray([list(range(1, context + 1))], jnp.int32)
  _, cache = _extend(model, prompt, jnp.asarray(0, jnp.int32), cache)  # a context in the cache, as decoding has
  token, position, key = jnp.asarray(7, jnp.int32), jnp.asarray(context, jnp.int32), jax.random.key(0)
  row = {"step": timed(lambda t, p, c: _decode_step(model, t, p, c, key, 0.0, 1.0, 0), token, position, cache,
                       repeats=repeats)}
  positions = position[None, None]
  rope = rope_cos_sin(cfg, positions) if cfg.is_rotary else None
  x = jnp.zeros((1, 1, cfg.d_model), jnp.dtype(cfg.dtype))

  @jax.jit
  def attention(block, x, cache):
    return block.attn(block.attn_norm(x), positions, rope, cache)

  @jax.jit
  def moe(block, x):
    return block.ffn(block.ffn_norm(x))

  sliding = [i for i, b in enumerate(model.blocks) if b.attn.window]
  full = [i for i, b in enumerate(model.blocks) if not b.attn.window]
  for name, layers in (("attention, full layer", full), ("attention, sliding layer", sliding)):
    if layers:
      i = layers[0]
      row[name] = timed(lambda x, c: attention(model.blocks[i], x, c), x, cache[i], repeats=repeats) * len(layers)
  row["MoE block"] = timed(lambda x: moe(model.blocks[0], x), x, repeats=repeats) * cfg.n_layers
  row["embedding lookup"] = timed(jax.jit(lambda e, t: jnp.take(e, t[None, None], axis=0)), model.embed[...], token,
                                  repeats=repeats)
  final = jax.jit(lambda m, x: unembed_logits(m.final_norm(x), m.unembedding(), target(m.cfg)))
  row["final norm + unembedding"] = timed(lambda x: final(model, x), x, repeats=repeats)
  logits = final(model, x)[0, -1]
  row["sampling (greedy)"] = timed(jax.jit(lambda l: sample(l, key, 0.0, 1.0)), logits, repeats=repeats)
  row["rest"] = row["step"] - sum(v for k, v in row.items() if k != "step")
  print("RESULT", json.dumps(row))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[4])
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=20)
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
  import platform
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
  print(f"CPU: {cpu}", flush=True)
  for layers in args.layers:
    folder = Path(args.workdir) / f"gpt-oss-20b-{layers}-layers"
    shutil.rmtree(folder, ignore_errors=True)
    child("build", str(folder), str(layers), script=__file__)
    row = child("measure", str(folder), str(args.context), str(args.repeats), script=__file__)
    shutil.rmtree(folder)
    print(f"\n{layers} layers, context {args.context}: one decoded token {row['step'] * 1e3:.1f} ms "
          f"({1 / row['step']:.2f} tokens/s)")
    for name, seconds in row.items():
      if name != "step":
        print(f"  {name:<28} {seconds * 1e3:8.1f} ms  {seconds / row['step']:6.1%}")


if __name__ == "__main__":
  main()

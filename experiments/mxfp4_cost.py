"""python -m experiments.mxfp4_cost SWEEP_DIR [--results DIR]

What MXFP4 experts cost a mixture of experts trained in full precision: each compared training's final
checkpoint evaluated on its test split as trained and with every expert weight quantized to MXFP4 after
training and dequantized (the project's quantizer, the OCP MX rules: blocks of 32 along each matmul's
input dimension, a shared power-of-two scale, e2m1 values rounded to nearest-even), on the same windows.
Into <run>/seed<k>/mxfp4.json (and the same place under --results); the report pairs the two losses seed
by seed. Routers, attention and embeddings stay as trained, as in gpt-oss's checkpoints. Bad input: one
line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from experiments.description import SweepDescription
from experiments.paired import ALPHA, compare, corrected
from gptoss_jax.config import ConfigError
from gptoss_jax.fileio import atomic_write

FILE = "mxfp4.json"


def quantize_experts(model) -> int:
  """Every MoE layer's expert weights replaced, in place, by their MXFP4 round trip (w_in [E, D, G, F] in
  blocks along D, w_out [E, F, D] along F); returns how many layers."""
  from gptoss_jax.model.moe import MoE
  from gptoss_jax.model.mxfp4 import round_trip
  layers = 0
  for block in model.blocks:
    if isinstance(block.ffn, MoE) and not block.ffn.cfg.moe_mxfp4:
      block.ffn.w_in[...] = round_trip(block.ffn.w_in[...], axis=1)
      block.ffn.w_out[...] = round_trip(block.ffn.w_out[...], axis=1)
      layers += 1
  return layers


def measure(folder: Path) -> dict:
  from gptoss_jax.data.pipeline import split_tokens
  from gptoss_jax.data.prepare import dataset_dir
  from gptoss_jax.evaluate import evaluate_tokens
  from gptoss_jax.weights import load_model
  config, cfg, model = load_model(folder)
  tokens = split_tokens(dataset_dir(config.data), "test")
  T = config.data.seq_len
  ones = np.ones(cfg.vocab_size, np.int64)  # bits per byte are not reported here
  loss = lambda: evaluate_tokens(model, tokens, T, max(1, 16384 // T), ones, progress=False)["loss"]
  plain = loss()
  layers = quantize_experts(model)
  return {"loss": plain, "mxfp4_loss": loss(), "moe_layers": layers, "d_model": cfg.d_model, "d_expert": cfg.d_expert}


def section(sweep_dir: Path, description: SweepDescription) -> list[str]:
  """The report's table for a sweep whose MoE trainings carry mxfp4.json."""
  rows = []
  for spec in description.runs:
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted((sweep_dir / spec.name).glob(f"seed*/{FILE}"))}
    if len(found) > 1:
      d = np.array([r["mxfp4_loss"] - r["loss"] for r in found.values()])
      rows.append((spec.name, np.mean([r["loss"] for r in found.values()]), compare(spec.name, spec.name, d),
                   next(iter(found.values()))))
  if not rows:
    return []
  fixed = corrected([c for _, _, c, _ in rows])
  first = rows[0][3]
  partial = [f"d_model {first['d_model']}"] if first["d_model"] % 32 else []
  lines = ["", "## MXFP4 experts after training", "",
           "Test loss with every expert weight quantized to MXFP4 after training (blocks of 32 along each matmul's "
           "input, OCP MX rules, `experiments/mxfp4_cost.py`) against the same checkpoint as trained, on the same "
           f"windows, seed by seed (Δ = MXFP4 - trained; Holm over the {len(rows)} runs, simultaneous intervals at "
           f"1 - {ALPHA:g} / {len(rows)})."
           + (f" Widths not divisible by 32 ({', '.join(partial)}; expert widths "
              + ", ".join(str(r[3]['d_expert']) for r in rows) + ") end in a shorter block with its own scale: "
              "slightly finer than whole blocks of 32." if partial or any(r[3]["d_expert"] % 32 for r in rows) else ""),
           "", "| run | trained loss | n | Δ | 95% CI | p (t) | p (sign-flip) | Holm p (t) | Holm p (sign-flip) | "
           "simultaneous CI | verdict |", "|---" * 11 + "|"]
  lines += [f"| {name} | {mean:.4f} | {c.cells()}" for (name, mean, _, _), c in zip(rows, fixed)]
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.mxfp4_cost", description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep_dir", help="a sweep folder whose compared trainings still hold their checkpoints")
  parser.add_argument("--results", default="", help="also copy each mxfp4.json to the same place under this folder")
  args = parser.parse_args(argv)
  try:
    measured = measure_sweep(Path(args.sweep_dir), Path(args.results) if args.results else None)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {FILE} for {measured} trainings", file=sys.stderr)
  return 0


def measure_sweep(sweep_dir: Path, results: Path | None) -> int:
  """measure() for every MoE compared training with checkpoints; returns how many."""
  if not (sweep_dir / "sweep.json").is_file():
    raise ConfigError(f"{sweep_dir} is not a sweep folder (no sweep.json; experiments.run writes it)")
  moe = [r.name for r in SweepDescription.load(sweep_dir / "sweep.json").runs if r.n_experts]
  folders = sorted(p for name in moe for p in (sweep_dir / name).glob("seed*") if (p / "checkpoints").is_dir())
  if not folders:
    raise ConfigError(f"no MoE training with checkpoints in {sweep_dir}")
  from tqdm import tqdm
  for folder in tqdm(folders, desc="MXFP4 cost", unit="training", file=sys.stderr):
    atomic_write(folder / FILE, json.dumps(measure(folder)))
    if results is not None:
      dst = results / folder.relative_to(sweep_dir)
      dst.mkdir(parents=True, exist_ok=True)
      shutil.copy2(folder / FILE, dst / FILE)
  return len(folders)


if __name__ == "__main__":
  from gptoss_jax import runtime
  runtime.configure()  # before JAX starts its backend
  sys.exit(main())

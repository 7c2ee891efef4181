"""python -m experiments.heldout <sweep folder>

Re-evaluates the final checkpoint of every compared-seed training of a sweep on its test split, batch by
batch (the batches the training evaluated), into <run>/seed<k>/heldout.json (which a training writes itself
at its last step; this recomputes it, for trainings from before it did). With these, the report
measures how much of each paired difference is the held-out set's own noise: the standard error, over
held-out batches, of the per-batch difference between two runs (seeds averaged), beside the seed-to-seed
standard error of the same difference. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax.config import ConfigError


def batch_losses(folder: Path) -> dict:
  """Mean next-token cross-entropy of each held-out batch, for the training's newest checkpoint."""
  from gptoss_jax.data.pipeline import eval_batches
  from gptoss_jax.data.prepare import dataset_dir
  from gptoss_jax.weights import load_model, steps
  config, cfg, model = load_model(folder)

  @jax.jit
  def loss(model, tokens_BxT1):
    logits = model(tokens_BxT1[:, :-1]).astype(jnp.float32)
    target = jnp.take_along_axis(logits, tokens_BxT1[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target)

  batches = eval_batches(dataset_dir(config.data), config.data.seq_len, config.train.batch_size,
                         config.train.eval_batches, split="test")
  return {"split": "test", "step": steps(folder)[-1], "windows": sum(len(b) for b in batches),
          "batch_losses": [float(loss(model, jnp.asarray(b))) for b in batches]}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.heldout", description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep_dir", help="the folder experiments.run wrote (holds sweep.json)")
  args = parser.parse_args(argv)
  sweep_dir = Path(args.sweep_dir)
  if not (sweep_dir / "sweep.json").is_file():
    print(f"error: {sweep_dir} is not a sweep folder (no sweep.json; experiments.run writes it)", file=sys.stderr)
    return 2
  from tqdm import tqdm
  folders = sorted(p for p in sweep_dir.glob("*/seed*") if (p / "checkpoints").is_dir())
  worst = 0.0
  for folder in tqdm(folders, desc="held-out batches", unit="training", file=sys.stderr):
    try:
      result = batch_losses(folder)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    logged = [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
              if r["step"] == result["step"] and "test/loss" in r]
    if logged:  # the same batches as the training's own test evaluation: the same mean
      worst = max(worst, abs(np.mean(result["batch_losses"]) - logged[-1]["test/loss"]))
    (folder / "heldout.json").write_text(json.dumps(result))
  print(f"wrote heldout.json for {len(folders)} trainings; largest difference from the logged held-out loss: "
        f"{worst:.1e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""A sweep's TensorBoard logdir, written from its metrics.jsonl files (what the committed results keep):
one run per training (<run>/seed<k>, <run>/lr<value>), scalars only; HParams with what a comparison
needs (run, sweep, seed, learning rate, the fields the sweep varies, parameter counts, FLOPs per token),
the varying fields and the learning rate marked as differing (the columns TensorBoard's table shows
first), the seeds of a run in one session group so TensorBoard aggregates them; a custom-scalars layout with the
held-out loss of every run on one chart.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from gptoss_jax.config import ModelConfig
from gptoss_jax.train.metrics import hparams_summaries, summary_writer

MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
LAYOUT = {"losses": {"held-out loss, every run": ["Multiline", ["eval/loss"]],
                     "training loss, every run": ["Multiline", ["train/loss"]]},
          "routers": {"max_load_ratio (1 balanced, E / top_k collapsed)": ["Multiline", [r"moe/max_load_ratio/.*"]],
                      "usage entropy (1 balanced)": ["Multiline", [r"moe/usage_entropy/.*"]]}}


# in metrics.jsonl, not worth their size in the committed logdir
LEFT_OUT = ("perf/step_time_s", "perf/mfu", "perf/peak_memory_gb", "perf/peak_memory_gib", "perf/elapsed_s",
            "train/param_norm", "train/ce_loss", "eval/loss_se")


def write(sweep_dir: Path, description: dict, out: Path) -> Path:
  shutil.rmtree(out, ignore_errors=True)  # written anew: event files of an earlier export would be read too
  out.mkdir(parents=True)
  varying = sorted({field for run in description.runs for field in run.changes})
  with summary_writer(out) as root:
    root.add_custom_scalars(LAYOUT)
  for spec in description.runs:
    for folder in sorted((sweep_dir / spec.name).glob("*")):
      if not (folder / "metrics.jsonl").is_file():
        continue
      config = json.loads((folder / "config.json").read_text())
      seeds = folder.name.startswith("seed")
      hparams = {"run": spec.name, "sweep": f"{description.sweep}-{description.scale}",
                 "seed": config["train"]["seed"], "lr": config["train"]["lr"], "lr_selection": not seeds}
      hparams |= {f: config["model"].get(f, MODEL_DEFAULTS.get(f)) for f in varying}  # added since: default
      hparams |= {"total_params": spec.total_params, "active_params": spec.active_params,
                  "train_flops_per_token": spec.flops_per_token}
      group = spec.name if seeds else f"{spec.name}/{folder.name}"
      with summary_writer(out / spec.name / folder.name) as writer:
        for summary in hparams_summaries(hparams, group, ("eval/loss", "train/loss"), differs=(*varying, "lr")):
          writer.file_writer.add_summary(summary)
        for line in (folder / "metrics.jsonl").read_text().splitlines():
          row = json.loads(line)
          step = row.pop("step")
          row.setdefault("train/tokens", step * spec.tokens_per_step)
          for tag, value in row.items():
            if isinstance(value, (int, float)) and tag not in LEFT_OUT:
              writer.add_scalar(tag, value, step)
  return out
